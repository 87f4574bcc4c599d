"""Sharded checkpoints: every rank writes its own shards through ``torch.distributed.checkpoint``.

Under ``train.parallel: fsdp`` with several processes (``train.checkpoint_format: auto``, or
``sharded``) a checkpoint is never gathered on rank 0: every rank saves the shards it holds with
DCP (``dcp.save``; Wang et al., the PyTorch DCP docs; torchtitan's checkpointer does the same),
the optimizer state keyed by parameter name (``get_optimizer_state_dict(full_state_dict=False)``)
so that another world size re-shards it at load. ``checkpoints/step_<N>/`` then holds::

    shards/shard-00001-model-00001-of-00003.safetensors   rank 0's shards (student., teacher., optimizer.state.),
    shards/shard-00001-model-00002-of-00003.safetensors   in files of at most 32 MiB (FILE_BYTES: DCP's writer
    ...                                                    serialises a file in memory before writing it)
    shards/shard-00002-model-00001-of-00003.safetensors   rank 1's, ...
    sharded.json   {"format": "vlmask-sharded", "version": 1, "step", "world_size", "files": {path: bytes}}
    state.pt       the rest, as in a full checkpoint: step, optimizer param groups, scaler, RNG of every rank, loop state

Why DCP's safetensors writer (``HuggingFaceStorageWriter(save_distributed=True)``) and not its
default ``FileSystemWriter``: the default writes a ``.metadata`` pickle that
``FileSystemReader.read_metadata`` loads with ``pickle.load`` (torch/distributed/checkpoint/
filesystem.py), so a hostile checkpoint would run code. Here the shards are safetensors, each
with its offsets in its JSON header (``DCP_SHARDING_INFO``), and the metadata is rebuilt from
those headers (``HuggingFaceStorageReader.read_metadata``); ``state.pt`` is read with
``weights_only=True``, ``sharded.json`` is JSON. Nothing on the load path unpickles: a
``.metadata`` file in a checkpoint is never read, and a folder in DCP's pickle layout (no
``sharded.json``) is refused. ``sharded.json`` lists every shard with its size, so a missing or
truncated shard, or a file that is not one of them, is one clear error before anything is read.

Atomic like a full checkpoint (``vlmask.checkpoint``): rank 0 names a temporary folder
``.tmp-step_<N>-<host>-<pid>`` and tells the others, every rank writes its shards into it (the
folder must be on a file system every rank sees, as for any multi-node checkpoint), then after
DCP's own final collective rank 0 writes ``sharded.json`` and ``state.pt``, renames the folder
into place, replaces ``latest`` and rotates; its outcome is broadcast so that every rank
returns, or raises the same ``CheckpointError``. A killed job leaves a temporary folder that the
next save or resume removes (its writer, rank 0's process, is gone).

Reading: a sharded checkpoint resumes under any world size (:func:`load_training_state`: DCP
reads into each rank's shards, or into a plain model's full tensors in one process), and
``vlmask eval``/``embed``/``export`` read it in one process with no process group
(:func:`load_full`, the same strict checks as safetensors weights). :func:`consolidate` writes
it as a full checkpoint (``vlmask checkpoint consolidate``).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from vlmask import parallel
from vlmask.checkpoint import (
    CheckpointError,
    _fsync_dir,
    _fsync_file,
    commit_checkpoint,
    load_state,
    remove_orphan_temporaries,
    save_checkpoint,
    temporary_folder,
    with_checkpoint_defaults,
    write_failed,
    write_state,
)

INDEX = "sharded.json"
SHARDS = "shards"
FORMAT = "vlmask-sharded"
VERSION = 1
#: Bytes of one rank's shard file at most (but one tensor's share; :func:`file_plan`).
FILE_BYTES = 32 * 2**20


def checkpoint_format(setting: str, parallel_mode: str) -> str:
    """``full`` or ``sharded``: what a run with ``train.checkpoint_format: setting`` writes when
    its processes run ``parallel_mode`` (``none`` in one process): ``auto`` shards exactly when
    FSDP shards (several processes)."""
    if setting == "auto":
        return "sharded" if parallel_mode == "fsdp" else "full"
    return setting


def is_sharded(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` (a ``step_<N>`` folder) is in the sharded format. A folder in DCP's
    default layout (a ``.metadata`` pickle, no ``sharded.json``) is refused, never unpickled."""
    if (checkpoint / INDEX).is_file():
        return True
    for pickled in (checkpoint / ".metadata", checkpoint / SHARDS / ".metadata"):
        if pickled.exists():
            raise CheckpointError(f"{pickled}: a torch.distributed.checkpoint folder in its pickle layout; vlmask "
                                  f"reads only sharded checkpoints of safetensors shards with {INDEX} and never "
                                  "unpickles a checkpoint")
    return False


