"""Data parallelism for the trainer: DDP (replicated student) or FSDP (sharded student and teacher).

``train.parallel: ddp`` (the default) wraps only the trainable student in
``DistributedDataParallel``; the EMA teacher and the frozen text tower stay local, since they
need no gradient synchronisation. ``train.parallel: fsdp`` shards parameters, gradients and
optimizer state across the ranks with PyTorch's FSDP2 (``fully_shard``; Zhao et al., "PyTorch
FSDP", VLDB 2023), for models that do not fit in one device's memory:

- every transformer block of the encoder and the predictor (their ``blocks``) is its own unit,
  then each of the two parts, then the student itself (the rest: the video-to-text projection,
  which several loss terms call, and the heads' parameters);
- every rank starts from rank 0's weights (broadcast before sharding, as DDP does), and the
  full model never goes to the device: it is built on the CPU and each rank moves its shards;
- the teacher's parts are sharded the same way, so the EMA update is a local per-shard
  operation (no gather) and the teacher's forward gathers one block at a time;
- with ``precision: bf16`` parameters are gathered in bf16 and gradients reduced in fp32;
- scalar parameters (a contrastive head's temperature) cannot be sharded: they stay replicated
  and their gradients are averaged across ranks here, before clipping.

Checkpoints (``train.checkpoint_format``): under FSDP with several processes every rank writes
its own shards through ``torch.distributed.checkpoint`` (:func:`sharded_state_dict`,
:func:`sharded_optimizer_state`; the format is ``vlmask.sharded``'s), with no gather on rank 0;
DDP and one process write full tensors (:func:`full_state_dict`, gathered on rank 0 when
``checkpoint_format: full`` asks it of FSDP). Either way the optimizer state is keyed by
parameter name, so a checkpoint of two FSDP processes resumes in one process and vice versa.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from vlmask.kinds import HasBlocks, MirroringTeacher, Teacher
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

_FULL = StateDictOptions(full_state_dict=True)
_GATHER_TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the other ranks get {}
_SHARDED = StateDictOptions(full_state_dict=False)  # each rank its own shards (DTensors), plain tensors as they are


def wrap_ddp(student: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """The student in ``DistributedDataParallel`` (only trainable modules are wrapped)."""
    return DistributedDataParallel(
        student,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def _shard_part(part: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, ignored: set[nn.Parameter],
                reshard_after_forward: bool | None = None) -> None:
    for block in part.blocks if isinstance(part, HasBlocks) else ():
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored)
    fully_shard(part, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored, reshard_after_forward=reshard_after_forward)


def teacher_parts(teacher: Any) -> list[nn.Module]:
    """The separately called parts of a teacher (kind ``teacher``: ``teacher.module(name)`` for
    its ``mirrored`` names, by default encoder and projection), or the teacher itself when it
    offers none (a module that is not a ``vlmask.kinds.Teacher``)."""
    if not isinstance(teacher, Teacher):
        return [teacher]
    names = teacher.mirrored if isinstance(teacher, MirroringTeacher) else ("encoder", "projection")
    parts = [teacher.module(name) for name in names]
    return [part for part in parts if part is not None] or [teacher]


def shard_fsdp(student: nn.Module, teacher: nn.Module | None, precision: str, device: torch.device) -> list[nn.Parameter]:
    """Shard ``student`` (and ``teacher``), built on the CPU, in place: each rank moves only its
    shards to ``device``. Returns the replicated scalar parameters (moved to ``device``) whose
    gradients :func:`average_replicated_gradients` must average."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = torch.bfloat16 if precision == "bf16" else None
    mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for module in (student, teacher):  # as DDP does: every rank starts from rank 0's weights
        if module is not None:
            broadcast_from_rank0(module)
    replicated = [p for p in student.parameters() if p.ndim == 0]
    ignored = set(replicated)
    for part in (student.encoder, student.predictor):  # a vlmask.build.Student: predictor may be None
        if isinstance(part, nn.Module) and any(True for _ in part.parameters()):
            _shard_part(part, mesh, mp_policy, ignored)
    fully_shard(student, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored)
    if teacher is not None:
        frozen_scalars = {p for p in teacher.parameters() if p.ndim == 0}
        for part in teacher_parts(teacher):
            if any(p.ndim > 0 for p in part.parameters()):
                # teacher parts run no backward: reshard right after their forward (FSDP keeps a
                # root unit's parameters gathered otherwise), so the EMA update sees shards
                _shard_part(part, mesh, mp_policy, frozen_scalars, reshard_after_forward=True)
    for module in (student, teacher):  # what FSDP does not manage (ignored scalars) follows by hand
        for tensor in [*module.parameters(), *module.buffers()] if module is not None else ():
            if not isinstance(tensor, DTensor) and tensor.device != device:
                tensor.data = tensor.data.to(device)
    return replicated


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Overwrite every parameter and buffer with rank 0's (before sharding: each rank then
    keeps its own slice of one common initialisation)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def average_replicated_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of parameters FSDP leaves replicated."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or not dist.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """``clip_grad_norm_`` over a mix of sharded (DTensor) and plain gradients; returns the
    total norm as a plain tensor (the same on every rank)."""
    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):  # clip_grads_with_norm_ scales each parameter's .grad
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction of the backward passes inside (all but the last micro-batch
    of an accumulated step), for DDP (``no_sync``), FSDP and compiled wrappers of either."""
    inner = getattr(module, "_orig_mod", module)
    if enabled:
        yield
    elif isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    elif isinstance(inner, DistributedDataParallel):
        with inner.no_sync():
            yield
    else:
        yield


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``module`` unsharded. Under FSDP this is a collective (every rank calls
    it) and only rank 0 receives the tensors, on the CPU; the others get an empty dict."""
    if is_sharded(module):
        return get_model_state_dict(module, options=_GATHER_TO_RANK0)
    return module.state_dict()


def load_full_state_dict(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load full tensors into a plain or sharded ``module`` (each rank keeps its shard)."""
    if is_sharded(module):
        set_model_state_dict(module, tensors, options=_FULL)
    else:
        module.load_state_dict(tensors, strict=True)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name and unsharded (portable across modes);
    under FSDP a collective whose result only rank 0 receives."""
    return get_optimizer_state_dict(module, optimizer, options=_GATHER_TO_RANK0 if is_sharded(module) else _FULL)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=_FULL)


def sharded_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s tensors as this rank holds them: DTensor shards of FSDP's parameters, plain
    tensors for the rest (all of them in a plain module). Not a collective."""
    return get_model_state_dict(module, options=_SHARDED)


