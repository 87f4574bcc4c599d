"""Import of encoders into vlmask: Hugging Face VideoMAE folders and original VideoMAE (or
timm-style) checkpoints.

:func:`import_hf_videomae` builds a :class:`~vlmask_plugins.encoders.vit.VideoViT` from a
Hugging Face VideoMAE folder; :func:`load_videomae_state_dict` loads an original VideoMAE
``.pth`` (or a Hugging Face / timm-style state dict) into an existing encoder, strictly by
default, and returns a :class:`LoadReport`. Why the conversion is exact (the key bias, the
positions): vlmask_plugins.interop.hf_videomae; the export is hf_export. The errors of both
directions (:class:`InteropError`) are defined here, with the reading of files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmask.checkpoint import CheckpointError
from vlmask_plugins.encoders.vit import VideoViT, sinusoid_encoding_table

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