# ---------------------------------------------------------------------------------------- collectives
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _cause(error: BaseException) -> BaseException:
    """The first rank's own error inside DCP's ``CheckpointException`` (it gathers every rank's)."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns at every call without a process group ("assuming the intent is to save in a
    single process"): here that is the intent (one process, or each process reading alone)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (itself in one process)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------- saving
def save_sharded(folder: Path, step: int, tensors: dict[str, Any], state: dict[str, Any] | None,
                 keep: int = 2) -> Path:
    """Write checkpoint ``step`` in the sharded format; every rank calls it with its own shards
    (``tensors``: ``{"student": ..., "teacher": ..., "optimizer": {"state": ...}}`` of DTensors
    and plain tensors) and rank 0 with ``state`` (``state.pt``; the others pass None). Returns the
    checkpoint folder on every rank; a failure on any rank raises the same
    :class:`CheckpointError` on every rank (the temporary folder removed, the previous checkpoint kept)."""
    named: tuple[str, str | None] = ("", None)  # (the temporary folder, or why none could be made)
    if _rank() == 0:
        tmp = temporary_folder(folder, step)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_orphan_temporaries(folder)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARDS).mkdir(parents=True)
            named = (str(tmp), None)
        except OSError as caught:
            named = (str(tmp), str(write_failed(caught, folder, step, tmp)))
    named = _from_rank0(named)
    if named[1] is not None:
        raise CheckpointError(named[1])
    tmp = Path(named[0])
    error: BaseException | None = None
    try:  # DCP gathers every rank's write results: a failure anywhere raises on every rank
        world_size = dist.get_world_size() if _distributed() else 1
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True,
                                          fqn_to_index_mapping=file_plan(tensors, world_size))
        with _quiet_single_process():
            dcp.save(tensors, storage_writer=writer, no_dist=not _distributed())
    except (CheckpointException, Exception) as caught:  # noqa: BLE001  (CheckpointException is a BaseException)
        error = _cause(caught)
    outcome: str | None = None
    if _rank() == 0:
        if error is None:
            try:
                assert state is not None, "rank 0 writes state.pt"
                _write_index(tmp, step, dist.get_world_size() if _distributed() else 1)
                write_state(tmp / "state.pt", {**state, "step": step})
                _fsync_dir(tmp / SHARDS)
                _fsync_dir(tmp)
            except Exception as caught:  # noqa: BLE001  (a full disk, a quota, an unwritable folder)
                error = caught
        if error is not None:
            outcome = str(write_failed(error, folder, step, tmp))
        else:
            try:
                commit_checkpoint(folder, tmp, step, keep)
            except CheckpointError as caught:
                outcome = str(caught)
    outcome = _from_rank0(outcome)
    if outcome is not None:
        raise CheckpointError(outcome)
    return folder / f"step_{step:08d}"


def file_plan(tensors: dict[str, Any], world_size: int, file_bytes: int = FILE_BYTES) -> dict[str, int]:
    """Which file (1, 2, ...) of its rank each tensor goes to: consecutive tensors while a rank's
    share of them (global bytes / world size) stays under ``file_bytes``. DCP's safetensors
    writer serialises a whole file in memory before writing it, so a rank's peak during a save
    is about one file (twice, the bytes and their copy), not its whole shard."""
    plan: dict[str, int] = {}
    index, used = 1, 0
    for key, tensor in _flatten(tensors).items():
        size = tensor.numel() * tensor.element_size() // world_size  # a DTensor's numel is the global one
        if used and used + size > file_bytes:
            index, used = index + 1, 0
        plan[key] = index
        used += size
    return plan


def _write_index(tmp: Path, step: int, world_size: int) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted((tmp / SHARDS).glob("*.safetensors"))}
    for name in files:
        _fsync_file(tmp / name)  # DCP fsyncs what it writes; this makes sure of every rank's file
    index = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
             "writer": "torch.distributed.checkpoint HuggingFaceStorageWriter (safetensors shards)", "files": files}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    _fsync_file(tmp / INDEX)


# ---------------------------------------------------------------------------------------- checking
def read_index(checkpoint: Path) -> dict[str, Any]:
    """``sharded.json``, after checking that every shard it lists is there with its size and
    that the shard folder holds nothing else (a missing, truncated or foreign file: one line)."""
    path = checkpoint / INDEX
    try:
        index = json.loads(path.read_text())
        if not (isinstance(index, dict) and index.get("format") == FORMAT and isinstance(index.get("files"), dict)):
            raise ValueError("not a vlmask sharded-checkpoint index")
        if index.get("version") != VERSION:
            raise ValueError(f"version {index.get('version')!r}; this vlmask reads version {VERSION}")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the shard index ({exc})") from None
    for name, size in index["files"].items():
        shard = checkpoint / name
        if not isinstance(size, int) or Path(name).parent.name != SHARDS or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: bad entry {name!r}: {size!r}")
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing (listed in {path}); the checkpoint is incomplete")
        if shard.stat().st_size != size:
            raise CheckpointError(f"{shard}: {shard.stat().st_size} bytes, {path} says {size}; the shard is truncated "
                                  "or was changed")
    listed = {checkpoint / name for name in index["files"]}
    foreign = sorted(p.name for p in (checkpoint / SHARDS).iterdir() if p not in listed) if (checkpoint / SHARDS).is_dir() else []
    if foreign:
        raise CheckpointError(f"{checkpoint / SHARDS}: files not listed in {path}: {', '.join(foreign[:5])}")
    return index


def read_metadata(checkpoint: Path) -> Metadata:
    """Every tensor's global shape, dtype and chunks, from the shards' safetensors headers (no
    pickle), checked to cover each tensor exactly once."""
    read_index(checkpoint)
    shards = checkpoint / SHARDS
    try:
        metadata = HuggingFaceStorageReader(str(shards)).read_metadata()
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{shards}: cannot read the shards' headers ({type(exc).__name__}: {exc}); "
                              "a shard is truncated or not safetensors") from None
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{shards}: {key} is not a tensor")
        covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if covered != math.prod(entry.size):
            raise CheckpointError(f"{shards}: the shards hold {covered} of the {math.prod(entry.size)} elements of "
                                  f"{key}; a shard is missing")
    return metadata


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """DCP's names: nested dict keys joined with dots (``optimizer.state.<param>.exp_avg``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_keys(metadata: Metadata, expected: dict[str, Any], prefixes: Iterable[str], source: Path) -> None:
    """Refuse, listing them, the keys of ``expected`` (flat name -> tensor) the checkpoint lacks,
    the checkpoint's keys under ``prefixes`` that ``expected`` lacks, and mismatched shapes (as
    ``vlmask.checkpoint.load_strict`` does for safetensors)."""
    saved = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith(tuple(f"{p}." for p in prefixes))}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(saved) if tuple(expected[k].shape) != tuple(saved[k].size))
    if missing or unexpected or mismatched:
        lines = [f"{source}: checkpoint does not match the model"]
        lines += [f"  missing: {k}" for k in missing[:20]] + ([f"  ... {len(missing) - 20} more"] if len(missing) > 20 else [])
        lines += [f"  unexpected: {k}" for k in unexpected[:20]]
        lines += [f"  shape {k}: checkpoint {tuple(saved[k].size)} vs model {tuple(expected[k].shape)}" for k in mismatched[:20]]
        raise CheckpointError("\n".join(lines))


