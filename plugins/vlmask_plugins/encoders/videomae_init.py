"""Continue pretraining from a released VideoMAE checkpoint: encoder AND decoder.

VideoMAE (Tong et al., NeurIPS 2022) releases pretraining checkpoints in two forms:

- the original code's ``.pth`` (``run_mae_pretraining.py``): a ``model`` (or ``module``) dict
  with ``encoder.*`` (the video ViT), ``encoder_to_decoder.weight``, ``mask_token`` and
  ``decoder.*`` (``decoder.blocks.i.*``, ``decoder.norm.*``, ``decoder.head.*``);
- a Hugging Face ``VideoMAEForPreTraining`` folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``): ``videomae.*``, ``encoder_to_decoder.weight``, ``mask_token``,
  ``decoder.decoder_layers.i.*``, ``decoder.norm.*``, ``decoder.head.*``.

:func:`load_videomae_pretraining` loads either into the MAE recipe's encoder
(:class:`~vlmask_plugins.encoders.vit.VideoViT`) and predictor
(:class:`~vlmask_plugins.encoders.predictor.TransformerPredictor` with ``output: pixels``),
strictly: every key of both models is filled and every key of the checkpoint is used, or
nothing is loaded and :class:`VideoMAEInitError` names the first problem (a size mismatch
first) and lists every key. Both sin-cos position tables are fixed functions of the grid and
width, so they are not stored (a stored sin-cos table is checked and recomputed).

The key mapping of the encoder (and of the decoder's blocks, which have the encoder blocks'
layout) is :func:`vlmask_plugins.interop.hf_videomae.load_videomae_state_dict`: imported in this one place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmask_plugins.interop.hf_videomae import LoadReport, load_videomae_state_dict, read_config_json, read_state_dict

#: Keys of the decoder side, per format: (regex on the checkpoint key, rewrite into the
#: encoder-block layout that ``load_videomae_state_dict`` reads, or None for the single tensors).
_HF_DECODER_LAYER = re.compile(r"^decoder\.decoder_layers\.(\d+)\.(.+)$")
_ORIGINAL_DECODER_BLOCK = re.compile(r"^decoder\.blocks\.(\d+)\.(.+)$")


class VideoMAEInitError(ValueError):
    """A VideoMAE checkpoint that does not fit the recipe's encoder and predictor."""


@dataclass
class VideoMAEInitReport:
    """What happened to every key: ``encoder`` and ``decoder`` reports, and the format."""

    source: str
    format: str
    encoder: LoadReport
    decoder: LoadReport

    @property
    def ok(self) -> bool:
        return self.encoder.ok and self.decoder.ok

    def first_problem(self) -> str:
        """The first size mismatch (encoder first), else the first missing or unexpected key."""
        for part, report in (("encoder", self.encoder), ("predictor", self.decoder)):
            if report.mismatched:
                key, stored, own = report.mismatched[0]
                return f"{part} key {key}: checkpoint {stored} vs recipe {own}"
        for part, report in (("encoder", self.encoder), ("predictor", self.decoder)):
            if report.missing:
                return f"{part} key {report.missing[0]} is not in the checkpoint"
            if report.unexpected:
                return f"checkpoint key {report.unexpected[0]} has no place in the {part}"
        return "none"

    def __str__(self) -> str:
        return f"{self.source} ({self.format})\n[encoder] {self.encoder}\n[predictor] {self.decoder}"


