"""Leaving autocast for the delicate part of a loss."""

from __future__ import annotations

import torch

from vlmask_plugins.precision import without_autocast


def test_without_autocast_turns_autocast_off_on_the_device():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with without_autocast(a.device):
            assert (a @ b).dtype == torch.float32


def test_without_autocast_is_a_no_op_where_autocast_does_not_exist():
    a = torch.empty(4, 4, device="meta")
    with without_autocast(a.device):  # FLOP counting runs on meta
        assert (a @ a).shape == (4, 4)
