"""Export of a run's encoder to other frameworks (``vlmask export RUN_DIR --to hf-videomae --out DIR``).

:func:`export_hf_videomae` writes a run's student encoder as a Hugging Face ``VideoMAEModel``
folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) plus
``encoder.safetensors`` (:func:`export_timm_state_dict`) and ``vlmask_export.json``
(provenance), then loads it back with ``transformers`` and checks the features.
:func:`encoder_to_hf_videomae` is the conversion itself. Why the conversion is exact (the key
bias, the positions): vlmask_plugins.interop.hf_videomae; the import is hf_import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlmask.checkpoint import STEP_PREFIX
from vlmask.runs import open_run
from vlmask.types import IMAGENET_MEAN, IMAGENET_STD
from vlmask_plugins.encoders.vit import VideoViT
from vlmask_plugins.interop.hf_import import _HF_PARTS, InteropError


if TYPE_CHECKING:
    from transformers import VideoMAEConfig

#: Largest |difference| between vlmask's and the exported model's features the export accepts
#: in its own check (fp32, CPU); the tests hold small models to 1e-5.
EXPORT_TOLERANCE = 1e-4


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
