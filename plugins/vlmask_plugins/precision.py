"""Where losses leave autocast: the numerically delicate part of a loss runs in fp32."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def without_autocast(device: torch.device) -> AbstractContextManager[object]:
    """A region where autocast is off on ``device`` (a no-op for devices autocast does not know,
    e.g. ``meta`` while FLOPs are counted). Cast the inputs to fp32 inside."""
    if torch.amp.autocast_mode.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
