"""Checkpoints: weights as safetensors, training state loadable with ``weights_only=True``.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding ``student.safetensors``,
``teacher.safetensors`` (when the recipe has a teacher) and ``state.pt`` (optimizer, loss
scaler, RNG states, step): nothing in it executes code when loaded. It is written into a
temporary folder and renamed into place, then ``checkpoints/latest`` is replaced atomically,
so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmask.parallel import load_full_state_dict

STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, or does not match the model."""


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone tied tensors so each key owns its data.
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path,
    step: int,
    modules: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``modules`` (name -> state dict) as safetensors and ``state`` as ``state.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{STEP_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{STEP_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, tensors in modules.items():
        save_file(_contiguous(tensors), str(tmp / f"{name}.safetensors"), metadata={"step": str(step)})
    torch.save({**state, "step": step}, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as fh:
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = folder / ".latest.tmp"
    pointer.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(pointer, folder / "latest")
    for old in sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = folder / "latest"
    if pointer.is_file():
        try:
            path = folder / json.loads(pointer.read_text())["path"]
            if path.is_dir():
                return path
        except (ValueError, KeyError):
            pass
    candidates = sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if (p / "state.pt").is_file())
    return candidates[-1] if candidates else None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc}); the file is truncated or not safetensors") from None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read training state ({type(exc).__name__}: {exc})") from None


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict, refusing any missing, unexpected or mis-shaped key (listing them)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"{source}: checkpoint does not match the model"]
        lines += [f"  missing: {k}" for k in missing[:20]] + ([f"  ... {len(missing) - 20} more"] if len(missing) > 20 else [])
        lines += [f"  unexpected: {k}" for k in unexpected[:20]]
        lines += [f"  shape {k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:20]]
        raise CheckpointError("\n".join(lines))
    load_full_state_dict(module, tensors)
