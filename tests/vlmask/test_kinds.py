"""Tests by kind (timm's pattern): every registered plugin of every kind is built at tiny scale
and checked against its kind's Protocol (``vlmask.kinds``), with one cheap call per kind.

A new plugin is covered by construction: its (kind, name) appears in the parametrisation. A
plugin that has no tiny-scale builder below fails ``test_every_plugin_has_a_tiny_builder`` by
name (add a line to ``TINY``); a plugin that breaks its kind's contract fails by name.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from torch import nn

import vlmask
from vlmask.config import RecipeError, load_recipe
from vlmask.kinds import PROTOCOLS, REQUIREMENTS, conforms, missing_members, partial_optional_members, requirements_of
from vlmask.plugins import default_plugins, load_plugins
from vlmask.registry import KINDS, Entry
from vlmask.schema import build
from vlmask.types import Batch, Mask, StepOutputs, TokenGrid

RECIPES = Path(__file__).parents[2] / "recipes"
ENTRIES = default_plugins().registry.entries()
GRID = TokenGrid(t=2, h=4, w=4, tubelet=2, patch=8)  # clips of 4 x 32 x 32
B, D, TEXT_DIM = 3, 32, 24


def tiny_encoder() -> nn.Module:
    return default_plugins().registry.get("encoder", "video_vit").factory(
        num_frames=4, img_size=32, tubelet=2, patch=8, embed_dim=D, depth=1, num_heads=2
    )


def batch(generator: torch.Generator | None = None) -> Batch:
    g = generator or torch.Generator().manual_seed(0)
    return Batch(
        video=torch.randn(B, 3, 4, 32, 32, generator=g),
        text_embedding=torch.randn(B, TEXT_DIM, generator=g),
        action_box=torch.tensor([[0.1, 0.1, 0.6, 0.7]] * B),
        label=torch.tensor([0, 1, 2]),
        index=torch.arange(B),
        flow=torch.randn(B, 3, 4, 32, 32, generator=g),
        second_video=torch.randn(B, 3, 4, 32, 32, generator=g),
        second_flow=torch.randn(B, 3, 4, 32, 32, generator=g),
    )


def tube_mask() -> Mask:
    return default_plugins().registry.get("masker", "tube").factory(ratio=0.75)(batch(), GRID, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ tiny builders, by kind


def _hf_clip_folder(root: Path) -> str:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1001]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = root / "hf-clip"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    n = len(tokens)
    config = CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=n - 2, eos_token_id=n - 1,
                            pad_token_id=n - 1)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    return str(folder)


def _open_clip_checkpoint(root: Path) -> dict[str, str]:
    import open_clip

    name = "vlmask-kinds-tiny-clip"
    config = {"embed_dim": TEXT_DIM,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{name}.json")
    torch.save(open_clip.create_model(name).state_dict(), root / "tiny.pt")
    return {"model": name, "checkpoint": str(root / "tiny.pt")}


def _captioner_folder(root: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, PreTrainedTokenizerFast, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor)

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "a": 4, "video": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                        eos_token="[EOS]", unk_token="[UNK]")
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8),
        GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0),
    )
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    folder = root / "captioner"
    VisionEncoderDecoderModel(config=config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return str(folder)


def _student() -> nn.Module:
    from vlmask.build import Student

    return Student(tiny_encoder(), None, nn.Linear(D, TEXT_DIM, bias=False), {})


#: (kind, name) -> tiny-scale arguments, given (tmp_path, tiny_synth manifests).

def _shards(tmp: Path, manifest: Path) -> Path:
    """The manifest written as WebDataset shards (``vlmask data shard``); the index's path."""
    from vlmask_plugins.data.shards import write_shards

    return write_shards(manifest, tmp / "shards", shard_size=4).index