def _dcp_load(checkpoint: Path, tree: dict[str, Any], collective: bool) -> None:
    """Fill ``tree`` (nested dicts of DTensors / tensors) in place from the shards."""
    try:
        with _quiet_single_process():
            dcp.load(tree, storage_reader=HuggingFaceStorageReader(str(checkpoint / SHARDS)), no_dist=not collective)
    except (CheckpointException, Exception) as caught:  # noqa: BLE001  (the index was checked already)
        exc = _cause(caught)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{checkpoint / SHARDS}: cannot read the shards ({type(exc).__name__}: {first})") from None


# ---------------------------------------------------------------------------------------- loading
def load_full(checkpoint: Path, name: str) -> dict[str, Tensor]:
    """Every tensor of module ``name`` (``student``, ``teacher``) as full tensors, in this process
    alone (no process group; ``vlmask eval``, ``embed``, ``export``, a resume in one process)."""
    metadata = read_metadata(checkpoint)
    prefix = f"{name}."
    full = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items() if key.startswith(prefix)}
    if not full:
        raise CheckpointError(f"{checkpoint / SHARDS}: no {name} tensors in this checkpoint")
    _dcp_load(checkpoint, full, collective=False)
    return {key.removeprefix(prefix): tensor for key, tensor in full.items()}


