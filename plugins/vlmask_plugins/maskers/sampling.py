"""Random draws shared by the maskers: uniform noise and splitting a selection into sorted rows."""

from __future__ import annotations

import torch
from torch import Tensor


def uniform_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) noise drawn on the generator's device (when given), returned on ``device``."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def random_split(noise: Tensor, num_selected: int) -> tuple[Tensor, Tensor]:
    """Split positions by noise: the ``num_selected`` lowest-noise positions and the rest.

    Returns ``(selected, rest)``, each (B, k) with rows sorted ascending.
    """
    order = torch.argsort(noise, dim=1)
    selected = order[:, :num_selected].sort(dim=1).values
    rest = order[:, num_selected:].sort(dim=1).values
    return selected, rest


def split_by_flag(flags: Tensor, num_true: int) -> tuple[Tensor, Tensor]:
    """Indices of the True and of the False entries of a (B, n) bool tensor, rows sorted.

    Every row must hold exactly ``num_true`` True entries: checked on the device
    (``torch._assert_async``), so that a training step does not wait for the GPU here.
    """
    torch._assert_async((flags.sum(dim=1) == num_true).all(), f"expected {num_true} selected positions in every row")
    order = torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices  # True first, each part ascending
    return order[:, :num_true], order[:, num_true:]


def validate_ratio(name: str, value: float) -> float:
    """A ratio strictly between 0 and 1, else a ValueError naming the argument."""
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def masked_count(ratio: float, positions: int, argument: str) -> int:
    """``int(ratio * positions)`` (VideoMAE's floor), checked to leave something on each side."""
    count = int(ratio * positions)
    if count < 1 or count >= positions:
        raise ValueError(
            f"{argument}={ratio} masks {count} of {positions} positions; "
            "at least one position must be masked and one visible"
        )
    return count
