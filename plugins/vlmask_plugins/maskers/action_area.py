"""Action-area tube masking in the style of MoFo (Ahmadian, Guerin & Gilbert, 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlmask.types import Batch, Mask, TokenGrid
from vlmask_plugins.maskers.geometry import token_centres_inside_box, tubes_from_spatial
from vlmask_plugins.maskers.sampling import masked_count, split_by_flag, uniform_noise, validate_ratio


def _rank_within(group: Tensor, noise: Tensor) -> Tensor:
    """For each position, its rank (0, 1, ...) by noise among the positions of its row where
    ``group`` is True; positions outside the group get ranks >= the group's size."""
    keyed = torch.where(group, noise, noise + 2.0)  # group members first, in random order
    order = torch.argsort(keyed, dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


class ActionAreaMasker:
    """Tube masking that takes a fixed share of the masked positions from the action area.

    MoFo (Ahmadian, Guerin & Gilbert, "MoFo: Motion Focused Self-Supervision for Video Understanding", 2023):
    of the ``count = floor(ratio * h * w)`` masked spatial positions (VideoMAE's floor),
    ``round(inside_fraction * count)`` (halves rounded up) are drawn at random from the
    positions inside ``batch.action_box`` and the rest from outside; the same spatial mask is
    repeated in every temporal slot. A position is inside when its patch centre lies in the
    box, edges included (:func:`~vlmask_plugins.maskers.geometry.token_centres_inside_box`).
    When the box holds fewer positions than asked, all of them are masked and the remainder
    comes from outside; when outside is short, the remainder comes from inside. Every clip
    masks exactly ``count`` positions.

    The released MoFo code tests box overlap with a wrong comparison and draws the remainder
    from the wrong index range; this is the rule the paper describes, not that code.
    """

    #: What the recipe must provide (vlmask.kinds.REQUIREMENTS); ``vlmask validate`` checks it.
    requires: frozenset[str] = frozenset({"action_box"})

    def __init__(self, ratio: float = 0.9, inside_fraction: float = 0.75) -> None:
        self.ratio = validate_ratio("ratio", ratio)
        inside_fraction = float(inside_fraction)
        if not 0.0 <= inside_fraction <= 1.0:
            raise ValueError(f"inside_fraction must be in [0, 1], got {inside_fraction}")
        self.inside_fraction = inside_fraction

    def __call__(self, batch: Batch, grid: TokenGrid, generator: torch.Generator | None = None) -> Mask:
        if batch.action_box is None:
            raise ValueError(
                "masker 'action_area' needs batch.action_box (B, 4) [x0, y0, x1, y1]; the manifest has no "
                "action_box and no action-area detector filled it in"
            )
        device = batch.video.device
        count = masked_count(self.ratio, grid.spatial, "ratio")
        wanted_inside = min(count, math.floor(self.inside_fraction * count + 0.5))
        inside = token_centres_inside_box(grid, batch.action_box, device)  # (B, h*w)
        available_inside = inside.sum(dim=1)
        available_outside = grid.spatial - available_inside
        take_inside = torch.clamp(available_inside, max=wanted_inside)
        take_outside = torch.minimum(count - take_inside, available_outside)
        take_inside = count - take_outside  # outside short: the rest comes from inside
        noise = uniform_noise((batch.size, grid.spatial), generator, device)
        masked = (inside & (_rank_within(inside, noise) < take_inside[:, None])) | (
            ~inside & (_rank_within(~inside, noise) < take_outside[:, None])
        )
        masked_positions, visible_positions = split_by_flag(masked, count)
        return Mask(
            visible=tubes_from_spatial(visible_positions, grid), predict=tubes_from_spatial(masked_positions, grid)
        )