def _module_target(module: nn.Module, metadata: Metadata, name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The module's own state (shards under FSDP) to load into, and the keys the checkpoint
    lacks that the module states a default for (``vlmask.checkpoint.with_checkpoint_defaults``)."""
    own = parallel.sharded_state_dict(module)
    saved = metadata.state_dict_metadata
    defaults = {k: v for k, v in with_checkpoint_defaults(module, {}).items() if f"{name}.{k}" not in saved and k in own}
    return {k: v for k, v in own.items() if k not in defaults}, defaults


def load_training_state(checkpoint: Path, student: nn.Module, teacher: nn.Module | None,
                        optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]]) -> None:
    """Load a sharded checkpoint into a training student, teacher and optimizer, strictly,
    whatever the world size it was written with: under FSDP every rank calls it and reads only
    what its shards need; in one process the tensors are read whole. ``param_groups``: the
    optimizer's, from ``state.pt``."""
    metadata = read_metadata(checkpoint)
    source = checkpoint / SHARDS
    modules = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    targets, defaults = {}, {}
    for name, module in modules.items():
        targets[name], defaults[name] = _module_target(module, metadata, name)
    optim = parallel.sharded_optimizer_state(student, optimizer)
    targets["optimizer"] = {"state": optim["state"]}
    _check_keys(metadata, _flatten({k: v for k, v in targets.items() if k != "optimizer"}), modules, source)  # weights first
    _check_keys(metadata, _flatten({"optimizer": targets["optimizer"]}), ["optimizer"], source)
    _dcp_load(checkpoint, targets, collective=_distributed())
    for name, module in modules.items():
        parallel.load_sharded_state_dict(module, {**targets[name], **defaults[name]})
    try:
        parallel.load_sharded_optimizer_state(student, optimizer, {"state": optim["state"], "param_groups": param_groups})
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"{checkpoint / 'state.pt'}: the optimizer state does not match this run's parameters "
                              f"({type(error).__name__}: {error})") from error


def consolidate(checkpoint: Path, out: Path) -> Path:
    """Write the sharded ``checkpoint`` as a full one: ``out/step_<N>/`` with
    ``student.safetensors``, ``teacher.safetensors`` and ``state.pt`` (the optimizer state
    unsharded, keyed by name), exactly what one process writes; atomic like any checkpoint.
    Reads in this process alone (the full model and optimizer state in memory once)."""
    state = load_state(checkpoint / "state.pt")
    metadata = read_metadata(checkpoint)
    names = sorted({key.split(".", 1)[0] for key in metadata.state_dict_metadata} & {"student", "teacher"})
    modules = {name: load_full(checkpoint, name) for name in names}
    prefix = "optimizer.state."
    flat = {key.removeprefix(prefix): torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items() if key.startswith(prefix)}
    if flat:
        _dcp_load(checkpoint, {f"{prefix}{k}": v for k, v in flat.items()}, collective=False)
    moments: dict[str, dict[str, Tensor]] = {}
    for key, tensor in flat.items():
        param, moment = key.rsplit(".", 1)
        moments.setdefault(param, {})[moment] = tensor
    state["optimizer"] = {"state": moments, "param_groups": state.pop("optimizer_param_groups")}
    step = int(state.pop("step"))
    return save_checkpoint(out, step, modules, state, keep=0)
