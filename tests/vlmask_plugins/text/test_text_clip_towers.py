"""The CLIP text towers (open_clip and transformers), built from tiny random models saved locally
at test time: the real loading paths, with nothing downloaded."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection

from vlmask_plugins.text import CaptionEmbeddingCache, HFCLIPTextEncoder, OpenCLIPTextEncoder, TextEncoder

CAPTIONS = ["a red square slides to the left", "a blue circle spins", "two hands open a drawer"]
TINY_OPEN_CLIP = "vlmask-test-tiny-clip"


# -- open_clip -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_open_clip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Registers a tiny open_clip architecture (one layer per tower) through add_model_config."""
    config = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def save_random_open_clip(name: str, path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def test_open_clip_tokenizer_works_offline() -> None:
    tokens = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    assert tokens.shape == (3, 77)
    assert int(tokens[0, 0]) == 49406 and int(tokens.max()) == 49407  # start and end of text


def test_open_clip_round_trip_through_a_saved_checkpoint(tiny_open_clip_name: str, tmp_path: Path) -> None:
    reference = save_random_open_clip(tiny_open_clip_name, tmp_path / "a" / "ckpt.pt", seed=0)
    encoder = OpenCLIPTextEncoder(model=tiny_open_clip_name, checkpoint=str(tmp_path / "a" / "ckpt.pt"))
    assert isinstance(encoder, TextEncoder) and encoder.dim == 24
    assert encoder.identity.startswith(f"open_clip:{tiny_open_clip_name}:")
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training

    emb = encoder.encode(CAPTIONS, batch_size=2)
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer(tiny_open_clip_name)(CAPTIONS))
    assert emb.shape == (3, 24) and emb.dtype == torch.float32 and not emb.is_inference()
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-4)

    # another checkpoint of the same architecture, same file name and size, has another identity
    save_random_open_clip(tiny_open_clip_name, tmp_path / "b" / "ckpt.pt", seed=1)
    other = OpenCLIPTextEncoder(model=tiny_open_clip_name, checkpoint=str(tmp_path / "b" / "ckpt.pt"))
    assert (tmp_path / "b" / "ckpt.pt").stat().st_size == (tmp_path / "a" / "ckpt.pt").stat().st_size
    assert other.identity != encoder.identity
    assert not torch.allclose(other.encode(CAPTIONS[:1]), emb[:1])

    cache = CaptionEmbeddingCache(tmp_path / "cache")
    torch.testing.assert_close(cache.embed(encoder, CAPTIONS, progress=False), emb, atol=1e-5, rtol=1e-4)


def test_open_clip_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "ViT-B-32-laion.pt"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        OpenCLIPTextEncoder(model="ViT-B-32", checkpoint=str(missing))
    assert str(missing) in str(error.value)
    with pytest.raises(ValueError, match="checkpoint is required"):
        OpenCLIPTextEncoder(model="ViT-B-32", checkpoint="")
    # a pretrained tag is not a file: refused rather than downloaded
    with pytest.raises(FileNotFoundError, match="'openai' does not exist"):
        OpenCLIPTextEncoder(model="ViT-B-32", checkpoint="openai")


def test_open_clip_unknown_or_remote_model_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"not used")
    with pytest.raises(ValueError, match="model must be a built-in open_clip architecture name, got 'ViT-Q-99'"):
        OpenCLIPTextEncoder(model="ViT-Q-99", checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match="hf-hub"):
        OpenCLIPTextEncoder(model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", checkpoint=str(checkpoint))


# -- transformers CLIP -----------------------------------------------------------------------


def write_clip_tokenizer_files(folder: Path, num_merges: int = 1000) -> int:
    """Writes vocab.json + merges.txt (CLIP's layout) from open_clip's shipped BPE file.

    The vocabulary is CLIP's own, cut to its first ``num_merges`` merges; returns its size.
    """
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(tokens)


def tiny_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=24,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def test_hf_clip_round_trip_through_a_saved_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-clip-text"
    vocab_size = write_clip_tokenizer_files(folder)
    torch.manual_seed(0)
    reference = CLIPTextModelWithProjection(tiny_text_config(vocab_size)).eval()
    reference.save_pretrained(folder)

    encoder = HFCLIPTextEncoder(path=str(folder))
    assert isinstance(encoder, TextEncoder) and encoder.dim == 24 and encoder.max_length == 77
    assert encoder.identity.startswith("hf_clip:tiny-clip-text:max_length=77:")
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training

    emb = encoder.encode(CAPTIONS, batch_size=2)
    tokens = encoder.tokenizer(CAPTIONS[:1], return_tensors="pt")
    assert int(tokens["input_ids"][0, 0]) == vocab_size - 2 and int(tokens["input_ids"][0, -1]) == vocab_size - 1
    with torch.no_grad():
        expected = reference(**tokens).text_embeds
    assert emb.shape == (3, 24) and emb.dtype == torch.float32 and not emb.is_inference()
    torch.testing.assert_close(emb[:1], expected, atol=1e-5, rtol=1e-4)
    # padding in a batch does not change a caption's embedding
    torch.testing.assert_close(emb, encoder.encode(CAPTIONS, batch_size=1), atol=1e-5, rtol=1e-4)

    shorter = HFCLIPTextEncoder(path=str(folder), max_length=8)
    assert shorter.identity != encoder.identity
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[2, 77\]"):
        HFCLIPTextEncoder(path=str(folder), max_length=100)


def test_hf_clip_loads_the_text_side_of_a_full_clip_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-clip"
    vocab_size = write_clip_tokenizer_files(folder)
    text_config = tiny_text_config(vocab_size).to_dict()
    vision_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "image_size": 32, "patch_size": 16, "projection_dim": 24}
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=24)).eval()
    full.save_pretrained(folder)

    encoder = HFCLIPTextEncoder(path=str(folder))
    tokens = encoder.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = full.get_text_features(**tokens)
    expected = getattr(expected, "pooler_output", expected)
    torch.testing.assert_close(encoder.encode(CAPTIONS), expected, atol=1e-5, rtol=1e-4)


def test_hf_clip_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a transformers model folder") as error:
        HFCLIPTextEncoder(path=str(tmp_path / "clip-vit-base-patch32"))
    assert str(tmp_path / "clip-vit-base-patch32") in str(error.value)
    with pytest.raises(ValueError, match="path is required"):
        HFCLIPTextEncoder(path="")