def read_videomae_checkpoint(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """``(state, description, hf_config)`` of a Hugging Face folder, a checkpoint file or a mapping.

    A folder needs ``model.safetensors`` or ``pytorch_model.bin`` (its ``config.json``, when
    present, is returned as ``hf_config``); a file is read by
    :func:`vlmask_plugins.interop.hf_videomae.read_state_dict` (``model``/``module`` wrappers removed).
    """
    config: dict[str, Any] = {}
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        folder = Path(source)
        weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (a Hugging Face folder?)")
        if (folder / "config.json").is_file():
            config = read_config_json(folder / "config.json")  # a fault is one line naming the file
        state, description = read_state_dict(weights)
        return state, description, config
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such checkpoint file or folder")
    state, description = read_state_dict(source)
    return state, description, config


def checkpoint_format(state: Mapping[str, Tensor]) -> str:
    """``"hf"`` (``videomae.*``), ``"original"`` (``encoder.*``), else an error naming what was found."""
    if any(k.startswith("videomae.") for k in state):
        return "hf"
    if any(k.startswith("encoder.") for k in state) and any(k.startswith("decoder.") for k in state):
        return "original"
    shown = ", ".join(sorted(state)[:6])
    raise VideoMAEInitError(
        "not a VideoMAE pretraining checkpoint (expected videomae.* or encoder.* and decoder.* keys, "
        f"found {shown} ...)"
    )


class _DecoderBody(nn.Module):
    """The predictor's blocks and final norm under the encoder's names (``blocks.*``, ``norm.*``),
    sharing the predictor's modules, so that the encoder key mapping loads them."""

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.blocks = predictor.blocks
        self.norm = predictor.norm
        self.grid = predictor.grid
        self.pos_embed = predictor.pos_embed  # a fixed sin-cos buffer: a stored table is checked, never loaded


def _decoder_body_state(state: Mapping[str, Tensor], fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The decoder blocks and norm renamed into the encoder layout of the same format, and the
    map back to the checkpoint's names (for the report)."""
    body: dict[str, Tensor] = {}
    back: dict[str, str] = {}
    for key, value in state.items():
        if fmt == "hf":
            match = _HF_DECODER_LAYER.match(key)
            renamed = f"encoder.layer.{match[1]}.{match[2]}" if match else None
            if key.startswith("decoder.norm."):
                renamed = "layernorm." + key.removeprefix("decoder.norm.")
        else:
            match = _ORIGINAL_DECODER_BLOCK.match(key)
            renamed = f"blocks.{match[1]}.{match[2]}" if match else None
            if key.startswith("decoder.norm."):
                renamed = "norm." + key.removeprefix("decoder.norm.")
        if renamed is not None:
            body[renamed] = value
            back[renamed] = key
    return body, back


def _rename(names: list[str], back: Mapping[str, str]) -> list[str]:
    return [back.get(n.split(" ")[0], n) for n in names]


def _decoder_report(
    predictor: nn.Module, state: Mapping[str, Tensor], fmt: str, description: str
) -> tuple[LoadReport, dict[str, Tensor]]:
    """Map the decoder side onto the predictor: (report, tensors to load under the predictor's names)."""
    body_state, back = _decoder_body_state(state, fmt)
    body = _DecoderBody(predictor)
    body_report = load_videomae_state_dict(body, body_state, strict=False) if body_state else None
    own = predictor.state_dict()
    report = LoadReport(source=description, format="VideoMAE decoder")
    to_load: dict[str, Tensor] = {}
    singles = {"encoder_to_decoder.weight": "embed.weight", "mask_token": "mask_token",
               "decoder.head.weight": "head.weight", "decoder.head.bias": "head.bias"}  # fmt: skip
    for stored_key, own_key in singles.items():
        if stored_key not in state:
            continue
        value = state[stored_key]
        if tuple(value.shape) != tuple(own[own_key].shape):
            report.mismatched.append((own_key, tuple(value.shape), tuple(own[own_key].shape)))
        else:
            to_load[own_key] = value
    if body_report is not None:
        report.mismatched += body_report.mismatched
        report.unexpected += _rename(body_report.unexpected, back)
        report.notes += body_report.notes
        # the body was loaded (non-strictly) into the predictor's own modules: only count its keys
        body_loaded = set(body_report.loaded)
    else:
        body_loaded = set()
    decoder_keys = {k for k in state if k.startswith("decoder.") or k in singles}
    used = {back[k] for k in body_state if k in back} | {k for k in singles if k in state}
    report.unexpected += sorted(k for k in decoder_keys - used)
    filled = set(to_load) | body_loaded
    shaped = {k for k, _, _ in report.mismatched}
    report.missing = sorted(k for k in own if k not in filled and k not in shaped)
    report.unexpected = sorted(dict.fromkeys(report.unexpected))
    report.loaded = sorted(filled)
    return report, to_load


def load_videomae_pretraining(
    encoder: nn.Module, predictor: nn.Module, source: str | Path | Mapping[str, Any]
) -> VideoMAEInitReport:
    """Load a VideoMAE pretraining checkpoint (original ``.pth`` or Hugging Face
    ``VideoMAEForPreTraining`` folder / state dict) into ``encoder`` and ``predictor``, strictly.

    Returns the report of every key; raises :class:`VideoMAEInitError` (nothing loaded) when
    any key is missing, unexpected or of another size, naming the first mismatched key.
    """
    state, description, config = read_videomae_checkpoint(source)
    fmt = checkpoint_format(state)
    label = "Hugging Face VideoMAEForPreTraining" if fmt == "hf" else "VideoMAE pretraining checkpoint"
    snapshot = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    snapshot.update({f"p.{k}": v.detach().clone() for k, v in predictor.state_dict().items()})
    decoder_side = ("encoder_to_decoder.weight", "mask_token")
    encoder_only = {k: v for k, v in state.items() if not (k.startswith("decoder.") or k in decoder_side)}
    encoder_report = load_videomae_state_dict(encoder, encoder_only, strict=False)
    decoder_report, to_load = _decoder_report(predictor, state, fmt, description)
    report = VideoMAEInitReport(source=description, format=label, encoder=encoder_report, decoder=decoder_report)
    report.encoder.notes += _config_notes(config)
    if not report.ok:
        _restore(encoder, predictor, snapshot)
        raise VideoMAEInitError(f"{description} ({label}) does not fit the recipe: {report.first_problem()}\n{report}")
    with torch.no_grad():
        predictor.load_state_dict(to_load, strict=False)
    return report


def _restore(encoder: nn.Module, predictor: nn.Module, snapshot: Mapping[str, Tensor]) -> None:
    """Undo the partial loads of a checkpoint that turned out not to fit."""
    with torch.no_grad():
        encoder.load_state_dict({k: v for k, v in snapshot.items() if not k.startswith("p.")}, strict=False)
        predictor.load_state_dict({k[2:]: v for k, v in snapshot.items() if k.startswith("p.")}, strict=False)


def _config_notes(config: Mapping[str, Any]) -> list[str]:
    """Where a Hugging Face config differs from what vlmask computes (the weights still load)."""
    notes = []
    if config and not config.get("norm_pix_loss", True):
        notes.append("config norm_pix_loss=false: the checkpoint was trained on raw pixels; vlmask's "
                     "normalized_pixels target normalises per token unless normalize: false")
    eps = config.get("layer_norm_eps")
    if eps is not None and abs(float(eps) - 1e-6) > 1e-12:
        notes.append(f"config layer_norm_eps={eps}: vlmask's LayerNorms use 1e-6 (the original VideoMAE's)")
    if config:
        notes.append("the Hugging Face decoder's final LayerNorm uses eps 1e-5 (nn.LayerNorm's default); "
                     "vlmask's predictor and the original VideoMAE decoder use 1e-6")
    return notes


def _has_decoder(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("decoder.") for k in state)


def load_init(path: Path, encoder: nn.Module, predictor: nn.Module | None) -> Any:
    """The recipe key ``model.init`` (hook ``vlmask_load_init``): start ``encoder`` (and
    ``predictor``, when the recipe has one and the checkpoint a decoder) from a VideoMAE
    checkpoint, strictly. A pretraining checkpoint (Hugging Face ``VideoMAEForPreTraining``
    folder or original ``.pth``) fills both through :func:`load_videomae_pretraining`; an
    encoder-only one (``VideoMAEModel`` folder, a finetuned backbone) fills the encoder through
    :func:`~vlmask_plugins.interop.hf_videomae.load_videomae_state_dict` and leaves the
    predictor as built. Raises ``ValueError`` whose first line names the first mismatched key.
    """
    state, description, config = read_videomae_checkpoint(path)
    if predictor is not None and _has_decoder(state):
        return load_videomae_pretraining(encoder, predictor, path)
    report = load_videomae_state_dict(encoder, state, strict=False)
    report.source = description
    report.notes += _config_notes(config)[:2]
    if not report.ok:
        if report.mismatched:
            key, stored, own = report.mismatched[0]
            first = f"encoder key {key}: checkpoint {stored} vs recipe {own}"
        elif report.missing:
            first = f"encoder key {report.missing[0]} is not in the checkpoint"
        else:
            first = f"checkpoint key {report.unexpected[0]} has no place in the encoder"
        raise VideoMAEInitError(f"{description} does not fit the recipe: {first}\n{report}")
    return report
