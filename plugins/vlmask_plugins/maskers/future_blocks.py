"""Future-block masking from Dense Predictive Coding (Han, Xie & Zisserman, ICCVW 2019)."""

from __future__ import annotations

import torch

from vlmask.types import Batch, Mask, TokenGrid


class FutureBlocksMasker:
    """Mask the last ``num_future_slots`` temporal slots and predict them from the earlier ones.

    DPC (Han, Xie & Zisserman, "Video Representation Learning by Dense Predictive Coding",
    ICCV workshops 2019; thesis ch. 2): ``visible`` is every token of the first
    ``t - k`` slots, ``predict`` every token of the last ``k`` slots. Deterministic: the
    generator is not used.
    """

    def __init__(self, num_future_slots: int = 2) -> None:
        if int(num_future_slots) != num_future_slots or num_future_slots < 1:
            raise ValueError(f"num_future_slots must be a positive integer, got {num_future_slots}")
        self.num_future_slots = int(num_future_slots)

    def __call__(self, batch: Batch, grid: TokenGrid, generator: torch.Generator | None = None) -> Mask:
        if self.num_future_slots >= grid.t:
            raise ValueError(
                f"num_future_slots={self.num_future_slots} leaves no visible slot of the {grid.t} temporal slots"
            )
        device = batch.video.device
        first_future = (grid.t - self.num_future_slots) * grid.spatial
        visible = torch.arange(first_future, device=device).expand(batch.size, -1)
        predict = torch.arange(first_future, grid.num_tokens, device=device).expand(batch.size, -1)
        return Mask(visible=visible.contiguous(), predict=predict.contiguous())
