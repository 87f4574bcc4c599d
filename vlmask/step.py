"""One training step of a recipe's parts: :class:`TrainStep`.

The algorithm a reader looks for is in two short places: :meth:`TrainStep.step` (mask, forward,
weighted sum, backward, clip, optimizer step, then the after-step list) and
``vlmask.build.Student.forward`` (encode the visible tokens, predict the masked ones, ask the
teacher, score every loss term).

A TrainStep is built from a run's parts (:func:`vlmask.build.build_components`) and the
recipe's typed settings (``train``, ``optim``: :mod:`vlmask.schema`). It owns what one step
needs and nothing else: the process's place and device (:class:`Process`), precision and loss
scaling, the placement of the parts and their DDP/FSDP wrapping (:mod:`vlmask.parallel`),
AdamW and the learning-rate schedule, the stage plan (:mod:`vlmask.stages`), mask seeding,
:meth:`TrainStep.step`, the after-step list (:attr:`TrainStep.after_step`) and the state a
checkpoint keeps (:meth:`TrainStep.state_dict`). It reads no data, has no run directory and
prints nothing: :class:`vlmask.engine.Trainer` is the loop around one (data, run directory,
lifecycle hooks); ``vlmask bench``, the FLOP counter (:mod:`vlmask.flops`) and the rehearsal
(:mod:`vlmask.rehearsal`) build one directly and feed it synthetic batches, on the CPU or on
the ``meta`` device (:data:`ON_META`: shapes, no values; nothing is computed or allocated).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pluggy
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor, nn

from vlmask import checkpoint as ckpt
from vlmask import launch, parallel, sharded
from vlmask.build import (Components, LossTerm, Student, autocast_of, build_components, resolve_device,
                          resolve_precision, set_attention_backends)
from vlmask.config import Recipe, RecipeError
from vlmask.diagnostics import training_diagnostics
from vlmask.hookspecs import RunInfo
from vlmask.plugins import Plugins, new_manager, unknown_hooks
from vlmask.schedules import lr_at
from vlmask.schema import settings, top_settings
from vlmask.stages import read_stages, stage_plan, staged_total
from vlmask.types import Batch, gather_tokens


def weighted_sum(terms: dict[str, LossTerm], weights: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum(weight[name] * loss[name])``; a term without a weight, or a weight without a term, is an error.

    Returns the total and the flat dict of detached values to log (terms and their statistics).
    """
    if set(terms) != set(weights):
        missing, extra = sorted(set(terms) - set(weights)), sorted(set(weights) - set(terms))
        raise RecipeError([f"loss terms without a weight: {missing}; weights without a loss term: {extra}"])
    total: Tensor | None = None
    logged: dict[str, Tensor] = {}
    for name, term in terms.items():
        loss, stats = term if isinstance(term, tuple) else (term, {})
        total = weights[name] * loss if total is None else total + weights[name] * loss
        logged[name] = loss.detach()
        logged.update({f"{name}/{k}": v.detach() for k, v in stats.items()})
    assert total is not None
    return total, logged


def _no_weight_decay(name: str, param: Tensor, declared: set[str]) -> bool:
    """timm's rule (``param_groups_weight_decay``): no decay for 1-D parameters, biases and the
    names the model declares (``Student.no_weight_decay``)."""
    return param.ndim <= 1 or name.endswith(".bias") or name in declared


def _resolved(recipe: Recipe) -> dict[str, Any]:
    config = OmegaConf.to_container(recipe.config, resolve=True)
    assert isinstance(config, dict)
    return config  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Process:
    """Where a step runs: this process's ``rank`` among ``world_size`` processes, its device, and
    its index on its node (``local_rank``: per-node work, e.g. a node's own cache,
    :func:`vlmask.launch.in_turn`)."""

    rank: int
    world_size: int
    device: torch.device
    local_rank: int = 0


#: One process on the ``meta`` device: tensors have shapes and no values, so a step computes and
#: allocates nothing (FLOP counting, the rehearsal). Masks are still drawn on the CPU.
ON_META = Process(0, 1, torch.device("meta"))


