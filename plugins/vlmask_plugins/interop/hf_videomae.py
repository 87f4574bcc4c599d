"""Moving encoders in and out of vlmask: Hugging Face ``VideoMAEModel``, original VideoMAE
checkpoints and a timm-style state dict (the run's git commit: ``vlmask.provenance``).

Export (``vlmask export RUN_DIR --to hf-videomae --out DIR``)
    :func:`export_hf_videomae` writes a run's student encoder as a Hugging Face ``VideoMAEModel``
    folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) plus
    ``encoder.safetensors`` (:func:`export_timm_state_dict`) and ``vlmask_export.json``
    (provenance), then loads it back with ``transformers`` and checks the features.
    :func:`encoder_to_hf_videomae` is the conversion itself.

Import
    :func:`import_hf_videomae` builds a :class:`~vlmask_plugins.encoders.vit.VideoViT` from a
    Hugging Face VideoMAE folder; :func:`load_videomae_state_dict` loads an original VideoMAE
    ``.pth`` (or a Hugging Face / timm-style state dict) into an existing encoder, strictly by
    default, and returns a :class:`LoadReport`.

Two facts make the conversion exact:

* **Key bias.** vlmask (timm) has one fused ``qkv`` Linear with a bias on q, k and v. VideoMAE
  (original and Hugging Face) has q and v biases and *no* key bias. Dropping the key bias
  ``b_k`` changes no output: the score of query ``i`` and key ``j`` gains ``q_i . b_k``, the
  same for every key ``j`` of that query, and softmax over ``j`` is invariant to a constant
  shift. So the export drops ``b_k`` (the outputs are equal up to float rounding, checked) and
  the import sets it to zero.
* **Positions.** Both use VideoMAE's fixed 1-D sin-cos table over the (t, h, w)-ordered tokens,
  computed the same way (float64, cast to float32). Hugging Face VideoMAE has no learned
  positions, so an encoder with ``pos_embed="learned"`` is refused by the export.

The layouts differ: Hugging Face ``pixel_values`` are (B, T, C, H, W); vlmask takes
(B, C, T, H, W): ``hf_model(video.transpose(1, 2))`` equals ``encoder(video)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmask.checkpoint import STEP_PREFIX, CheckpointError
from vlmask.runs import open_run
from vlmask.types import IMAGENET_MEAN, IMAGENET_STD
from vlmask_plugins.encoders.vit import VideoViT, sinusoid_encoding_table

if TYPE_CHECKING:
    from transformers import VideoMAEConfig

#: Largest |difference| between vlmask's and the exported model's features the export accepts
#: in its own check (fp32, CPU); the tests hold small models to 1e-5.
EXPORT_TOLERANCE = 1e-4

#: ``pixel_values`` mean/std when neither the run's dataset nor its recipe says (ImageNet).

#: Top-level keys that wrap a state dict in training checkpoints, unwrapped in this order.
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state", "encoder_state")


class InteropError(ValueError):
    """A model or folder that cannot be converted; the message lists every reason."""


def read_config_json(path: Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` as a mapping. Why not ``json.loads`` alone: its message
    (``Expecting value: line 1 column 43``) names no file, and a model folder holds several JSON
    files; here any fault is one :class:`InteropError` line that names ``path``."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InteropError(f"{path}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise InteropError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not isinstance(config, dict):
        raise InteropError(f"{path}: a model config must be a JSON object of settings, got {type(config).__name__}")
    return config


class StateDictMismatchError(CheckpointError):
    """A checkpoint that does not fill the encoder exactly; ``report`` lists every key."""

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        hint = "nothing was loaded (pass strict=False to load the matching keys and get this report)"
        super().__init__(f"{report}\n{hint}")


# ============================================================================ encoder facts
@dataclass(frozen=True)
class EncoderShape:
    """The hyperparameters of a :class:`VideoViT`, read off the module itself."""

    num_frames: int
    img_size: int
    tubelet: int
    patch: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    intermediate_size: int
    qkv_bias: bool
    learned_positions: bool
    layer_norm_eps: float
    final_norm: bool

    @property
    def mlp_ratio(self) -> float:
        return self.intermediate_size / self.embed_dim


def encoder_shape(encoder: nn.Module) -> EncoderShape:
    """Read the architecture of a :class:`VideoViT` and refuse anything VideoMAE cannot express
    (layer scale, a non-GELU MLP, non-square frames, mixed LayerNorm eps), listing every reason."""
    problems: list[str] = []
    for attr in ("grid", "patch_embed", "blocks", "norm", "pos_embed"):
        if not hasattr(encoder, attr):
            raise InteropError(f"{type(encoder).__name__} is not a vlmask VideoViT (no attribute {attr!r})")
    grid = encoder.grid
    if grid.h != grid.w:
        problems.append(f"the token grid must be square, got {grid.h}x{grid.w}")
    blocks = list(encoder.blocks)
    if not blocks:
        problems.append("the encoder has no blocks")
        raise InteropError("; ".join(problems))
    first = blocks[0]
    eps_values: set[float] = set()
    for i, block in enumerate(blocks):
        for part in ("ls1", "ls2"):
            if not isinstance(getattr(block, part, nn.Identity()), nn.Identity):
                problems.append(f"blocks.{i}.{part}: layer scale has no VideoMAE equivalent")
        act = getattr(block.mlp, "act", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            problems.append(f"blocks.{i}.mlp.act: VideoMAE uses exact GELU, got {act}")
        if not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
            problems.append(f"blocks.{i}.mlp.norm: an MLP norm has no VideoMAE equivalent")
        for name in ("norm1", "norm2"):
            eps_values.add(float(getattr(block, name).eps))
        if block.attn.num_heads != first.attn.num_heads or block.mlp.fc1.out_features != first.mlp.fc1.out_features:
            problems.append(f"blocks.{i}: heads and MLP width must be the same in every block")
        if (block.attn.qkv.bias is None) != (first.attn.qkv.bias is None):
            problems.append(f"blocks.{i}.attn.qkv: qkv bias must be on in every block or in none")
    final_norm = isinstance(encoder.norm, nn.LayerNorm)
    if final_norm:
        eps_values.add(float(encoder.norm.eps))
    elif not isinstance(encoder.norm, nn.Identity):
        problems.append(f"norm: expected LayerNorm or Identity, got {type(encoder.norm).__name__}")
    if len(eps_values) > 1:
        problems.append(f"every LayerNorm must share one eps, got {sorted(eps_values)}")
    if problems:
        raise InteropError("cannot convert this encoder: " + "; ".join(problems))
    return EncoderShape(
        num_frames=grid.t * grid.tubelet,
        img_size=grid.h * grid.patch,
        tubelet=grid.tubelet,
        patch=grid.patch,
        in_chans=int(encoder.patch_embed.in_channels),
        embed_dim=int(encoder.patch_embed.out_channels),
        depth=len(blocks),
        num_heads=int(first.attn.num_heads),
        intermediate_size=int(first.mlp.fc1.out_features),
        qkv_bias=first.attn.qkv.bias is not None,
        learned_positions=isinstance(encoder.pos_embed, nn.Parameter),
        layer_norm_eps=eps_values.pop(),
        final_norm=final_norm,
    )


def _cpu_fp32(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


# ============================================================================ timm-style export
def export_timm_state_dict(encoder: VideoViT) -> dict[str, Tensor]:
    """The encoder's weights under timm ``VisionTransformer`` names, fp32 on the CPU.

    Keys (i over the blocks)::

        patch_embed.proj.weight        (D, C, tubelet, patch, patch)  Conv3d tubelet embedding
        patch_embed.proj.bias          (D,)
        pos_embed                      (1, N, D)  the position table the encoder adds (sin-cos or learned)
        blocks.{i}.norm1.weight/bias   (D,)
        blocks.{i}.attn.qkv.weight     (3D, D)    fused, rows [q; k; v]
        blocks.{i}.attn.qkv.bias       (3D,)      with the key bias (absent when qkv_bias=False)
        blocks.{i}.attn.proj.weight/bias
        blocks.{i}.norm2.weight/bias
        blocks.{i}.mlp.fc1.weight/bias (4D, D)
        blocks.{i}.mlp.fc2.weight/bias (D, 4D)
        norm.weight/bias               (D,)       final LayerNorm (absent when the encoder has none)

    Tokens are ordered (t, h, w). This is VideoMAE's fine-tuning layout with a fused qkv bias;
    :func:`load_videomae_state_dict` reads it back. ``export_hf_videomae`` writes it as
    ``encoder.safetensors`` with the architecture in the safetensors metadata.
    """
    encoder_shape(encoder)  # refuses what the names cannot describe
    state: dict[str, Tensor] = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("patch_embed."):
            key = "patch_embed.proj." + key.removeprefix("patch_embed.")
        state[key] = _cpu_fp32(value)
    state["pos_embed"] = _cpu_fp32(encoder.pos_embed)
    return state


def timm_metadata(encoder: VideoViT) -> dict[str, str]:
    """The architecture of ``encoder`` as safetensors metadata (strings) for ``encoder.safetensors``."""
    shape = encoder_shape(encoder)
    return {
        "format": "vlmask-video-vit-timm",
        "token_order": "t,h,w",
        "pixel_layout": "B,C,T,H,W",
        "num_frames": str(shape.num_frames),
        "img_size": str(shape.img_size),
        "tubelet": str(shape.tubelet),
        "patch": str(shape.patch),
        "in_chans": str(shape.in_chans),
        "embed_dim": str(shape.embed_dim),
        "depth": str(shape.depth),
        "num_heads": str(shape.num_heads),
        "mlp_ratio": repr(shape.mlp_ratio),
        "qkv_bias": str(shape.qkv_bias).lower(),
        "pos_embed": "learned" if shape.learned_positions else "sincos",
        "layer_norm_eps": repr(shape.layer_norm_eps),
    }


# ============================================================================ Hugging Face export
@cache
def _hf_bias_names() -> tuple[str, str]:
    """How the installed ``transformers`` names VideoMAE's q and v biases in a model's state dict:
    ``("query.bias", "value.bias")`` (transformers >= 5) or ``("q_bias", "v_bias")`` (4.x)."""
    from transformers import VideoMAEConfig, VideoMAEModel

    tiny = VideoMAEModel(VideoMAEConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4,
                                        image_size=2, patch_size=2, num_frames=2, tubelet_size=2, qkv_bias=True))
    keys = set(tiny.state_dict())
    prefix = "encoder.layer.0.attention.attention."
    if prefix + "query.bias" in keys:
        return "query.bias", "value.bias"
    if prefix + "q_bias" in keys:
        return "q_bias", "v_bias"
    found = sorted(k for k in keys if prefix in k)
    raise InteropError(f"unknown VideoMAE attention layout in this transformers version: {found}")


def hf_videomae_config(encoder: VideoViT) -> VideoMAEConfig:
    """The ``transformers.VideoMAEConfig`` of an encoder (refuses learned positions)."""
    from transformers import VideoMAEConfig

    shape = encoder_shape(encoder)
    if shape.learned_positions:
        raise InteropError(
            "cannot export learned position embeddings to Hugging Face VideoMAE: VideoMAEModel always adds its "
            "fixed sin-cos table. Train with model.encoder.pos_embed=sincos, or use encoder.safetensors "
            "(export_timm_state_dict), which keeps the learned table"
        )
    if not shape.final_norm:
        raise InteropError(
            "the encoder has no final LayerNorm; Hugging Face VideoMAEModel with use_mean_pooling=False has one"
        )
    return VideoMAEConfig(
        image_size=shape.img_size,
        patch_size=shape.patch,
        num_channels=shape.in_chans,
        num_frames=shape.num_frames,
        tubelet_size=shape.tubelet,
        hidden_size=shape.embed_dim,
        num_hidden_layers=shape.depth,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=shape.layer_norm_eps,
        qkv_bias=shape.qkv_bias,
        use_mean_pooling=False,  # VideoMAEModel then applies the final `layernorm`, as vlmask's `norm`
        architectures=["VideoMAEModel"],
    )


def encoder_to_hf_videomae(encoder: VideoViT) -> tuple[VideoMAEConfig, dict[str, Tensor]]:
    """``(config, state_dict)`` of a ``transformers.VideoMAEModel`` computing the same features.

    The state dict uses the installed transformers' own key names (``VideoMAEModel(config)
    .load_state_dict(state, strict=True)`` succeeds); fp32 on the CPU. The key bias of the fused
    qkv is dropped, which changes no output (see the module docstring).
    """
    config = hf_videomae_config(encoder)
    qkv_bias = encoder_shape(encoder).qkv_bias  # VideoMAEConfig keeps it only as a constructor argument
    q_bias_name, v_bias_name = _hf_bias_names()
    dim = config.hidden_size
    own = encoder.state_dict()
    state: dict[str, Tensor] = {
        "embeddings.patch_embeddings.projection.weight": _cpu_fp32(own["patch_embed.weight"]),
        "embeddings.patch_embeddings.projection.bias": _cpu_fp32(own["patch_embed.bias"]),
        "layernorm.weight": _cpu_fp32(own["norm.weight"]),
        "layernorm.bias": _cpu_fp32(own["norm.bias"]),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        attention = dst + "attention.attention."
        q_weight, k_weight, v_weight = own[src + "attn.qkv.weight"].split(dim, dim=0)
        state[attention + "query.weight"] = _cpu_fp32(q_weight)
        state[attention + "key.weight"] = _cpu_fp32(k_weight)
        state[attention + "value.weight"] = _cpu_fp32(v_weight)
        if qkv_bias:
            q_bias, _key_bias, v_bias = own[src + "attn.qkv.bias"].split(dim, dim=0)  # key bias: softmax-invariant
            state[attention + q_bias_name] = _cpu_fp32(q_bias)
            state[attention + v_bias_name] = _cpu_fp32(v_bias)
        for theirs, ours in _HF_PARTS.items():
            for param in ("weight", "bias"):
                state[f"{dst}{theirs}.{param}"] = _cpu_fp32(own[f"{src}{ours}.{param}"])
    return config, state


def hf_videomae_model(encoder: VideoViT) -> nn.Module:
    """A ``transformers.VideoMAEModel`` (eval mode, fp32, CPU) with the encoder's weights, loaded strictly."""
    from transformers import VideoMAEModel

    config, state = encoder_to_hf_videomae(encoder)
    model = VideoMAEModel(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _cpu_copy(encoder: VideoViT) -> VideoViT:
    import copy

    clone = copy.deepcopy(encoder).to("cpu", torch.float32).eval()
    if hasattr(clone, "set_attention_backend"):
        clone.set_attention_backend("sdpa", device="cpu")
    return clone


def compare_with_hf(encoder: VideoViT, hf_model: nn.Module, clips: int = 1, seed: int = 0) -> float:
    """Largest |difference| of token features between ``encoder`` and a Hugging Face VideoMAE
    model on the same random clips (fp32, CPU). ``pixel_values`` are passed as (B, T, C, H, W)."""
    shape = encoder_shape(encoder)
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(clips, shape.in_chans, shape.num_frames, shape.img_size, shape.img_size, generator=generator)
    ours = _cpu_copy(encoder)
    hf_model = hf_model.to("cpu", torch.float32).eval()
    with torch.no_grad():
        expected = ours(video)
        got = hf_model(pixel_values=video.transpose(1, 2)).last_hidden_state
    if got.shape != expected.shape:
        raise InteropError(f"feature shapes differ: vlmask {tuple(expected.shape)}, transformers {tuple(got.shape)}")
    return float((got - expected).abs().max())


@dataclass(frozen=True)
class Preprocessing:
    """How the run's dataset turned decoded frames into the encoder's input."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int
    source: str  # where the values came from


def dataset_preprocessing(recipe: Any, dataset: Any = None, registry: Any = None) -> Preprocessing:
    """mean, std and size of the recipe's dataset node ``data.dataset``.

    Each value comes from, in order: the built dataset (``dataset.mean`` ...), the recipe node,
    the registered dataset factory's default, ImageNet statistics (mean/std only).
    """
    node = recipe.get("data.dataset") or {}
    defaults: dict[str, Any] = {}
    if registry is not None and isinstance(node, dict) and node.get("name"):
        import inspect

        try:
            factory = registry.get("dataset", node["name"]).factory
            defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items()
                        if p.default is not inspect.Parameter.empty}
        except Exception:  # noqa: BLE001 (an unknown dataset only loses the defaults)
            defaults = {}
    sources: list[str] = []

    def pick(name: str, fallback: Any) -> Any:
        if dataset is not None and getattr(dataset, name, None) is not None:
            sources.append(f"{name}: dataset")
            return getattr(dataset, name)
        if name in node:
            sources.append(f"{name}: recipe data.dataset.{name}")
            return node[name]
        if name in defaults:
            sources.append(f"{name}: {node.get('name')} default")
            return defaults[name]
        sources.append(f"{name}: fallback")
        return fallback

    mean = tuple(float(m) for m in pick("mean", IMAGENET_MEAN))
    std = tuple(float(s) for s in pick("std", IMAGENET_STD))
    size = pick("size", None)
    if len(mean) != 3 or len(std) != 3:
        raise InteropError(f"data.dataset mean/std must have 3 values, got mean={mean}, std={std}")
    return Preprocessing(mean, std, int(size) if size is not None else 0, "; ".join(sources))  # type: ignore[arg-type]


def hf_image_processor(preprocessing: Preprocessing, size: int) -> Any:
    """A ``VideoMAEImageProcessor`` doing what vlmask's evaluation transform does: resize the short
    side to ``size`` (bilinear), centre-crop ``size`` x ``size``, scale to [0, 1], normalise."""
    from transformers import VideoMAEImageProcessor

    return VideoMAEImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=2,  # PIL bilinear
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(preprocessing.mean),
        image_std=list(preprocessing.std),
    )


def save_hf_videomae(encoder: VideoViT, out: Path, preprocessing: Preprocessing | None = None,
                     verify: bool = True, extra_info: dict[str, Any] | None = None) -> Path:
    """Write ``encoder`` into ``out`` as a Hugging Face VideoMAE folder (see :func:`export_hf_videomae`).

    With ``verify`` the folder is loaded back with ``VideoMAEModel.from_pretrained`` and must
    report no missing, unexpected or mismatched key and give the encoder's features within
    :data:`EXPORT_TOLERANCE`; otherwise :class:`InteropError`.
    """
    from safetensors.torch import save_file
    from transformers import VideoMAEModel

    out = Path(out)
    shape = encoder_shape(encoder)
    model = hf_videomae_model(encoder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    preprocessing = preprocessing or Preprocessing(IMAGENET_MEAN, IMAGENET_STD, shape.img_size, "ImageNet defaults")
    hf_image_processor(preprocessing, shape.img_size).save_pretrained(out)
    save_file(export_timm_state_dict(encoder), str(out / "encoder.safetensors"), metadata=timm_metadata(encoder))
    info: dict[str, Any] = {
        "format": "hf-videomae",
        "pixel_values": "(B, T, C, H, W); vlmask takes (B, C, T, H, W)",
        "preprocessing": {"mean": preprocessing.mean, "std": preprocessing.std, "size": shape.img_size,
                          "source": preprocessing.source},
        "key_bias": "dropped: q.b_k is the same for every key of a query, so softmax ignores it",
        "files": {"model.safetensors": "transformers VideoMAEModel", "encoder.safetensors": "timm-style state dict"},
        **(extra_info or {}),
    }
    if verify:
        loaded, loading = VideoMAEModel.from_pretrained(out, output_loading_info=True)
        bad = {k: sorted(map(str, v)) for k, v in loading.items() if v}
        if bad:
            raise InteropError(f"{out}: transformers reports problems loading the export: {bad}")
        difference = compare_with_hf(encoder, loaded)
        if not difference <= EXPORT_TOLERANCE:
            raise InteropError(
                f"{out}: exported features differ from vlmask's by {difference:.3g} (> {EXPORT_TOLERANCE})"
            )
        info["verified"] = {"max_abs_difference": difference,
                            "loading_info": "no missing, unexpected or mismatched keys"}
    (out / "vlmask_export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out


def export_hf_videomae(run_dir: Path, out: Path, verify: bool = True) -> Path:
    """Export the student encoder of a run's latest checkpoint as a Hugging Face VideoMAE folder.

    Writes into ``out``: ``config.json`` and ``model.safetensors`` (``VideoMAEModel.save_pretrained``),
    ``preprocessor_config.json`` (``VideoMAEImageProcessor`` with the mean, std and size of the
    recipe's ``data.dataset`` node, its factory's defaults where the node does not set them),
    ``encoder.safetensors`` (:func:`export_timm_state_dict`) and ``vlmask_export.json`` (source
    run, checkpoint, the check's result). With ``verify`` (default) the folder is loaded back with
    ``transformers`` and its features compared (see :func:`save_hf_videomae`). Returns ``out``.

    Raises :class:`InteropError` for an encoder VideoMAE cannot express (learned positions),
    ``FileNotFoundError`` for a folder that is not a run and
    :class:`~vlmask.checkpoint.CheckpointError` for a run without a (matching) checkpoint.
    """
    run = open_run(run_dir, ["device=cpu"])
    encoder, recipe, checkpoint = run.encoder, run.recipe, run.checkpoint
    preprocessing = dataset_preprocessing(recipe, None, run.plugins.registry)
    step = checkpoint.name.removeprefix(STEP_PREFIX)
    extra = {
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": str(checkpoint),
        "step": int(step) if step.isdigit() else None,
        "recipe": str(recipe.get("record.recipe") or recipe.path),
    }
    return save_hf_videomae(encoder, Path(out), preprocessing, verify=verify, extra_info=extra)


# ============================================================================ reading state dicts
@dataclass
class LoadReport:
    """What happened to every key of a checkpoint loaded into an encoder.

    ``missing``: encoder keys the checkpoint did not fill. ``unexpected``: checkpoint keys (their
    own names) that map to nothing in the encoder. ``mismatched``: (encoder key, checkpoint
    shape, encoder shape). ``ignored``: keys outside the encoder in a checkpoint that holds more
    (a pretraining decoder, a classifier), never loaded. ``notes``: conversions done
    (bias fusion, position interpolation).
    """

    source: str
    format: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every encoder key filled, every checkpoint key used (ignored ones aside), no shape mismatch."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        head = f"{self.source} ({self.format or 'state dict'}): "
        head += "loads exactly" if self.ok else "does not match the encoder"
        lines = [head, f"  loaded: {len(self.loaded)} keys"]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  shape {k}: checkpoint {c} vs encoder {m}" for k, c, m in self.mismatched]
        if self.ignored:
            more = f", ... {len(self.ignored) - 8} more" if len(self.ignored) > 8 else ""
            shown = ", ".join(self.ignored[:8]) + more
            lines.append(f"  ignored (not part of the encoder): {len(self.ignored)} keys: {shown}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def read_state_dict(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """A flat ``{name: tensor}`` from a path (``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True``) or a mapping, with ``model``/``module``/``state_dict`` wrappers and a
    DDP ``module.`` prefix removed. Returns ``(state, description)``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        if path.suffix == ".safetensors":
            from vlmask.checkpoint import load_tensors

            obj: Any = load_tensors(path)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 (any unpickling failure is reported with the file)
                raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc}); weights_only=True loading "
                                      "refuses pickled objects other than tensors and plain containers") from None
        description = str(path)
    else:
        obj, description = source, "state dict"
    unwrapped: list[str] = []
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        unwrapped.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{description}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if not state:
        raise CheckpointError(f"{description}: no tensors found (top-level keys: {sorted(map(str, obj))[:20]})")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if unwrapped:
        description += f" [{'/'.join(unwrapped)}]"
    if skipped:
        description += f" (non-tensor entries skipped: {', '.join(skipped[:5])})"
    return state, description


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_PARTS = {
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_QKV = {
    "attention.attention.query.weight": ("q", "weight"),
    "attention.attention.key.weight": ("k", "weight"),
    "attention.attention.value.weight": ("v", "weight"),
    "attention.attention.query.bias": ("q", "bias"),
    "attention.attention.q_bias": ("q", "bias"),
    "attention.attention.key.bias": ("k", "bias"),
    "attention.attention.value.bias": ("v", "bias"),
    "attention.attention.v_bias": ("v", "bias"),
}


def _is_hf(state: Mapping[str, Tensor]) -> bool:
    return any(re.match(r"^(videomae\.)?(embeddings\.patch_embeddings\.|encoder\.layer\.\d+\.)", k) for k in state)


def _split_encoder(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], str, str]:
    """The encoder's part of a checkpoint (prefix removed), the keys outside it, the format's
    name and the prefix."""
    if _is_hf(state):
        prefix = "videomae." if any(k.startswith("videomae.") for k in state) else ""
        fmt = "Hugging Face VideoMAE"
    elif any(k.startswith("encoder.") for k in state):
        prefix, fmt = "encoder.", "VideoMAE pretraining checkpoint (encoder.*)"
    else:
        prefix, fmt = "", "VideoMAE / timm encoder"
    if not prefix:
        return dict(state), [], fmt, prefix
    inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    outside = sorted(k for k in state if not k.startswith(prefix))
    return inside, outside, fmt, prefix