TINY: dict[tuple[str, str], Callable[[Path, Any], dict[str, Any]]] = {
    ("masker", "tube"): lambda tmp, data: {"ratio": 0.75},
    ("masker", "random"): lambda tmp, data: {"ratio": 0.75},
    ("masker", "partial"): lambda tmp, data: {"drop_ratio": 0.75, "reconstruct_ratio": 0.5},
    ("masker", "action_area"): lambda tmp, data: {"ratio": 0.75},
    ("masker", "future_blocks"): lambda tmp, data: {"num_future_slots": 1},
    **{("encoder", n): (lambda tmp, data: {"num_frames": 4, "img_size": 32, "tubelet": 2, "patch": 8})
       for n in ("video_vit_tiny", "video_vit_small", "video_vit_base", "video_vit_large")},
    ("encoder", "video_vit"): lambda tmp, data: {"num_frames": 4, "img_size": 32, "tubelet": 2, "patch": 8,
                                                 "embed_dim": D, "depth": 1, "num_heads": 2},
    ("predictor", "transformer"): lambda tmp, data: {"encoder_dim": D, "grid": GRID, "dim": 16, "depth": 1, "num_heads": 2},
    ("predictor", "future"): lambda tmp, data: {"encoder_dim": D, "grid": GRID, "dim": 16, "depth": 1, "num_heads": 2},
    ("target", "normalized_pixels"): lambda tmp, data: {},
    ("target", "latent"): lambda tmp, data: {},
    ("target", "dense_infonce"): lambda tmp, data: {},
    ("target", "language_space"): lambda tmp, data: {},
    ("target", "future_infonce"): lambda tmp, data: {"bidirectional": True},
    ("head", "video_text_infonce"): lambda tmp, data: {"pooling": "action_area", "gather": False},
    ("head", "classification"): lambda tmp, data: {"num_classes": 3, "encoder_dim": D},
    ("head", "coclr"): lambda tmp, data: {"encoder": tiny_encoder(), "encoder_dim": D, "queue_size": 8, "topk": 2},
    ("teacher", "ema"): lambda tmp, data: {"student": _student(), "total_steps": 10},
    ("teacher", "frozen"): lambda tmp, data: {"student": _student()},
    ("text_encoder", "minilm"): lambda tmp, data: {},
    ("text_encoder", "hf_clip"): lambda tmp, data: {"path": _hf_clip_folder(tmp)},
    ("text_encoder", "open_clip"): lambda tmp, data: _open_clip_checkpoint(tmp),
    ("dataset", "video_manifest"): lambda tmp, data: {"manifest": str(data[0]), "num_frames": 4, "size": 32,
                                                      "hflip": False, "probe_workers": 1},
    ("dataset", "mixture"): lambda tmp, data: {"manifest": str(data[1]), "num_frames": 4, "size": 32, "hflip": False,
                                               "sources": [{"path": str(_shards(tmp, data[0])), "weight": 2}]},
    ("dataset", "video_shards"): lambda tmp, data: {"manifest": str(_shards(tmp, data[0])), "num_frames": 4, "size": 32,
                                                    "hflip": False},
    ("action_area", "flow"): lambda tmp, data: {"preset": "ultrafast", "pairs": 2, "size": 32},
    ("captioner", "template"): lambda tmp, data: {},
    ("captioner", "hf_image_to_text"): lambda tmp, data: {"path": _captioner_folder(tmp), "frames_per_clip": 1,
                                                          "max_new_tokens": 3},
    ("evaluator", "knn"): lambda tmp, data: {"k": 3},
    ("evaluator", "linear_probe"): lambda tmp, data: {"cs": (0.1, 1.0), "holdout": 0.3},
    ("evaluator", "linear_probe_adam"): lambda tmp, data: {"max_epochs": 3, "weight_decays": (0.001,), "holdout": 0.3},
    ("evaluator", "attentive_probe"): lambda tmp, data: {"epochs": 2, "batch_size": 4, "token_budget": 8, "device": "cpu"},
    ("evaluator", "retrieval"): lambda tmp, data: {},
    ("evaluator", "zero_shot"): lambda tmp, data: {},
    ("logger", "csv"): lambda tmp, data: {},
    ("logger", "tensorboard"): lambda tmp, data: {},
    ("logger", "wandb"): lambda tmp, data: pytest.importorskip("wandb") and {"mode": "disabled"},  # an optional extra
}