def load_sharded_state_dict(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load :func:`sharded_state_dict`-shaped tensors (this rank's shards), strictly."""
    set_model_state_dict(module, tensors, options=_SHARDED)


def sharded_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name as this rank holds it (shards under FSDP)."""
    return get_optimizer_state_dict(module, optimizer, options=_SHARDED)


def load_sharded_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=_SHARDED)


def local_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's part of each tensor (the local shard of a DTensor)."""
    return {key: _local(t) for key, t in tensors.items()}


def gather_on_rank0(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (a small picklable object) in rank order on rank 0, None on the
    others; ``[value]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def union_over_ranks(names: list[str]) -> list[str]:
    """The names any rank found (sorted), on every rank; ``names`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return names
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, names)
    return sorted({name for part in every for name in part})


def local_parameter_count(module: nn.Module) -> int:
    """Parameter elements held by this rank (a shard of each sharded parameter)."""
    return sum(_local(p).numel() for p in module.parameters())


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def training_state_bytes(student: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for the training state: the student's parameters and gradients,
    the optimizer's state, the teacher's parameters and buffers (shards only, under FSDP)."""
    def size(tensors: Iterable[Tensor]) -> int:
        return sum(_local(t).numel() * t.element_size() for t in tensors)

    optimizer_tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    record = {
        "student_parameters": size(student.parameters()),
        "student_gradients": size(p.grad for p in student.parameters() if p.grad is not None),
        "optimizer_state": size(optimizer_tensors),
        "teacher": size([*teacher.parameters(), *teacher.buffers()]) if teacher is not None else 0,
    }
    record["total"] = sum(record.values())
    return record
