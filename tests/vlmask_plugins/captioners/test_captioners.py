"""Captioners through fill_captions on a generated synthetic set: the template captioner, and a
tiny RANDOM transformers VisionEncoderDecoder saved locally at test time (nothing downloaded;
its captions are gibberish, so the tests check the plumbing, not the words)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vlmask_plugins.captioners.fill import CaptionStats, clip_frames, fill_captions
from vlmask_plugins.captioners.hf_image_to_text import HFImageToTextCaptioner
from vlmask_plugins.captioners.interface import Captioner, RowCaptioner, consensus_caption
from vlmask_plugins.captioners.template import TemplateCaptioner
from vlmask_plugins.data.manifest import read_manifest
from vlmask_plugins.data.synthetic import generate

WORDS = "a the red blue green square circle triangle moves spins slides left right up down shape hand".split()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 real clips; ``uncaptioned.jsonl`` beside them holds every line with its caption removed."""
    folder = tmp_path_factory.mktemp("synth")
    train, val = generate(folder, clips=6, seed=1, frames=8, size=32, progress=False)
    rows = [json.loads(line) for path in (train, val) for line in path.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        row.pop("caption")
    (folder / "uncaptioned.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def save_tiny_captioner(folder: Path, seed: int) -> Path:
    """A random ViT + GPT-2 VisionEncoderDecoder, a word-level tokenizer and a ViT image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, PreTrainedTokenizerFast, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor)

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                        eos_token="[EOS]", unk_token="[UNK]")
    encoder = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=32, patch_size=8, initializer_range=1.0)
    decoder = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, initializer_range=1.0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(seed)
    VisionEncoderDecoderModel(config=config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_captioner(tmp_path_factory.mktemp("tiny-captioner"), seed=0)


class CountingCaptioner:
    """Wraps a real captioner and counts its ``caption`` calls (to see cache hits)."""

    def __init__(self, inner: HFImageToTextCaptioner) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.frames_per_clip = inner.frames_per_clip
        self.short_side = inner.short_side
        self.calls = 0

    def caption(self, frames: list[np.ndarray]) -> str:
        self.calls += 1
        return self.inner.caption(frames)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- template --------------------------------------------------------------------------------


def test_template_fills_labels_keeps_captions_and_fields_and_skips_bad_lines(synth: Path, tmp_path: Path) -> None:
    rows = read_rows(synth / "uncaptioned.jsonl")
    rows[0]["caption"] = "a caption written by a person"
    no_label = {"video": rows[1]["video"], "note": "no label here"}
    lines = [json.dumps(r) for r in rows[:3]] + ["{not json", json.dumps({"video": "videos/missing.mp4", "label": "x"}),
                                                json.dumps(no_label)] + [json.dumps(r) for r in rows[3:]]
    source = synth / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "elsewhere" / "captioned.jsonl"  # another folder: relative paths must be rewritten

    stats = fill_captions(source, out, TemplateCaptioner("a video of {label}"), progress=False)

    assert isinstance(stats, CaptionStats)
    assert (stats.lines, stats.kept, stats.captioned, stats.written) == (9, 1, 5, 7)
    assert [(s.line, s.reason.split(":")[0]) for s in stats.skipped] == [(4, "invalid JSON"), (5, "file not found")]
    assert [s.line for s in stats.uncaptioned] == [6]
    assert stats.cache_dir is None  # a row captioner reads the row: nothing to cache
    written = read_rows(out)
    assert written[0]["caption"] == "a caption written by a person"
    for row in written[1:3] + written[4:]:
        assert row["caption"] == f"a video of {row['verb']} {row['noun']}" == f"a video of {row['label']}"
        assert "colour" in row and "camera_pan" in row  # unknown fields kept
    assert "caption" not in written[3] and written[3]["note"] == "no label here"
    report = read_manifest(out)  # every path still resolves from the output folder
    assert len(report.clips) == 7 and not report.skipped
    assert "line 4" in stats.summary() and "line 6" in stats.summary()


def test_template_fields_and_validation() -> None:
    captioner = TemplateCaptioner("a person {verb} the {noun}")
    assert isinstance(captioner, RowCaptioner) and not isinstance(captioner, Captioner)
    assert captioner.caption_row({"verb": "open", "noun": "drawer"}) == "a person open the drawer"
    assert captioner.caption_row({"verb": "open"}) is None
    assert captioner.caption_row({"verb": "open", "noun": "  "}) is None
    by_label = TemplateCaptioner()
    assert by_label.caption_row({"label": "playing_guitar"}) == "a video of playing guitar"
    assert by_label.caption_row({"verb": "cut", "noun": "onion"}) == "a video of cut onion"
    assert TemplateCaptioner(replace_underscores=False).caption_row({"label": "a_b"}) == "a video of a_b"
    assert by_label.identity != TemplateCaptioner("clip of {label}").identity
    for bad, message in (("a video", "names no manifest field"), ("{", "not a valid format string"),
                         ("a {}", "must name a manifest field"), ("{row[0]}", "must name a manifest field"),
                         ("", "non-empty")):
        with pytest.raises(ValueError, match=message):
            TemplateCaptioner(bad)


def test_consensus_prefers_the_repeated_caption_and_skips_empty_ones() -> None:
    assert consensus_caption(["x y", "a b c", "a b c", "x z"]) == "a b c"
    assert consensus_caption(["", "", ""]) == ""
    assert consensus_caption(["one", "two", "three"]) == "two"  # no agreement: the middle frame


# -- transformers image-to-text --------------------------------------------------------------


def test_hf_captioner_is_deterministic_and_identity_follows_weights(tiny_model: Path, synth: Path, tmp_path: Path) -> None:
    captioner = HFImageToTextCaptioner(path=str(tiny_model), frames_per_clip=3, max_new_tokens=6)
    assert isinstance(captioner, Captioner)
    clip = read_manifest(synth / "uncaptioned.jsonl").clips[0]
    frames = clip_frames(clip, 3, captioner.short_side)
    assert len(frames) == 3 and frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8
    first = captioner.caption(frames)
    assert isinstance(first, str) and first and set(first.split()) <= set(WORDS) | {"[UNK]"}
    assert captioner.caption(frames) == first  # greedy decoding
    again = HFImageToTextCaptioner(path=str(tiny_model), frames_per_clip=3, max_new_tokens=6)
    assert again.identity == captioner.identity and again.caption(frames) == first
    assert captioner.caption_batch([frames, frames[:1]])[0] == first

    other = save_tiny_captioner(tmp_path / "other", seed=1)  # same architecture, same file sizes
    assert (other / "model.safetensors").stat().st_size == (tiny_model / "model.safetensors").stat().st_size
    assert HFImageToTextCaptioner(path=str(other), frames_per_clip=3, max_new_tokens=6).identity != captioner.identity
    assert HFImageToTextCaptioner(path=str(tiny_model), frames_per_clip=3, max_new_tokens=7).identity != captioner.identity

    middle = HFImageToTextCaptioner(path=str(tiny_model), frames_per_clip=3, max_new_tokens=6, combine="middle")
    assert middle.caption(frames) == captioner.caption(frames[1:2])

    prompted = HFImageToTextCaptioner(path=str(tiny_model), frames_per_clip=3, max_new_tokens=4, prompt="a red square")
    pixels = prompted.image_processor(images=frames[:1], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():  # the model continues the prompt ...
        ids = prompted.model.generate(pixel_values=pixels, decoder_input_ids=torch.tensor([[1, 4 + WORDS.index("a"),
                                      4 + WORDS.index("red"), 4 + WORDS.index("square")]]), max_new_tokens=4, do_sample=False)
    raw = prompted.tokenizer.decode(ids[0], skip_special_tokens=True)
    # (what follows the prompt may be special tokens only: the tiny random model's greedy choice
    # varied with the thread count inside a full run, so only the prefix is pinned)
    assert raw.startswith("a red square")
    assert prompted.caption(frames[:1]) == raw[len("a red square") :].strip()  # ... and the caption leaves the prompt out


def test_hf_captioner_through_fill_captions_uses_the_cache(tiny_model: Path, synth: Path, tmp_path: Path) -> None:
    source = synth / "uncaptioned.jsonl"
    rows = read_rows(source)
    rows[2]["caption"] = "kept as it is"
    broken = synth / "videos" / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 64)
    lines = [json.dumps(r) for r in rows] + [json.dumps({"video": "videos/broken.mp4", "label": "x"})]
    source = synth / "for_model.jsonl"
    source.write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    counting = CountingCaptioner(HFImageToTextCaptioner(path=str(tiny_model), frames_per_clip=3, max_new_tokens=6))

    out = tmp_path / "out" / "captioned.jsonl"
    stats = fill_captions(source, out, counting, workers=2, cache_dir=cache, progress=False)
    assert counting.calls == 5 and (stats.captioned, stats.cached, stats.kept) == (5, 0, 1)
    assert [s.line for s in stats.skipped] == [7] and "broken.mp4" in str(stats.skipped[0])
    assert stats.written == 6 and stats.cache_dir == cache and len(list(cache.glob("*.json"))) == 5
    written = read_rows(out)
    assert written[2]["caption"] == "kept as it is"
    assert all(isinstance(r["caption"], str) and r["caption"] for r in written)
    clips = read_manifest(out).clips
    assert written[0]["caption"] == counting.inner.caption(clip_frames(clips[0], 3, counting.short_side))
    counting.calls = 0

    again = tmp_path / "again.jsonl"
    second = fill_captions(source, again, counting, workers=1, cache_dir=cache, progress=False)
    assert counting.calls == 0 and (second.captioned, second.cached) == (0, 5)
    assert [r["caption"] for r in read_rows(again)] == [r["caption"] for r in written]


def test_hf_captioner_missing_path_and_bad_arguments(tmp_path: Path, tiny_model: Path) -> None:
    missing = tmp_path / "blip-base"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        HFImageToTextCaptioner(path=str(missing))
    assert str(missing) in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFImageToTextCaptioner(path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="path is required"):
        HFImageToTextCaptioner(path="")
    for arguments, message in (({"frames_per_clip": 0}, "frames_per_clip"), ({"max_new_tokens": 0}, "max_new_tokens"),
                               ({"combine": "vote"}, "combine"), ({"prompt": " "}, "prompt"),
                               ({"short_side": 0}, "short_side"), ({"device": "gpu0"}, "device")):
        with pytest.raises(ValueError, match=message):
            HFImageToTextCaptioner(path=str(tiny_model), **arguments)


def test_fill_captions_refuses_bad_inputs(synth: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fill_captions(tmp_path / "none.jsonl", tmp_path / "out.jsonl", TemplateCaptioner(), progress=False)
    with pytest.raises(ValueError, match="workers"):
        fill_captions(synth / "uncaptioned.jsonl", tmp_path / "out.jsonl", TemplateCaptioner(), workers=0)
    with pytest.raises(ValueError, match="identity"):
        fill_captions(synth / "uncaptioned.jsonl", tmp_path / "out.jsonl", object(), progress=False)
