"""Where tokens sit in the frame: the one place that decides whether a token is in a box.

Shared by the action-area masker (MoFo, Ahmadian, Guerin & Gilbert 2023) and ActCLIP pooling (FILS, eq. 3-6),
so masking and pooling always agree on which tokens belong to the action area.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmask.types import TokenGrid


def token_centres_inside_box(grid: TokenGrid, boxes: Tensor, device: torch.device | str | None = None) -> Tensor:
    """Which spatial positions of ``grid`` have their patch centre inside each clip's box.

    ``boxes`` is (B, 4) ``[x0, y0, x1, y1]`` as fractions of width and height. The centre of
    the patch in row ``y`` and column ``x`` is ``((x + 0.5) / w, (y + 0.5) / h)``; it is inside
    when ``x0 <= cx <= x1`` and ``y0 <= cy <= y1`` (edges count as inside). A box given with
    ``x0 > x1`` (or ``y0 > y1``) is read with its corners swapped. Returns a bool tensor of
    shape (B, h * w), positions in row-major order (the spatial part of the (t, h, w) token
    order), on ``device`` (default: the boxes' device).

    >>> grid = TokenGrid(t=1, h=2, w=2)
    >>> token_centres_inside_box(grid, torch.tensor([[0.0, 0.0, 0.5, 1.0]])).tolist()
    [[True, False, True, False]]
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"action boxes must have shape (B, 4) as [x0, y0, x1, y1], got {tuple(boxes.shape)}")
    device = boxes.device if device is None else torch.device(device)
    boxes = boxes.to(device=device, dtype=torch.float32)
    x_lo = torch.minimum(boxes[:, 0], boxes[:, 2])[:, None]
    x_hi = torch.maximum(boxes[:, 0], boxes[:, 2])[:, None]
    y_lo = torch.minimum(boxes[:, 1], boxes[:, 3])[:, None]
    y_hi = torch.maximum(boxes[:, 1], boxes[:, 3])[:, None]
    centre_x = ((torch.arange(grid.w, device=device, dtype=torch.float32) + 0.5) / grid.w).repeat(grid.h)
    centre_y = ((torch.arange(grid.h, device=device, dtype=torch.float32) + 0.5) / grid.h).repeat_interleave(grid.w)
    inside_x = (centre_x[None, :] >= x_lo) & (centre_x[None, :] <= x_hi)
    inside_y = (centre_y[None, :] >= y_lo) & (centre_y[None, :] <= y_hi)
    return inside_x & inside_y


def spatial_position_of_tokens(token_index: Tensor, grid: TokenGrid) -> Tensor:
    """The spatial position (``y * w + x``) of each token index of the (t, h, w) order."""
    return token_index % grid.spatial


def tubes_from_spatial(spatial_index: Tensor, grid: TokenGrid) -> Tensor:
    """Expand sorted spatial positions (B, k) into the token indices (B, k * t) of their tubes.

    Token ``slot * h * w + position`` for every temporal slot; rows stay sorted ascending.

    >>> tubes_from_spatial(torch.tensor([[0, 3]]), TokenGrid(t=2, h=2, w=2)).tolist()
    [[0, 3, 4, 7]]
    """
    offsets = torch.arange(grid.t, device=spatial_index.device, dtype=spatial_index.dtype) * grid.spatial
    tokens = offsets[None, :, None] + spatial_index[:, None, :]  # (B, t, k)
    return tokens.reshape(spatial_index.shape[0], -1)
