"""Tube masking (VideoMAE, Tong et al. 2022) and plain per-token random masking (MAE)."""

from __future__ import annotations

import torch

from vlmask.types import Batch, Mask, TokenGrid
from vlmask_plugins.maskers.geometry import tubes_from_spatial
from vlmask_plugins.maskers.sampling import masked_count, random_split, uniform_noise, validate_ratio


class TubeMasker:
    """Tube masking from VideoMAE (Tong et al., NeurIPS 2022).

    Per clip, one spatial mask over the ``h * w`` positions with exactly
    ``floor(ratio * h * w)`` masked positions, repeated in every temporal slot (a "tube").
    ``predict`` is every masked token.

    Rounding: VideoMAE's ``TubeMaskingGenerator`` masks ``int(ratio * h * w)`` positions, so
    ratio 0.9 on 14 x 14 masks 176 and keeps 20 per slot (160 visible tokens for 8 slots).
    V-JEPA instead rounds the *kept* count down (``int((1 - ratio) * h * w)`` = 19 per slot).
    vlmask follows VideoMAE.
    """

    def __init__(self, ratio: float = 0.9) -> None:
        self.ratio = validate_ratio("ratio", ratio)

    def __call__(self, batch: Batch, grid: TokenGrid, generator: torch.Generator | None = None) -> Mask:
        num_masked = masked_count(self.ratio, grid.spatial, "ratio")
        noise = uniform_noise((batch.size, grid.spatial), generator, batch.video.device)
        masked, visible = random_split(noise, num_masked)
        return Mask(visible=tubes_from_spatial(visible, grid), predict=tubes_from_spatial(masked, grid))


class RandomMasker:
    """Per-token random masking (MAE, He et al., CVPR 2022; "random" in VideoMAE's ablation).

    Every clip masks exactly ``floor(ratio * N)`` of its N tokens, chosen independently of
    their temporal slot; ``predict`` is every masked token.
    """

    def __init__(self, ratio: float = 0.9) -> None:
        self.ratio = validate_ratio("ratio", ratio)

    def __call__(self, batch: Batch, grid: TokenGrid, generator: torch.Generator | None = None) -> Mask:
        num_masked = masked_count(self.ratio, grid.num_tokens, "ratio")
        noise = uniform_noise((batch.size, grid.num_tokens), generator, batch.video.device)
        masked, visible = random_split(noise, num_masked)
        return Mask(visible=visible, predict=masked)