# ------------------------------------------------------------------ one cheap call per kind


def _check_mask(mask: Mask, num_tokens: int) -> None:
    assert isinstance(mask, Mask)
    assert mask.visible.shape[0] == B and mask.predict.shape[0] == B and mask.num_visible >= 1 and mask.num_predict >= 1
    for row_v, row_p in zip(mask.visible.tolist(), mask.predict.tolist()):
        assert row_v == sorted(row_v) and row_p == sorted(row_p)
        assert not set(row_v) & set(row_p), "a token both visible and predicted"
        assert all(0 <= i < num_tokens for i in row_v + row_p)


def _loss_inputs(name: str) -> StepOutputs:
    g = torch.Generator().manual_seed(1)
    mask = tube_mask()
    width = GRID.tubelet * GRID.patch**2 * 3 if name == "normalized_pixels" else D
    return StepOutputs(
        batch=batch(g), grid=GRID, mask=mask,
        visible_features=torch.randn(B, mask.num_visible, D, generator=g, requires_grad=True),
        predictions=torch.randn(B, mask.num_predict, width, generator=g, requires_grad=True),
        teacher_features=torch.randn(B, GRID.num_tokens, D, generator=g),
        projection=nn.Linear(D, TEXT_DIM, bias=False),
        teacher_projection=nn.Linear(D, TEXT_DIM, bias=False),
        encoder=tiny_encoder(),
    )


def _is_future(component: Any) -> bool:
    """The DPC family (future predictor, future_infonce) works on future-block masks."""
    return type(component).__module__.endswith(("future_predictor", "future_infonce"))


def future_mask() -> Mask:
    return default_plugins().registry.get("masker", "future_blocks").factory(num_future_slots=1)(
        batch(), GRID, torch.Generator().manual_seed(0))


def _future_loss_inputs() -> StepOutputs:
    """What Student.forward gives a DPC-family target: the student encoder and the future predictor."""
    registry = default_plugins().registry
    encoder = tiny_encoder()
    predictor = registry.get("predictor", "future").factory(encoder_dim=D, grid=GRID, dim=16, depth=1, num_heads=2)
    data, mask = batch(), future_mask()
    visible = encoder(data.video, mask.visible)
    return StepOutputs(batch=data, grid=GRID, mask=mask, visible_features=visible,
                       predictions=predictor(visible, mask), encoder=encoder, predictor=predictor)


def _eval_features() -> Any:
    from vlmask.features import EvalFeatures, SplitFeatures

    g = torch.Generator().manual_seed(2)

    def split(n: int) -> SplitFeatures:
        labels = torch.arange(n) % 3
        return SplitFeatures(pooled={"mean": torch.randn(n, 8, generator=g) + labels[:, None]}, labels=labels,
                             labelled=torch.ones(n, dtype=torch.bool), captions=[f"clip {i}" for i in range(n)],
                             verbs=[None] * n, nouns=[None] * n)

    return EvalFeatures(train=split(12), val=split(6), classes=["a", "b", "c"])


