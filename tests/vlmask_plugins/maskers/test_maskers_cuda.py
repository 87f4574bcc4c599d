"""Maskers on CUDA with a CUDA generator (as the engine calls them): indices stay on the device."""

from __future__ import annotations

import pytest
import torch

from vlmask.types import Batch, TokenGrid
from vlmask_plugins.maskers import ActionAreaMasker, FutureBlocksMasker, PartialMasker, RandomMasker, TubeMasker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize(
    "masker",
    [TubeMasker(0.9), RandomMasker(0.9), ActionAreaMasker(0.9), PartialMasker(0.9, 0.5), FutureBlocksMasker(2)],
    ids=lambda m: type(m).__name__,
)
def test_masker_on_cuda_matches_its_rules(masker: object) -> None:
    grid = TokenGrid.for_clip(16, 224, 224)
    def batch(device: str) -> Batch:
        return Batch(video=torch.zeros(4, 3, 1, 1, 1, device=device),
                     action_box=torch.tensor([[0.2, 0.2, 0.7, 0.8]] * 4, device=device))

    mask = masker(batch("cuda"), grid, torch.Generator(device="cuda").manual_seed(0))  # type: ignore[operator]
    on_cpu = masker(batch("cpu"), grid, torch.Generator().manual_seed(0))  # type: ignore[operator]
    assert mask.visible.is_cuda and mask.predict.is_cuda
    assert bool((mask.visible.diff(dim=1) > 0).all()) and bool((mask.predict.diff(dim=1) > 0).all())
    # the same counts as on the CPU (the rules fix them; only the draw differs), no token both ways
    assert mask.visible.shape == on_cpu.visible.shape and mask.predict.shape == on_cpu.predict.shape
    both = (mask.visible[:, :, None] == mask.predict[:, None, :]).any(dim=(1, 2))
    assert not bool(both.any())
    if isinstance(masker, TubeMasker):
        assert mask.num_visible == 160
