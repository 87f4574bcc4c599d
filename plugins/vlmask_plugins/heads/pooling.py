"""Pooling the student's visible-token features, optionally inside the action area.

ActCLIP (FILS, Ahmadian et al., BMVC 2024, eq. 3-6) pools only the visible tokens whose patch
centre lies in the action box; the inside test is
:func:`vlmask_plugins.maskers.geometry.token_centres_inside_box`, shared with the action-area
masker.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmask.types import TokenGrid
from vlmask_plugins.maskers.geometry import spatial_position_of_tokens, token_centres_inside_box

POOLING_STRATEGIES = ("patch-average", "patch")


def visible_tokens_inside_box(visible_index: Tensor, grid: TokenGrid, boxes: Tensor) -> Tensor:
    """(B, Nv) bool: which visible tokens have their patch centre inside their clip's box."""
    inside = token_centres_inside_box(grid, boxes, visible_index.device)  # (B, h*w)
    return torch.gather(inside, 1, spatial_position_of_tokens(visible_index, grid))


def pool_visible_in_box(
    features: Tensor,
    visible_index: Tensor,
    grid: TokenGrid,
    boxes: Tensor,
    strategy: str = "patch-average",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pool visible-token features (B, Nv, D) inside each clip's action box.

    ``patch-average`` (FILS default): the mean of the in-box visible tokens. ``patch`` (FILS
    Table 3a ablation): one in-box visible token drawn uniformly at random. A clip with no
    visible token in its box falls back to all its visible tokens (their mean, or a random one
    for ``patch``). Returns ``(pooled (B, D), fell_back (B,) bool)``.

    >>> grid = TokenGrid(t=1, h=1, w=2)
    >>> features = torch.tensor([[[1.0], [3.0]], [[5.0], [7.0]]])
    >>> boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.9, 0.0, 1.0, 1.0]])
    >>> pooled, fell_back = pool_visible_in_box(features, torch.tensor([[0, 1], [0, 1]]), grid, boxes)
    >>> pooled.flatten().tolist(), fell_back.tolist()
    ([1.0, 6.0], [False, True])
    """
    if strategy not in POOLING_STRATEGIES:
        raise ValueError(f"action_strategy must be one of {', '.join(POOLING_STRATEGIES)}, got {strategy!r}")
    inside = visible_tokens_inside_box(visible_index, grid, boxes)
    fell_back = ~inside.any(dim=1)
    chosen = inside | fell_back[:, None]
    if strategy == "patch-average":
        weights = chosen.to(features.dtype)
        pooled = (features * weights[:, :, None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        return pooled, fell_back
    draw_device = generator.device if generator is not None else features.device
    noise = torch.rand(chosen.shape, generator=generator, device=draw_device).to(features.device)
    pick = torch.where(chosen, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
    pooled = features[torch.arange(features.shape[0], device=features.device), pick]
    return pooled, fell_back