def join_processes(recipe: Recipe) -> Process:
    """This process's place from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``:
    torchrun's, or SLURM's mapped to them under ``srun``, :func:`vlmask.launch.adopt_slurm`) and
    the recipe's ``device`` (``auto``: this process's CUDA device, else the CPU). With several
    processes it joins the default process group once (``env://``: gloo for CPU tensors, NCCL
    for CUDA). ``rank`` is global (data split, masks, seeds, rank 0's writes); ``local_rank``
    picks the GPU and orders per-node work."""
    launch.adopt_slurm()  # srun: SLURM's variables as torch's (a LaunchError names what is missing)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = resolve_device(top_settings(recipe).device)
    if world_size > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"  # CPU tensors too (FSDP set-up)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Process(rank, world_size, device, launch.local_rank())


def leave_processes(wait: bool = True) -> None:
    """The end of a job of several processes (``vlmask run`` under torchrun or srun): wait for
    every rank (``wait``; not on the way out of an error, where a peer may be gone), then leave
    the default process group. A process that exits without leaving it can die of SIGABRT while
    Python shuts down (Gloo's threads still hold tensors; pytorch#190489), which a rank that
    finishes first meets at random. Nothing when no group was joined."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def steps_without_data(recipe: Recipe) -> int:
    """A run's length when no data says it (bench, FLOP counts, the rehearsal): its stages'
    (:func:`vlmask.stages.staged_total`), else ``train.max_steps``, else 1."""
    return int(staged_total(_resolved(recipe)) or settings(recipe, "train").max_steps or 1)


# ---------------------------------------------------------------------------------------- watching a step
class PhaseTimer:
    """Seconds spent in each phase of :meth:`TrainStep.step` (summed over the steps it saw).

    It waits for the device at every phase boundary (CUDA runs asynchronously), so set it only
    to measure (``train_step.phase_watch = PhaseTimer(train_step.device)``), never to train."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.now() - start


class FeatureTap:
    """The features a training step already computes, kept for :mod:`vlmask.diagnostics` at
    log steps only: forward hooks on the student's encoder and on the teacher, registered once
    (before ``torch.compile``, which ignores hooks added later) and idle unless armed (:meth:`arm`).

    Armed for one step, each hook keeps the first output of its module in that step, detached:
    the encoder's features of the visible tokens (B, Nv, D) with the visible indices it was
    called with, and the teacher's features of every token (B, N, D). Later calls in the same
    step (faithful DPC encodes the true future again, MemDPC the past) and the other
    micro-batches of an accumulated step are left alone. Idle, a hook is one Python call that
    returns at once: no tensor operation, no host-device synchronisation.
    """

    def __init__(self, encoder: nn.Module, teacher: nn.Module | None) -> None:
        self.armed = False
        self.student: Tensor | None = None
        self.visible: Tensor | None = None
        self.teacher: Tensor | None = None
        self._handles = [encoder.register_forward_hook(self._student_hook)]
        if teacher is not None:
            self._handles.append(teacher.register_forward_hook(self._teacher_hook))

    def __deepcopy__(self, memo: dict[int, Any]) -> "FeatureTap":
        """A copy of a tapped module (:meth:`vlmask.build.Components.on_meta`) carries an idle tap
        that keeps nothing and owns no hook handle."""
        idle = FeatureTap.__new__(FeatureTap)
        idle.armed, idle.student, idle.visible, idle.teacher, idle._handles = False, None, None, None, []
        memo[id(self)] = idle
        return idle

    def _student_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.armed and self.student is None and isinstance(output, Tensor):
            self.student = output.detach()
            self.visible = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None

    def _teacher_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.armed and self.teacher is None and isinstance(output, Tensor):
            self.teacher = output.detach()

    @contextmanager
    def arm(self, enabled: bool = True) -> Iterator["FeatureTap"]:
        """Keep the features of the step run inside (when ``enabled``); forget them on entry."""
        self.student = self.visible = self.teacher = None
        self.armed = enabled
        try:
            yield self
        finally:
            self.armed = False

    def diagnostics(self) -> dict[str, float]:
        """``vlmask.diagnostics.training_diagnostics`` of the kept features (one host-device sync;
        call it at log steps): ``rankme`` and ``student_std`` of the student's visible tokens and,
        with a teacher, ``teacher_std`` and ``student_teacher_cos`` of the teacher's features at
        the same tokens (all of them when its tokens are not the student's grid). Empty when
        nothing was kept or the batch has one clip (a std over one clip means nothing)."""
        student, teacher = self.student, self.teacher
        if student is None or student.ndim not in (2, 3) or student.shape[0] < 2:
            return {}
        if teacher is not None and (teacher.ndim not in (2, 3) or teacher.shape[0] != student.shape[0]):
            teacher = None
        if teacher is not None and teacher.ndim == 3 and self.visible is not None and self.visible.ndim == 2 \
                and self.visible.shape[0] == teacher.shape[0] and int(self.visible.max()) < teacher.shape[1]:
            teacher = gather_tokens(teacher, self.visible)
        return training_diagnostics(student, teacher)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------- the step


