"""Partial masking from Turbo training (Han, thesis ch. 6; Han, Xie & Zisserman, ECCV 2022)."""

from __future__ import annotations

import torch

from vlmask.types import Batch, Mask, TokenGrid
from vlmask_plugins.maskers.geometry import tubes_from_spatial
from vlmask_plugins.maskers.sampling import masked_count, random_split, uniform_noise, validate_ratio


class PartialMasker:
    """Partial masking: drop a fraction m of the tokens, reconstruct only a fraction r <= m.

    Turbo training (Han, Xie & Zisserman, "Turbo Training with Token Dropout", BMVC 2022;
    thesis ch. 6): the encoder never sees the dropped tokens (cost ~ N(1 - m)); the decoder
    reconstructs only a random subset of them (cost ~ N(1 - m + r)).

    Both choices are tubes: ``floor(drop_ratio * h * w)`` spatial positions are dropped in
    every slot exactly as :class:`~vlmask_plugins.maskers.tube.TubeMasker` does (same random
    draw for the same generator), then ``floor(reconstruct_ratio * h * w)`` of the dropped
    positions are kept as ``predict``, also in every slot. Hence ``predict`` holds
    ``t * floor(r * h * w)`` tokens (not ``floor(r * N)``), and with ``r == m`` the mask is
    exactly the tube mask of ratio m (plain MAE).
    """

    def __init__(self, drop_ratio: float = 0.9, reconstruct_ratio: float = 0.5) -> None:
        self.drop_ratio = validate_ratio("drop_ratio", drop_ratio)
        self.reconstruct_ratio = validate_ratio("reconstruct_ratio", reconstruct_ratio)
        if self.reconstruct_ratio > self.drop_ratio:
            raise ValueError(
                f"reconstruct_ratio must be <= drop_ratio ({self.drop_ratio}), got {self.reconstruct_ratio}: "
                "only dropped tokens can be reconstructed"
            )

    def __call__(self, batch: Batch, grid: TokenGrid, generator: torch.Generator | None = None) -> Mask:
        device = batch.video.device
        num_dropped = masked_count(self.drop_ratio, grid.spatial, "drop_ratio")
        num_reconstructed = int(self.reconstruct_ratio * grid.spatial)
        if num_reconstructed < 1:
            raise ValueError(
                f"reconstruct_ratio={self.reconstruct_ratio} reconstructs no position of {grid.spatial} per slot"
            )
        noise = uniform_noise((batch.size, grid.spatial), generator, device)
        dropped, visible = random_split(noise, num_dropped)
        if num_reconstructed < num_dropped:
            subset_noise = uniform_noise((batch.size, num_dropped), generator, device)
            chosen, _ = random_split(subset_noise, num_reconstructed)
            dropped = torch.gather(dropped, 1, chosen)  # chosen is sorted, dropped is sorted: stays sorted
        return Mask(visible=tubes_from_spatial(visible, grid), predict=tubes_from_spatial(dropped, grid))
