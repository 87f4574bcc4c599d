"""Checkpoints: weights as safetensors, training state loadable with ``weights_only=True``.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding ``student.safetensors``,
``teacher.safetensors`` (when the recipe has a teacher) and ``state.pt`` (optimizer, loss
scaler, RNG states, step): nothing in it executes code when loaded. It is written into a
temporary folder (each file fsynced) and renamed into place, then ``checkpoints/latest`` is
replaced atomically, so an interrupted save never leaves a half-written checkpoint behind; the
temporary folders of writers that died (a kill, a full disk) are removed at the next save.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmask.kinds import CheckpointDefaults
from vlmask.parallel import load_full_state_dict

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_TMP_PATTERN = re.compile(rf"\.tmp-{STEP_PREFIX}\d+(?:\.old)?-(?:(?P<host>.+)-)?(?P<pid>\d+)")
#: Below this much free space, a write that failed without saying why is taken for a full disk.
_NEARLY_FULL_BYTES = 16 * 2**20


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


def rng_of_rank(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """The RNG states a process of ``rank`` resumes with: its own from ``rng_by_rank`` (every
    rank's, kept when several processes trained), else ``rng`` (rank 0's: a checkpoint written
    by one process, an older one, or a rank the writing job did not have)."""
    by_rank = state.get("rng_by_rank")
    if isinstance(by_rank, list) and rank < len(by_rank):
        return by_rank[rank]
    return state["rng"]


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: the directory itself is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _tmp_name(step: int) -> str:
    """``.tmp-step_<N>-<host>-<pid>``: who writes it, so a later save can tell an orphan (its
    writer was killed, or its disk filled) from a folder a live writer is still filling."""
    return f"{TMP_PREFIX}{STEP_PREFIX}{step:08d}-{_host()}-{os.getpid()}"


def temporary_folder(folder: Path, step: int) -> Path:
    """Where this process writes checkpoint ``step`` before it is renamed into place."""
    return folder / _tmp_name(step)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return True


def orphan_temporaries(folder: Path) -> list[Path]:
    """Temporary checkpoint folders in ``folder`` whose writer is gone: written by this host and
    a process that no longer runs (a kill, a crash, a full disk), or by this very process (an
    earlier save that failed). A folder written by another host, or by a live process here, is
    never listed: its writer may still be filling it."""
    orphans = []
    host = _host()
    for path in sorted(folder.glob(f"{TMP_PREFIX}{STEP_PREFIX}*")) if folder.is_dir() else []:
        match = _TMP_PATTERN.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        writer_host, pid = match.group("host"), int(match.group("pid"))
        if writer_host not in (None, host):
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            orphans.append(path)
    return orphans


def remove_orphan_temporaries(folder: Path) -> list[Path]:
    """Remove :func:`orphan_temporaries` (at every save, and when a run resumes); returns them."""
    removed = orphan_temporaries(folder)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space. safetensors reports the OS error in its text
    ("No space left on device (os error 28)"); torch's zip writer only says ". unexpected pos
    ..." (a short write), so the free space decides then."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    if "no space left" in text or "os error 28" in text or "storagefull" in text or "quota" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def save_checkpoint(
    folder: Path,
    step: int,
    modules: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``modules`` (name -> state dict) as safetensors and ``state`` as ``state.pt``.

    Atomic: everything is written into ``.tmp-step_<N>-<host>-<pid>/``, each file fsynced, the
    folder renamed to ``step_<N>/`` and ``latest`` replaced (each rename fsynced in its
    directory). An interruption at any point leaves the previous checkpoint and ``latest``
    intact. Orphaned temporary folders of earlier saves are removed first. A failed write (a
    full disk, a quota) removes its temporary folder and raises :class:`CheckpointError`
    ("no space left on device" with the path, when that is the cause) naming the checkpoint kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphan_temporaries(folder)
    tmp = folder / _tmp_name(step)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, tensors in modules.items():
            save_file(_contiguous(tensors), str(tmp / f"{name}.safetensors"), metadata={"step": str(step)})
            _fsync_file(tmp / f"{name}.safetensors")
        write_state(tmp / "state.pt", {**state, "step": step})
        _fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as error:
        raise write_failed(error, folder, step, tmp) from error
    return commit_checkpoint(folder, tmp, step, keep)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """``state.pt``: tensors, numbers, strings and containers only (read back with ``weights_only``), fsynced."""
    torch.save(state, path)
    _fsync_file(path)


def write_failed(error: BaseException, folder: Path, step: int, tmp: Path) -> CheckpointError:
    """Remove the temporary folder of a failed write; the one-line error naming the cause (a
    full disk, when that is it) and the checkpoint kept."""
    full = _is_disk_full(error, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(folder, report=False)
    kept = f"the previous checkpoint {previous} is kept" if previous is not None else "no earlier checkpoint exists"
    cause = "no space left on device" if full else f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    return CheckpointError(
        f"{cause} while writing checkpoint step {step} in {folder}; {kept}"
        + ("; free space, then run the same command again to resume" if full else "")
    )


def commit_checkpoint(folder: Path, tmp: Path, step: int, keep: int) -> Path:
    """Put the complete temporary folder ``tmp`` in place as ``step_<N>/`` (an older copy of the
    same step is moved aside first, never deleted first), replace ``latest`` atomically (each
    rename fsynced in its directory) and keep the newest ``keep`` checkpoints."""
    final = folder / f"{STEP_PREFIX}{step:08d}"
    if final.exists():  # the same step saved again: move the old copy aside, never delete first
        aside = folder / _tmp_name(step).replace(f"{step:08d}-", f"{step:08d}.old-", 1)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    pointer = folder / ".latest.tmp"
    try:
        with open(pointer, "w") as fh:
            fh.write(json.dumps({"step": step, "path": final.name}))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as error:
        pointer.unlink(missing_ok=True)
        cause = "no space left on device" if _is_disk_full(error, folder) else f"{type(error).__name__}: {error}"
        raise CheckpointError(f"{cause} while writing {folder / 'latest'}; checkpoint {final} is complete, "
                              f"but latest still names the previous one (a resume starts there)") from error
    os.replace(pointer, folder / "latest")
    _fsync_dir(folder)
    for old in sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


_reported: set[tuple[str, str]] = set()


def latest_checkpoint(folder: Path, report: bool = True) -> Path | None:
    """The newest complete checkpoint folder, or None.

    ``latest`` names it; when ``latest`` names a checkpoint that is gone (deleted by hand) or
    cannot be read, the newest complete ``step_*`` folder is used instead and, with ``report``,
    a one-line warning naming both goes to stderr (once per process): never silently an older
    one."""
    pointer = folder / "latest"
    candidates = sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if (p / "state.pt").is_file())
    fallback = candidates[-1] if candidates else None
    if not pointer.is_file():
        return fallback
    try:
        named = json.loads(pointer.read_text())["path"]
        if not isinstance(named, str):
            raise TypeError(named)
    except (ValueError, KeyError, TypeError, OSError):
        named = None
    if named is not None and (folder / named).is_dir():
        return folder / named
    if report and (str(pointer), str(fallback)) not in _reported:
        _reported.add((str(pointer), str(fallback)))
        what = f"names {named}, which does not exist" if named is not None else "cannot be read"
        instead = f"using {fallback.name} instead, the newest complete checkpoint" if fallback else "and no other checkpoint exists"
        print(f"warning: {pointer} {what}; {instead}", file=sys.stderr, flush=True)
    return fallback


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


def with_checkpoint_defaults(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` plus the state a submodule added after older checkpoints were written: a
    submodule with ``checkpoint_defaults() -> {local name: tensor}`` states the value such a
    checkpoint stands for (e.g. the CoCLR head's ``queue_clips``, all -1); keys the checkpoint has
    are kept as they are, and any other missing key stays an error of :func:`load_strict`."""
    filled = dict(tensors)
    for prefix, submodule in module.named_modules():
        if isinstance(submodule, CheckpointDefaults):
            for name, value in submodule.checkpoint_defaults().items():
                filled.setdefault(f"{prefix}.{name}" if prefix else name, value)
    return filled


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict, refusing any missing, unexpected or mis-shaped key (listing them); a
    key a submodule added later is filled with its stated default (:func:`with_checkpoint_defaults`)."""
    tensors = with_checkpoint_defaults(module, tensors)
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
