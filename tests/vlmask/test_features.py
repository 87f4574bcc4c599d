"""Feature extraction (row placement, pooling) with a real encoder, and the on-disk feature cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlmask.types import TokenGrid
from vlmask_plugins.data.dataset import collate
from vlmask_plugins.encoders.vit import VideoViT
from vlmask.caches import FeatureCache, extract_features
from vlmask.features import finite_rows, pool_tokens


class Clips(Dataset):
    """Random clips; item ``broken`` is replaced by item 0, as the manifest dataset does with a
    clip that fails to load."""

    def __init__(self, videos: torch.Tensor, broken: int | None = None) -> None:
        self.videos, self.broken = videos, broken

    def __len__(self) -> int:
        return self.videos.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index == self.broken:
            index = 0
        return {"video": self.videos[index], "index": index, "label": -1, "action_box": torch.full((4,), float("nan")),
                "caption": ""}


def test_pooling_keeps_temporal_order():
    tokens = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)  # t=2, h=2, w=2, D=3
    pooled = pool_tokens(tokens, TokenGrid(t=2, h=2, w=2))
    assert torch.equal(pooled["mean"], tokens.mean(dim=1))
    assert torch.equal(pooled["temporal"][:, :3], tokens[:, :4].mean(dim=1))
    assert torch.equal(pooled["temporal"][:, 3:], tokens[:, 4:].mean(dim=1))
    assert set(pool_tokens(tokens[:, :5], TokenGrid(t=2, h=2, w=2))) == {"mean"}  # not the grid: no temporal


def test_extraction_matches_the_encoder_and_leaves_unloaded_clips_nan():
    torch.manual_seed(0)
    encoder = VideoViT(num_frames=4, img_size=16, tubelet=2, patch=8, embed_dim=16, depth=1, num_heads=2)
    encoder.train()
    videos = torch.randn(5, 3, 4, 16, 16)
    pooled = extract_features(encoder, Clips(videos, broken=3), collate, batch_size=2, progress=False)
    assert encoder.training  # mode restored
    with torch.no_grad():
        expected = pool_tokens(encoder.eval()(videos), encoder.grid)
    assert pooled["mean"].shape == (5, 16) and pooled["temporal"].shape == (5, 2 * 16)
    keep = [0, 1, 2, 4]
    assert torch.allclose(pooled["mean"][keep], expected["mean"][keep], atol=1e-5)
    assert torch.allclose(pooled["temporal"][keep], expected["temporal"][keep], atol=1e-5)
    assert finite_rows(pooled).tolist() == [True, True, True, False, True]


def test_feature_cache_round_trip_and_invalidation(tmp_path: Path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "student.safetensors").write_bytes(b"weights")
    manifest = tmp_path / "val.jsonl"
    manifest.write_text('{"video": "a.mp4"}\n')
    cache = FeatureCache(tmp_path / "run" / "features")
    key = cache.key(checkpoint, manifest, {"size": 32})
    assert cache.load(key, "mean") is None
    values = torch.randn(3, 4)
    path = cache.save(key, "mean", values)
    assert path.parent == tmp_path / "run" / "features" and path.name.startswith("step_00000010-val-")
    assert torch.equal(cache.load(cache.key(checkpoint, manifest, {"size": 32}), "mean"), values)
    assert cache.load(key, "temporal") is None
    assert cache.key(checkpoint, manifest, {"size": 64})["key"] != key["key"]
    manifest.write_text('{"video": "b.mp4"}\n')
    assert cache.load(cache.key(checkpoint, manifest, {"size": 32}), "mean") is None
    manifest.write_text('{"video": "a.mp4"}\n')
    os.utime(checkpoint / "student.safetensors", ns=(1, 1))  # a rewritten checkpoint of the same step
    assert cache.load(cache.key(checkpoint, manifest, {"size": 32}), "mean") is None
    path.write_bytes(b"damaged")
    assert cache.load(key, "mean") is None