def exercise(kind: str, component: Any, data: Any) -> None:
    """One call of the kind's contract at tiny scale, with its result checked."""
    if kind == "masker":
        _check_mask(component(batch(), GRID, torch.Generator().manual_seed(0)), GRID.num_tokens)
    elif kind == "encoder":
        grid = component.grid
        video = torch.randn(2, 3, grid.t * grid.tubelet, grid.h * grid.patch, grid.w * grid.patch)
        visible = torch.tensor([[0, 3, 5], [1, 2, 7]])
        with torch.no_grad():
            assert component(video, visible).shape == (2, 3, component.embed_dim)
    elif kind == "predictor" and _is_future(component):
        mask = future_mask()
        with torch.no_grad():
            out = component(torch.randn(B, mask.num_visible, D), mask)
        assert out.shape[:2] == (B, mask.num_predict)
    elif kind == "predictor":
        mask = tube_mask()
        with torch.no_grad():
            out = component(torch.randn(B, mask.num_visible, D), mask)
        assert out.shape[:2] == (B, mask.num_predict)
    elif kind == "target" and _is_future(component):
        term = component(_future_loss_inputs())
        loss = term[0] if isinstance(term, tuple) else term
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    elif kind in ("target", "head"):
        out = _loss_inputs(component.__class__.__name__ == "NormalizedPixelsTarget" and "normalized_pixels" or "")
        term = component(out)
        loss = term[0] if isinstance(term, tuple) else term
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    elif kind == "teacher":
        with torch.no_grad():
            assert component(torch.randn(2, 3, 4, 32, 32)).shape == (2, GRID.num_tokens, D)
        component.update(_student(), 1)
        projection = component.module("projection")
        assert projection is None or isinstance(projection, nn.Module)
    elif kind == "text_encoder":
        emb = component.encode(["a red square", "a blue circle"])
        assert emb.shape == (2, component.dim) and emb.dtype == torch.float32 and isinstance(component.identity, str)
    elif kind == "dataset":
        assert len(component) > 0 and len(component.captions) == len(component)
        assert component[0]["video"].shape == (3, 4, 32, 32)
        assert isinstance(list(component.classes), list) and isinstance(list(component.skipped), list)
    elif kind == "action_area":
        row = json.loads(Path(data[0]).read_text().splitlines()[0])
        box = component.detect_file(Path(data[0]).parent / row["video"])
        assert len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    elif kind == "captioner":
        if hasattr(component, "caption_row"):
            assert component.caption_row({"label": "juggling"}) == "a video of juggling"
        else:
            import numpy as np

            assert isinstance(component.caption([np.zeros((32, 32, 3), dtype=np.uint8)]), str)
    elif kind == "evaluator":
        result = component.evaluate(_eval_features())
        assert result is None or all(isinstance(v, (int, float)) and math.isfinite(v) for v in result.values())
    elif kind == "logger":
        assert callable(component.vlmask_step_end)


def check_entry(entry: Entry, tmp_path: Path, data: Any) -> None:
    """Build ``entry`` at tiny scale and check it against its kind's Protocol, naming it on failure."""
    arguments = TINY[(entry.kind, entry.name)](tmp_path, data)
    component = entry.factory(**arguments)
    missing = missing_members(entry.kind, component)
    assert not missing and conforms(entry.kind, component), (
        f"{entry.kind} {entry.name!r} (from {entry.provider}) breaks the {entry.kind} contract: lacks {', '.join(missing)}"
    )
    partial = partial_optional_members(entry.kind, component)
    assert not partial, f"{entry.kind} {entry.name!r} has optional members in part (vlmask.kinds.OPTIONAL): {partial}"
    requirements_of(entry.factory, {k: v for k, v in arguments.items() if k not in ("student", "total_steps", "encoder")})
    exercise(entry.kind, component, data)


#: Plugins whose tiny build still takes seconds (fixed paper widths): run with ``-m slow``.
SLOW = {("encoder", "video_vit_large"), ("encoder", "video_vit_base")}


@pytest.mark.parametrize("entry", [pytest.param(e, marks=pytest.mark.slow) if (e.kind, e.name) in SLOW else e for e in ENTRIES],
                         ids=lambda e: f"{e.kind}:{e.name}")
def test_every_plugin_builds_at_tiny_scale_and_keeps_its_contract(entry: Entry, tmp_path: Path, tiny_synth: Any) -> None:
    assert (entry.kind, entry.name) in TINY, f"{entry.kind} {entry.name!r}: add a tiny-scale builder to TINY"
    torch.manual_seed(0)
    check_entry(entry, tmp_path, tiny_synth)


def test_every_kind_has_a_protocol_and_a_plugin() -> None:
    assert set(PROTOCOLS) == set(KINDS)
    assert {e.kind for e in ENTRIES} == set(KINDS)


def test_every_plugin_has_a_tiny_builder() -> None:
    assert {(e.kind, e.name) for e in ENTRIES} <= set(TINY)


# ------------------------------------------------------------------ a plugin that breaks its contract


