"""CaptionEmbeddingCache mechanics: layout, shards, several writers, compaction, bad shards.

These tests use a small real text encoder (hashed character trigrams, deterministic and
instant) so they need no model files; the MiniLM round trip is in test_text_minilm.py.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmask.caches import CaptionEmbeddingCache
from vlmask_plugins.text import TextEncoder


class TrigramEncoder:
    """A real (if simple) text encoder: L2-normalised counts of hashed character trigrams."""

    def __init__(self, dim: int = 16, salt: str = "") -> None:
        self.dim = dim
        self.identity = f"trigram:dim={dim}:salt={salt}"
        self.salt = salt
        self.calls = 0

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            padded = f"  {self.salt}{text.lower()} "
            for i in range(len(padded) - 2):
                bucket = int.from_bytes(hashlib.sha256(padded[i : i + 3].encode()).digest()[:4], "little") % self.dim
                out[row, bucket] += 1.0
        return torch.nn.functional.normalize(out, dim=1)


def test_layout_is_one_folder_per_identity_with_self_describing_shards(tmp_path: Path) -> None:
    encoder = TrigramEncoder()
    assert isinstance(encoder, TextEncoder)
    cache = CaptionEmbeddingCache(tmp_path)
    emb = cache.embed(encoder, ["a cat jumps", "a dog runs"], progress=False)

    folder = tmp_path / hashlib.sha256(encoder.identity.encode()).hexdigest()[:32]
    assert cache.folder(encoder) == folder
    assert (folder / "identity.txt").read_text().strip() == encoder.identity
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) == 1
    assert not list(folder.glob(".tmp-*"))
    with safe_open(str(shards[0]), framework="pt") as shard:
        assert shard.metadata()["identity"] == encoder.identity
        torch.testing.assert_close(shard.get_tensor("embeddings"), emb)
        digests = shard.get_tensor("caption_sha256")
    assert digests.shape == (2, 32) and digests.dtype == torch.uint8
    assert bytes(digests[0].tolist()) == hashlib.sha256(b"a cat jumps").digest()

    other = TrigramEncoder(salt="x")
    cache.embed(other, ["a cat jumps"], progress=False)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # identities never share rows


def test_shard_size_splits_encoding_and_storage(tmp_path: Path) -> None:
    encoder = TrigramEncoder()
    cache = CaptionEmbeddingCache(tmp_path, shard_size=2)
    captions = [f"clip number {i}" for i in range(5)]
    emb = cache.embed(encoder, captions, progress=False)
    assert encoder.calls == 3 and cache.stats.encode_calls == 3 and cache.stats.shards_written == 3
    torch.testing.assert_close(emb, TrigramEncoder().encode(captions))
    assert len(list(cache.folder(encoder).glob("shard-*.safetensors"))) == 3


def test_missing_captions_are_zero_rows_and_masked(tmp_path: Path) -> None:
    encoder = TrigramEncoder()
    cache = CaptionEmbeddingCache(tmp_path)
    captions = [None, "", "   \n", "a bird flies"]
    emb = cache.embed(encoder, captions, progress=False)
    assert torch.equal(CaptionEmbeddingCache.missing(captions), torch.tensor([True, True, True, False]))
    assert torch.all(emb[:3] == 0) and emb[3].norm() > 0.99
    assert cache.stats.missing == 3 and cache.stats.encoded_captions == 1
    only_missing = CaptionEmbeddingCache(tmp_path / "other").embed(encoder, [None, ""], progress=False)
    assert only_missing.shape == (2, 16) and torch.all(only_missing == 0)
    assert not (tmp_path / "other").exists()  # nothing to store, nothing written


def _write_captions(root: str, worker: int, rounds: int) -> None:
    encoder = TrigramEncoder()
    cache = CaptionEmbeddingCache(root, shard_size=3)
    for r in range(rounds):
        # overlapping sets: both workers may encode "shared {r}" at the same time
        cache.embed(encoder, [f"worker {worker} round {r}", f"shared {r}"], progress=False)


def test_several_processes_write_one_cache_without_losing_rows(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_captions, args=(str(tmp_path), w, 6)) for w in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0

    encoder = TrigramEncoder()
    reader = CaptionEmbeddingCache(tmp_path)
    captions = [f"worker {w} round {r}" for w in range(2) for r in range(6)] + [f"shared {r}" for r in range(6)]
    emb = reader.embed(encoder, captions, progress=False)
    assert encoder.calls == 0 and reader.stats.hits == len(captions)
    torch.testing.assert_close(emb, TrigramEncoder().encode(captions))
    assert not list(reader.folder(encoder).glob(".tmp-*"))


def test_compact_merges_shards_and_readers_keep_working(tmp_path: Path) -> None:
    encoder = TrigramEncoder()
    writer = CaptionEmbeddingCache(tmp_path, shard_size=1)
    captions = ["one", "two", "three"]
    before = writer.embed(encoder, captions, progress=False)
    early_reader = CaptionEmbeddingCache(tmp_path)
    early_reader.embed(encoder, captions[:1], progress=False)  # has loaded the old shards

    merged = CaptionEmbeddingCache(tmp_path).compact(encoder)
    assert merged is not None
    assert sorted(writer.folder(encoder).glob("shard-*.safetensors")) == [merged]

    fresh = CaptionEmbeddingCache(tmp_path)
    assert torch.equal(fresh.embed(encoder, captions, progress=False), before)
    assert torch.equal(early_reader.embed(encoder, captions + ["four"], progress=False)[:3], before)
    assert encoder.calls == 4  # three one-caption shards, then only "four"
    assert CaptionEmbeddingCache(tmp_path / "empty").compact(encoder) is None


def test_foreign_or_malformed_shards_are_refused_by_name(tmp_path: Path) -> None:
    encoder = TrigramEncoder()
    cache = CaptionEmbeddingCache(tmp_path)
    folder = cache.folder(encoder)
    folder.mkdir(parents=True)
    digests = torch.zeros(1, 32, dtype=torch.uint8)
    foreign = folder / "shard-0-0-foreign.safetensors"
    save_file({"embeddings": torch.zeros(1, 16), "caption_sha256": digests}, str(foreign), metadata={"identity": "x"})
    with pytest.raises(RuntimeError, match="foreign.*belongs to text encoder 'x'"):
        cache.embed(encoder, ["a cat"], progress=False)
    foreign.unlink()

    wrong_dim = folder / "shard-0-0-wrongdim.safetensors"
    save_file(
        {"embeddings": torch.zeros(1, 8), "caption_sha256": digests},
        str(wrong_dim),
        metadata={"identity": encoder.identity},
    )
    with pytest.raises(RuntimeError, match=r"wrongdim.*\(n, 16\)"):
        CaptionEmbeddingCache(tmp_path).embed(encoder, ["a cat"], progress=False)


class WrongWidthEncoder:
    """A text encoder that breaks its promise: rows of 8 numbers while claiming dim 16."""

    dim = 16
    identity = "wrong-width"

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return torch.ones(len(texts), 8)


def test_bad_encoder_output_and_arguments_are_refused(tmp_path: Path) -> None:
    cache = CaptionEmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError, match=r"returned shape \(1, 8\).*expected \(1, 16\)"):
        cache.embed(WrongWidthEncoder(), ["a cat"], progress=False)
    assert not list(tmp_path.rglob("shard-*"))  # nothing stored from a broken encoder
    with pytest.raises(ValueError, match="shard_size"):
        CaptionEmbeddingCache(tmp_path, shard_size=0)
    with pytest.raises(TypeError, match="single string"):
        cache.embed(TrigramEncoder(), "a cat", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        cache.embed(TrigramEncoder(), ["a cat", 3], progress=False)  # type: ignore[list-item]