def _part_key(name: str, recipe: Recipe) -> str:
    """The recipe key of a part named as :meth:`vlmask.build.Components.hook_parts` names it."""
    if name.startswith("logger."):
        return "loggers." + name.removeprefix("logger.")
    if name in ("masker", "teacher"):
        return name
    return f"targets.{name}" if name in top_settings(recipe).terms("targets") else f"heads.{name}"

def mask_generator(seed: int, step: int, rank: int, device: torch.device | str | None) -> torch.Generator:
    """The generator the masker gets at ``step`` (0-based) on ``rank``: it depends only on (seed,
    step, rank), so masks are identical after a resume and differ per rank; ``vlmask show masks``
    draws step 1's mask with it."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 4099 + rank)

class TrainStep:
    """One optimizer step of a recipe's parts, and everything it needs: ``train_step.step(batch, i)``.

    Built from :func:`vlmask.build.build_components`'s parts and the recipe (its ``train`` and
    ``optim`` settings, ``seed``, ``stages``), with ``total_steps`` (the schedule's length) and
    ``steps_per_epoch`` (for ``optim.warmup_epochs``) given by whoever knows the data. Building
    one places the parts on ``process.device`` (default :func:`join_processes`), wraps them for
    several processes (``train.parallel``: DDP, or FSDP which shards them in place), seeds
    torch's generators with ``seed + rank`` (so ranks then draw differently: dropout,
    augmentation), makes AdamW and the stage plan, and registers the parts' hook
    implementations with ``manager`` (the run's plugin manager, whose ``hook`` is
    :attr:`hooks`; default a new one holding the parts only) until :meth:`close` (a context
    manager: ``with TrainStep(...) as step:``).

    On :data:`ON_META` the step runs in fp32 on SDPA without ``torch.compile``; give it CPU
    batches: the masker draws on the CPU (meta tensors hold no values to sort), then the batch
    and the mask move to ``meta``.
    """

    #: Set to a :class:`PhaseTimer` (``vlmask bench``), or anything whose ``phase(name)`` is a
    #: context manager (the FLOP counter's marks), to watch the phases of :meth:`step`.
    phase_watch: Any = None

    def __init__(self, parts: Components, recipe: Recipe, *, total_steps: int, steps_per_epoch: int = 1,
                 process: Process | None = None, manager: pluggy.PluginManager | None = None) -> None:
        self.recipe = recipe
        self.parts = parts
        self.train_cfg = settings(recipe, "train")
        self.optim_cfg = settings(recipe, "optim")
        self.seed = int(top_settings(recipe).seed)
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        process = process or join_processes(recipe)
        self.rank, self.world_size, self.device = process.rank, process.world_size, process.device
        meta = self.device.type == "meta"
        # masks are drawn where the batch is: on meta, on the CPU batch given (meta tensors hold no values)
        self.mask_device = torch.device("cpu") if meta else self.device
        self.precision = "fp32" if meta else resolve_precision(recipe, self.train_cfg.precision, self.device)
        self.autocast = autocast_of(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self._place(meta)
        torch.manual_seed(self.seed + self.rank)  # then ranks draw differently (augmentation, dropout)
        self._setup_optimizer()
        self.stages = stage_plan(_resolved(recipe), self.student, self.loss_weights, self.masker, parts.objectives,
                                 recipe.where("stages"))
        self.manager = manager if manager is not None else new_manager()
        for name, component in parts.hook_parts().items():  # the parts take part in the run's hooks
            if not self.manager.is_registered(component):
                self.manager.register(component, name=f"run:{name}:{id(component)}")
                if misspelt := unknown_hooks(self.manager, component):  # else registered silently, never called
                    self.manager.unregister(component)
                    key = _part_key(name, recipe)
                    raise RecipeError([f"{recipe.where(key)}: key {key}: {'; '.join(misspelt)}"])
        self.hooks = self.manager.hook
        #: What lifecycle hooks learn about the run (the Trainer gives its own, with the run directory).
        self.run = RunInfo(Path("."), recipe, self.device, self.rank, self.world_size, 0, total_steps, self.attention)
        #: The work after every optimizer step, in this order, each called with the number of steps
        #: taken so far and timed as its own phase: the teacher's update (its Protocol's
        #: ``update(student, step)``), then every ``vlmask_after_optimizer_step`` implementation
        #: (the parts' own, e.g. the contrastive head's logit-scale clamp and CoCLR's momentum
        #: update, and the run's plugins'), so a hook sees the teacher already updated.
        self.after_step: list[tuple[str, Callable[[int], None]]] = [
            ("teacher_update", self._update_teacher),
            ("hooks", self._after_optimizer_step_hooks),
        ]

    def __enter__(self) -> "TrainStep":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Unregister the parts from the hook manager and remove the feature hooks."""
        for component in self.parts.hook_parts().values():
            if self.manager.is_registered(component):
                self.manager.unregister(component)
        self.features.remove()

    # ---------------------------------------------------------------- set-up
    def _place(self, meta: bool) -> None:
        """Move the parts to the device, choose their attention kernels, wrap them for several
        processes, tap their features and compile (``train.compile``)."""
        parts = self.parts
        self.parallel = self.train_cfg.parallel if self.world_size > 1 else "none"
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise RecipeError([f"{self.recipe.where('train.parallel')}: key train.parallel: "
                               "fsdp runs in fp32 or bf16, not fp16"])
        # FSDP shards the parts in place: their shapes are kept first, for a step on meta (on_meta)
        self._unsharded = parts.on_meta() if self.parallel == "fsdp" else None
        # under FSDP the full model never goes to the device: it is built on the CPU and each rank moves its shard
        model_device = torch.device("cpu") if self.parallel == "fsdp" else self.device
        self.student: Student = parts.student.to(model_device)
        self.teacher = parts.teacher.to(model_device) if parts.teacher is not None else None
        self.masker = parts.masker
        self.loss_weights = dict(parts.loss_weights)
        self.grid = parts.grid
        self.attention, self.attention_reason = set_attention_backends(parts, self.device, "sdpa" if meta else None)
        self.ddp_student: nn.Module = self.student
        self.replicated_params: list[nn.Parameter] = []  # FSDP: scalars left unsharded
        if self.parallel == "fsdp":
            self.replicated_params = parallel.shard_fsdp(self.student, self.teacher, self.precision, self.device)
        elif self.parallel == "ddp":
            if self.teacher is not None:  # DDP broadcasts the student's weights, not the teacher's
                parallel.broadcast_from_rank0(self.teacher)
            if any(p.requires_grad for p in self.student.parameters()):
                # a stage that freezes parameters leaves them without gradients: DDP must not wait for them
                freezes = any(stage.freeze for stage in read_stages(_resolved(self.recipe)))
                find_unused = self.train_cfg.find_unused_parameters or freezes
                self.ddp_student = parallel.wrap_ddp(self.student, self.device, find_unused)
        self.features = FeatureTap(self.student.encoder, self.teacher)  # before compile: it ignores later hooks
        if self.train_cfg.compile and not meta:
            self.ddp_student = torch.compile(self.ddp_student)

    def _setup_optimizer(self) -> None:
        decay, no_decay = [], []
        declared = self.student.no_weight_decay()
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if _no_weight_decay(name, p, declared) else decay).append(p)
        cfg = self.optim_cfg
        effective_batch = self.train_cfg.batch_size * self.world_size * self.train_cfg.accumulate
        scale = effective_batch / cfg.base_batch_size if cfg.lr_scaling == "linear" else 1.0
        self.lr, self.min_lr, self.warmup_lr = cfg.lr * scale, cfg.min_lr * scale, cfg.warmup_lr * scale
        if cfg.warmup_steps is not None:
            self.warmup_steps = cfg.warmup_steps
        else:
            self.warmup_steps = round((cfg.warmup_epochs or 0) * self.steps_per_epoch)
        #: What the recipe's settings became (``config.yaml``'s ``record.effective``).
        self.effective = {"batch_size": effective_batch, "lr": self.lr, "lr_scale": scale,
                          "warmup_steps": self.warmup_steps}
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.warmup_lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            fused=self.device.type == "cuda",
        )

    def on_meta(self) -> "TrainStep":
        """A TrainStep of copies of these parts on :data:`ON_META` (FLOP counting): the same
        modules, switches and hooks with empty meta tensors (no weight copied, nothing
        allocated), in one process, whatever this step's device and wrapping; this step is left
        as it is. The text encoder and loggers are shared, not copied."""
        parts = self._unsharded if self._unsharded is not None else self.parts
        return TrainStep(parts.on_meta(), self.recipe, total_steps=self.total_steps,
                         steps_per_epoch=self.steps_per_epoch, process=ON_META)

    # ---------------------------------------------------------------- the step
    def mask_generator(self, step: int) -> torch.Generator:
        """Masks depend only on (seed, rank, step): identical after a resume, different per rank."""
        return mask_generator(self.seed, step, self.rank, self.mask_device)

    def step(self, batch: Batch | list[Batch], step: int) -> dict[str, Tensor]:
        """One optimizer step: enter the step's stage and set its learning rate; for each
        micro-batch mask, forward (encode, predict, teacher, losses), weighted sum, backward;
        then clip, AdamW, and the :attr:`after_step` list (teacher update, hooks). ``step`` is
        the number of steps taken before this one. Returns detached values to log.

        Given a list of micro-batches (``train.accumulate``), their gradients accumulate before
        the one update (DDP synchronises only on the last); logged values are their means.

        Each phase runs under ``torch.profiler.record_function("train_step.<phase>")`` and, when
        :attr:`phase_watch` is set (``vlmask bench``, FLOP counting), inside its ``phase``:
        ``mask``, ``student_forward`` (the teacher's forward inside it), ``student_backward``,
        ``optimizer`` (learning rate, zeroing, clipping, AdamW, scaler), then one phase per
        after-step entry (``teacher_update``, ``hooks``)."""
        micro = batch if isinstance(batch, list) else [batch]
        with self._phase("optimizer"):
            self.stages.enter(step)  # the stage follows from the step (vlmask.stages): weights, switches, frozen parts
            lr = lr_at(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr, self.warmup_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, Tensor] = {}
        for i, part in enumerate(micro):
            with self._phase("mask"):
                mask = self.masker(part, self.grid, self.mask_generator(step * len(micro) + i))
                if self.mask_device != self.device:  # on meta: drawn on the CPU batch, then both move
                    part, mask = part.to(self.device), mask.to(self.device)
            with parallel.gradient_sync(self.ddp_student, enabled=i == len(micro) - 1):  # DDP/FSDP sync once
                with self._phase("student_forward"), self.autocast():
                    terms = self.ddp_student(part, mask, self.grid, self.teacher)
                    total, values = weighted_sum(terms, self.loss_weights)
                with self._phase("student_backward"):
                    self.scaler.scale(total / len(micro)).backward()
            values["loss"] = total.detach()
            for k, v in values.items():
                logged[k] = logged[k] + v / len(micro) if k in logged else v / len(micro)
        with self._phase("optimizer"):
            parallel.average_replicated_gradients(self.replicated_params)
            if self.train_cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                logged["grad_norm"] = parallel.clip_gradients(self.student.parameters(), self.train_cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        for name, work in self.after_step:
            with self._phase(name):
                work(step + 1)
        return logged

    def __call__(self, batch: Batch | list[Batch], step: int) -> dict[str, Tensor]:
        """The same as :meth:`step` (``trainer.train_step(batch, i)`` reads as it did)."""
        return self.step(batch, step)

    def _update_teacher(self, step: int) -> None:
        if self.teacher is not None:
            self.teacher.update(self.student, step)

    def _after_optimizer_step_hooks(self, step: int) -> None:
        self.hooks.vlmask_after_optimizer_step(step=step, run=self.run)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(f"train_step.{name}"):
            if self.phase_watch is None:
                yield
            else:
                with self.phase_watch.phase(name):
                    yield

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the step: ``student`` and ``teacher`` (when there is one),
        full tensors by name (``student.safetensors``, ``teacher.safetensors``), then
        ``optimizer`` (keyed by parameter name) and ``scaler`` (``state.pt``). Under FSDP every
        rank must call it (the full tensors are gathered)."""
        state: dict[str, Any] = {"student": parallel.full_state_dict(self.student)}
        if self.teacher is not None:
            state["teacher"] = parallel.full_state_dict(self.teacher)
        state["optimizer"] = parallel.optimizer_state(self.student, self.optimizer)
        state["scaler"] = self.scaler.state_dict()
        return state

    def sharded_state_dict(self) -> dict[str, Any]:
        """What a sharded checkpoint keeps of the step (``vlmask.sharded``), as this rank holds it:
        ``tensors`` (``student``, ``teacher``, ``optimizer.state`` keyed by parameter name: DTensor
        shards under FSDP, plain tensors otherwise; each rank writes its own), then for
        ``state.pt`` ``optimizer_param_groups`` and ``scaler``. No collective."""
        optimizer = parallel.sharded_optimizer_state(self.student, self.optimizer)
        tensors: dict[str, Any] = {"student": parallel.sharded_state_dict(self.student)}
        if self.teacher is not None:
            tensors["teacher"] = parallel.sharded_state_dict(self.teacher)
        tensors["optimizer"] = {"state": optimizer["state"]}
        return {"tensors": tensors, "optimizer_param_groups": optimizer["param_groups"],
                "scaler": self.scaler.state_dict()}

    def load_sharded(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Load a sharded checkpoint (``vlmask.sharded``, whatever world size wrote it) and its
        ``state.pt`` ``state``, strictly; under FSDP every rank calls it."""
        sharded.load_training_state(checkpoint, self.student, self.teacher, self.optimizer,
                                    state["optimizer_param_groups"])
        self.scaler.load_state_dict(state["scaler"])

    def load_state_dict(self, state: dict[str, Any], sources: dict[str, Path] | None = None) -> None:
        """Load what :meth:`state_dict` gave, strictly: a missing, unexpected or mis-shaped tensor
        or an optimizer state of other parameters raises ``CheckpointError`` naming its file
        (``sources``: entry -> the file it was read from)."""
        sources = sources or {}
        ckpt.load_strict(self.student, state["student"], sources.get("student", Path("student")))
        if self.teacher is not None:
            ckpt.load_strict(self.teacher, state["teacher"], sources.get("teacher", Path("teacher")))
        try:
            parallel.load_optimizer_state(self.student, self.optimizer, state["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            source = sources.get("optimizer", Path("optimizer"))
            raise ckpt.CheckpointError(
                f"{source}: the optimizer state does not match this run's parameters "
                f"({type(error).__name__}: {error}); the weights in {source.parent} are intact"
            ) from error
        self.scaler.load_state_dict(state["scaler"])


def build_step(recipe: Recipe, plugins: Plugins, *, num_classes: int = 0, process: Process | None = None,
               manager: pluggy.PluginManager | None = None) -> TrainStep:
    """A TrainStep of ``recipe`` without data (``vlmask bench``, FLOP counting, the rehearsal):
    :func:`vlmask.build.build_components` with ``total_steps`` from :func:`steps_without_data`
    and ``num_classes`` (the classes of the synthetic labels the caller feeds), then the
    TrainStep on ``process`` (default :func:`join_processes`) with one step per epoch."""
    total_steps = steps_without_data(recipe)
    parts = build_components(recipe, plugins, total_steps=total_steps, num_classes=num_classes)
    return TrainStep(parts, recipe, total_steps=total_steps, process=process, manager=manager)