@dataclass
class _Mapped:
    """A checkpoint rewritten into vlmask's names: key -> (tensor, the checkpoint keys it came from)."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    origin: dict[str, list[str]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def put(self, key: str, value: Tensor, *sources: str) -> None:
        self.tensors[key] = value
        self.origin[key] = list(sources)


def _fuse_qkv(mapped: _Mapped, block: str, parts: dict[str, dict[str, tuple[str, Tensor]]]) -> None:
    """Fill ``{block}attn.qkv.weight/bias`` from separate q/k/v tensors (a missing key bias is zero).

    ``parts[kind][which] = (checkpoint key, tensor)`` with kind "weight"/"bias" and which "q"/"k"/"v".
    Incomplete or mis-shaped sets are left unused (so they are reported).
    """
    weights = parts.get("weight", {})
    if set(weights) == {"q", "k", "v"} and len({weights[p][1].shape for p in "qkv"}) == 1:
        fused = torch.cat([weights[p][1] for p in "qkv"], 0)
        mapped.put(block + "attn.qkv.weight", fused, *(weights[p][0] for p in "qkv"))
    else:
        mapped.unused += [key for key, _ in weights.values()]
    biases = parts.get("bias", {})
    if not biases:
        return
    if "q" in biases and "v" in biases and biases["q"][1].shape == biases["v"][1].shape:
        zero_key_bias = "k" not in biases
        k_key, k = biases.get("k", ("", torch.zeros_like(biases["q"][1])))
        if k.shape == biases["q"][1].shape:
            sources = [biases["q"][0], *([k_key] if k_key else []), biases["v"][0]]
            mapped.put(block + "attn.qkv.bias", torch.cat([biases["q"][1], k, biases["v"][1]], 0), *sources)
            if zero_key_bias:
                mapped.notes.append("qkv bias: q and v biases fused with a zero key bias (VideoMAE has no key bias)")
            return
    mapped.unused += [key for key, _ in biases.values()]


def _map_hf(state: dict[str, Tensor]) -> _Mapped:
    mapped = _Mapped()
    qkv: dict[int, dict[str, dict[str, tuple[str, Tensor]]]] = {}
    for key, value in state.items():
        if key.startswith("embeddings.patch_embeddings.projection."):
            mapped.put("patch_embed." + key.rsplit(".", 1)[1], value, key)
        elif key in ("layernorm.weight", "layernorm.bias"):
            mapped.put("norm." + key.rsplit(".", 1)[1], value, key)
        elif key in ("embeddings.position_embeddings", "position_embeddings"):
            mapped.put("pos_embed", value, key)
        elif (match := _HF_LAYER.match(key)) is not None:
            layer, rest = int(match[1]), match[2]
            if rest in _HF_QKV:
                which, kind = _HF_QKV[rest]
                qkv.setdefault(layer, {}).setdefault(kind, {})[which] = (key, value)
                continue
            part, _, param = rest.rpartition(".")
            if part in _HF_PARTS:
                mapped.put(f"blocks.{layer}.{_HF_PARTS[part]}.{param}", value, key)
            else:
                mapped.unused.append(key)
        else:
            mapped.unused.append(key)
    for layer, parts in sorted(qkv.items()):
        _fuse_qkv(mapped, f"blocks.{layer}.", parts)
    return mapped


_VIDEOMAE_BLOCK = re.compile(r"^blocks\.(\d+)\.attn\.(q_bias|v_bias|k_bias)$")


def _map_videomae(state: dict[str, Tensor]) -> _Mapped:
    mapped = _Mapped()
    split_biases: dict[int, dict[str, dict[str, tuple[str, Tensor]]]] = {}
    for key, value in state.items():
        if key.startswith("patch_embed.proj."):
            mapped.put("patch_embed." + key.removeprefix("patch_embed.proj."), value, key)
        elif (match := _VIDEOMAE_BLOCK.match(key)) is not None:
            split_biases.setdefault(int(match[1]), {}).setdefault("bias", {})[match[2][0]] = (key, value)
        else:
            mapped.put(key, value, key)
    for layer, parts in sorted(split_biases.items()):
        if f"blocks.{layer}.attn.qkv.bias" in mapped.tensors:  # both a fused and a split bias: keep the fused one
            mapped.unused += [key for key, _ in parts["bias"].values()]
            continue
        _fuse_qkv(mapped, f"blocks.{layer}.", parts)
    return mapped


def infer_source_grid(num_tokens: int, target: Any) -> tuple[int, int, int]:
    """(t, h, w) of a stored position table of ``num_tokens`` rows, assuming a square frame:
    the target's t when that leaves a square, else the target's h*w, else the only candidate."""
    def square(n: int) -> int | None:
        root = math.isqrt(n)
        return root if root * root == n else None

    if num_tokens % target.t == 0 and (side := square(num_tokens // target.t)):
        return target.t, side, side
    if num_tokens % target.spatial == 0:
        return num_tokens // target.spatial, target.h, target.w
    candidates = [(t, side, side) for t in range(1, num_tokens + 1)
                  if num_tokens % t == 0 and (side := square(num_tokens // t))]
    if len(candidates) == 1:
        return candidates[0]
    raise InteropError(f"cannot tell the token grid of a {num_tokens}-row position table (candidates t,h,w: "
                       f"{candidates}); pass source_grid=(t, h, w)")


def interpolate_positions(table: Tensor, source: tuple[int, int, int], target: tuple[int, int, int]) -> Tensor:
    """Trilinear resize of a (1, t*h*w, D) position table over its (t, h, w) grid (tokens in
    (t, h, w) order, as VideoMAE's fine-tuning code does for learned tables)."""
    t, h, w = source
    dim = table.shape[-1]
    grid = table.reshape(1, t, h, w, dim).permute(0, 4, 1, 2, 3).float()
    resized = F.interpolate(grid, size=target, mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(table.dtype)


def _positions(
    mapped: _Mapped, encoder: nn.Module, report: LoadReport, source_grid: tuple[int, int, int] | None
) -> None:
    """Load, interpolate, recompute or refuse the checkpoint's ``pos_embed`` for ``encoder``."""

    if "pos_embed" not in mapped.tensors:
        return
    table = mapped.tensors.pop("pos_embed")
    origin = mapped.origin.pop("pos_embed")
    if table.ndim == 2:
        table = table.unsqueeze(0)
    grid = encoder.grid
    learned = isinstance(encoder.pos_embed, nn.Parameter)
    if table.ndim != 3 or table.shape[0] != 1:
        report.mismatched.append(("pos_embed", tuple(table.shape), tuple(encoder.pos_embed.shape)))
        return
    num_tokens, dim = table.shape[1], table.shape[2]
    is_sincos = torch.allclose(table[0].float(), sinusoid_encoding_table(num_tokens, dim), atol=1e-4)
    if not learned:
        if is_sincos:
            if num_tokens == grid.num_tokens:
                report.notes.append("pos_embed: the stored sin-cos table equals the encoder's fixed one; not loaded")
            else:
                report.notes.append(f"pos_embed: the stored sin-cos table ({num_tokens} tokens) is not loaded; "
                                    f"the encoder's own is computed for its {grid.num_tokens} tokens")
            report.ignored.append(origin[0])
        else:
            hint = "learned positions; build the encoder with pos_embed='learned' to load them"
            report.unexpected.append(f"{origin[0]} ({hint})")
        return
    if dim != encoder.pos_embed.shape[-1]:
        report.mismatched.append(("pos_embed", tuple(table.shape), tuple(encoder.pos_embed.shape)))
        return
    if num_tokens != grid.num_tokens:
        if is_sincos:
            table = sinusoid_encoding_table(grid.num_tokens, dim)[None]
            report.notes.append(
                f"pos_embed: sin-cos table recomputed for {grid.num_tokens} tokens (checkpoint: {num_tokens})"
            )
        else:
            old = source_grid or infer_source_grid(num_tokens, grid)
            if old[0] * old[1] * old[2] != num_tokens:
                count = old[0] * old[1] * old[2]
                raise InteropError(f"source_grid {old} has {count} tokens, the table has {num_tokens}")
            table = interpolate_positions(table, old, (grid.t, grid.h, grid.w))
            report.notes.append(f"pos_embed: interpolated trilinearly from {old[0]}x{old[1]}x{old[2]} "
                                f"to {grid.t}x{grid.h}x{grid.w} (t x h x w)")
    mapped.put("pos_embed", table, *origin)


def load_videomae_state_dict(
    encoder: VideoViT,
    state_dict_or_path: str | Path | Mapping[str, Any],
    strict: bool = True,
    source_grid: tuple[int, int, int] | None = None,
) -> LoadReport:
    """Load VideoMAE weights into a vlmask encoder and report what happened to every key.

    Reads an original VideoMAE checkpoint (``.pth``, read with ``weights_only=True``; ``model`` /
    ``module`` wrappers, a DDP ``module.`` prefix and, for a pretraining checkpoint, the
    ``encoder.`` prefix are handled: the decoder side is listed as ignored), a Hugging Face
    VideoMAE state dict (``model.safetensors``, optionally ``videomae.``-prefixed), or the
    timm-style ``encoder.safetensors`` of an export. Conversions: ``patch_embed.proj`` ->
    ``patch_embed``; ``q_bias``/``v_bias`` -> the fused qkv bias with a zero key bias; separate
    Hugging Face q/k/v -> fused qkv; a stored position table is interpolated trilinearly over
    (t, h, w) when the grid differs (learned encoder; ``source_grid`` when it cannot be told),
    and a stored sin-cos table is recomputed for the encoder's grid.

    ``strict`` (default): any missing, unexpected or mis-shaped key raises
    :class:`StateDictMismatchError` listing them all, and nothing is loaded. ``strict=False``
    loads the keys that match and returns the report of the rest; check ``report.ok``.
    """
    state, description = read_state_dict(state_dict_or_path)
    encoder_state, outside, fmt, prefix = _split_encoder(state)
    mapped = _map_hf(encoder_state) if fmt.startswith("Hugging Face") else _map_videomae(encoder_state)
    # report keys under the checkpoint's own names
    mapped.origin = {k: [prefix + name for name in names] for k, names in mapped.origin.items()}
    mapped.unused = [prefix + name for name in mapped.unused]
    report = LoadReport(source=description, format=fmt, ignored=list(outside))
    _positions(mapped, encoder, report, source_grid)
    report.notes = [*dict.fromkeys(mapped.notes), *report.notes]
    own = encoder.state_dict()
    report.unexpected += list(mapped.unused)
    matched: dict[str, Tensor] = {}
    for key, value in mapped.tensors.items():
        if key not in own:
            report.unexpected += mapped.origin[key]
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            matched[key] = value
    shaped = {k for k, _, _ in report.mismatched}
    report.missing = sorted(k for k in own if k not in matched and k not in shaped)
    report.unexpected = sorted(dict.fromkeys(report.unexpected))
    report.loaded = sorted(matched)
    if strict and not report.ok:
        raise StateDictMismatchError(report)
    with torch.no_grad():
        encoder.load_state_dict(matched, strict=False)
    return report


# ============================================================================ Hugging Face import
def _hf_weights(folder: Path) -> dict[str, Tensor]:
    from vlmask.checkpoint import load_tensors

    single = folder / "model.safetensors"
    if single.is_file():
        return load_tensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_tensors(folder / shard))
        return state
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return read_state_dict(legacy)[0]
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise InteropError(f"config {name} must be square for a vlmask VideoViT, got {value}")
        value = value[0]
    return int(value)


def import_hf_videomae(path_or_dir: str | Path, attention: str = "auto") -> VideoViT:
    """A vlmask :class:`VideoViT` with the weights of a Hugging Face VideoMAE folder
    (``config.json`` + ``model.safetensors``; a ``VideoMAEModel``, ``VideoMAEForPreTraining`` or
    ``VideoMAEForVideoClassification`` checkpoint: only the ``VideoMAEModel`` part is used).

    The result computes ``hf_model(pixel_values).last_hidden_state`` for video (B, C, T, H, W) =
    ``pixel_values.transpose(1, 2)``. Loading is strict (:class:`StateDictMismatchError` listing
    every key otherwise). The config's ``layer_norm_eps`` is kept (set on every LayerNorm); with
    ``use_mean_pooling=True`` the model has no final LayerNorm and ``encoder.norm`` is an Identity.
    """

    folder = Path(path_or_dir)
    if folder.is_file():
        folder = folder.parent
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = read_config_json(config_path)
    if config.get("model_type") not in (None, "videomae"):
        raise InteropError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'videomae'")
    problems = []
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {config['hidden_act']!r} (vlmask's VideoViT uses exact GELU)")
    hidden = int(config.get("hidden_size", 768))
    intermediate = int(config.get("intermediate_size", 3072))
    mlp_ratio = intermediate / hidden
    if int(hidden * mlp_ratio) != intermediate:
        problems.append(f"intermediate_size {intermediate} is not int(hidden_size * ratio) for any ratio")
    if problems:
        raise InteropError(f"{config_path}: cannot build a VideoViT: " + "; ".join(problems))
    qv_bias = bool(config.get("qv_bias", config.get("qkv_bias", True)))
    encoder = VideoViT(
        num_frames=int(config.get("num_frames", 16)),
        img_size=_square(config.get("image_size", 224), "image_size"),
        tubelet=int(config.get("tubelet_size", 2)),
        patch=_square(config.get("patch_size", 16), "patch_size"),
        in_chans=int(config.get("num_channels", 3)),
        embed_dim=hidden,
        depth=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 12)),
        mlp_ratio=mlp_ratio,
        qkv_bias=qv_bias,
        pos_embed="sincos",
        attention=attention,
    )
    eps = float(config.get("layer_norm_eps", 1e-12))
    for module in encoder.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps
    if bool(config.get("use_mean_pooling", True)):
        encoder.norm = nn.Identity()
    load_videomae_state_dict(encoder, _hf_weights(folder), strict=True)
    return encoder.eval()