class EncoderWithoutWidth(nn.Module):
    """An encoder that forgets ``embed_dim`` (the engine sizes the predictor and projection from it)."""

    def __init__(self, num_frames: int = 4, img_size: int = 32) -> None:
        super().__init__()
        self.grid = TokenGrid.for_clip(num_frames, img_size, img_size, 2, 8)
        self.proj = nn.Linear(3, 4)

    def forward(self, video: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(video.shape[0], index.shape[1], 4)


class BrokenPlugin:
    @vlmask.hookimpl
    def vlmask_register_plugins(self, register: Any) -> None:
        register("encoder", "no_width", EncoderWithoutWidth)


def test_a_plugin_that_breaks_its_protocol_fails_by_name(tmp_path: Path, tiny_synth: Any) -> None:
    plugins = load_plugins(extra=[("broken-encoder", BrokenPlugin())])
    entry = plugins.registry.get("encoder", "no_width")
    TINY[("encoder", "no_width")] = lambda tmp, data: {}
    try:
        with pytest.raises(AssertionError, match=r"encoder 'no_width' \(from broken-encoder \(in-process\)\) breaks the "
                                                 r"encoder contract: lacks embed_dim"):
            check_entry(entry, tmp_path, tiny_synth)
    finally:
        del TINY[("encoder", "no_width")]
    # and the engine refuses it when it builds a recipe's encoder, naming key and plugin
    recipe = load_recipe(RECIPES / "mae.yaml", ["model.encoder={name: no_width}"])
    with pytest.raises(RecipeError, match=r"command line: model.encoder=\{name: no_width\}: key model.encoder: encoder "
                                          r"'no_width' .*breaks the encoder contract \(vlmask.kinds\): it lacks embed_dim"):
        build(plugins.registry, recipe, "model.encoder", "encoder")


# ------------------------------------------------------------------ requirements


def test_requirements_are_declared_from_the_closed_set_and_read_without_building() -> None:
    registry = default_plugins().registry
    for entry in registry.entries():
        if entry.kind in ("target", "head", "masker"):
            assert requirements_of(entry.factory, {}) <= set(REQUIREMENTS)
    head = registry.get("head", "video_text_infonce").factory
    assert requirements_of(head, {"pooling": "mean"}) == {"text_embedding", "projection"}
    assert requirements_of(head, {"pooling": "action_area"}) == {"text_embedding", "projection", "action_box"}
    assert requirements_of(registry.get("target", "language_space").factory, {}) == {"predictor", "teacher", "projection"}
    assert requirements_of(registry.get("masker", "action_area").factory, {}) == {"action_box"}

    class Wrong:
        requires = frozenset({"teacher", "gpu"})

    with pytest.raises(ValueError, match="requires 'gpu', not among the known requirements"):
        requirements_of(Wrong, {})


def test_a_logger_needs_the_step_hook() -> None:
    assert not conforms("logger", SimpleNamespace(vlmask_train_end=lambda summary, run: None))
    assert missing_members("logger", SimpleNamespace()) == ["vlmask_step_end"]


def test_optional_members_are_read_through_their_protocols() -> None:
    """A dataset with ``label_ids`` and ``verbs``/``nouns``, an encoder with ``blocks``: what the
    engine reads when present; half a member (``verbs`` alone, a ``collate`` that is not
    callable) is refused by name."""
    from vlmask.kinds import CollatingDataset, HasBlocks, LabelledDataset, VerbNounDataset

    encoder = tiny_encoder()
    assert isinstance(encoder, HasBlocks) and not isinstance(nn.Linear(2, 2), HasBlocks)
    full = SimpleNamespace(label_ids=[0, -1], labels=["cut onion", None], verbs=["cut", None], nouns=["onion", None])
    assert isinstance(full, LabelledDataset) and isinstance(full, VerbNounDataset)
    assert partial_optional_members("dataset", full) == []
    assert partial_optional_members("dataset", SimpleNamespace(verbs=[], collate=None)) == [
        "VerbNounDataset: nouns", "CollatingDataset: collate"]
    assert not isinstance(SimpleNamespace(verbs=[]), VerbNounDataset)
    assert isinstance(SimpleNamespace(collate=list), CollatingDataset)
