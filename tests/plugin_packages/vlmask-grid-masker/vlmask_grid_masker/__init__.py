"""A complete third-party vlmask plugin: grid-wise masking as a ``masker``.

Grid-wise sampling (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
Fig. 6) keeps one position of every ``stride x stride`` cell and masks the rest (75% for stride
2). Here it is applied as tubes: the same spatial pattern in every temporal slot, with a random
offset of the kept position per clip.
"""

from __future__ import annotations

import torch

from vlmask import hookimpl
from vlmask.types import Batch, Mask, TokenGrid


class GridMasker:
    """Keep one position per ``stride x stride`` cell in every temporal slot (MAE grid-wise)."""

    def __init__(self, stride: int = 2, random_offset: bool = True) -> None:
        if stride < 2:
            raise ValueError(f"stride must be at least 2, got {stride}")
        self.stride = stride
        self.random_offset = random_offset

    def __call__(self, batch: Batch, grid: TokenGrid, generator: torch.Generator | None = None) -> Mask:
        device = batch.video.device
        b, s = batch.size, self.stride
        if grid.h % s or grid.w % s:
            raise ValueError(f"grid {grid.h}x{grid.w} is not divisible by stride {s}")
        if self.random_offset:
            offsets = torch.randint(0, s, (b, 2), generator=generator, device=device)
        else:
            offsets = torch.zeros(b, 2, dtype=torch.long, device=device)
        ys = torch.arange(grid.h, device=device)
        xs = torch.arange(grid.w, device=device)
        keep_y = (ys[None, :] % s) == offsets[:, :1]  # (B, h)
        keep_x = (xs[None, :] % s) == offsets[:, 1:]  # (B, w)
        keep = (keep_y[:, :, None] & keep_x[:, None, :]).reshape(b, grid.spatial)  # (B, h*w)
        keep = keep.repeat(1, grid.t)  # the same pattern in every temporal slot
        tokens = torch.arange(grid.num_tokens, device=device).expand(b, -1)
        visible = tokens[keep].reshape(b, -1)
        predict = tokens[~keep].reshape(b, -1)
        return Mask(visible=visible, predict=predict)


@hookimpl
def vlmask_register_plugins(register):
    register("masker", "grid", GridMasker)
