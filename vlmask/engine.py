"""The engine: train a recipe's parts, checkpoint and resume the run.

The algorithm a reader looks for is in two short places: ``Student.forward`` (``vlmask.build``:
encode the visible tokens, predict the masked ones, ask the teacher, compute every loss term)
and ``Trainer.train_step`` (mask, forward, weighted sum, backward, clip, optimizer step,
teacher update). Everything else here is plumbing: devices, data, checkpoints, logging. The
parts come from ``vlmask.build.build_components``; a finished run is reopened with
``vlmask.runs.open_run``, not with a Trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vlmask import checkpoint as ckpt
from vlmask import parallel, rundir
from vlmask.build import Components, LossTerm, Student, autocast_of, build_components, resolve_device, resolve_precision, set_attention_backends
from vlmask.caches import CaptionEmbeddingCache
from vlmask.config import Recipe, RecipeError
from vlmask.diagnostics import training_diagnostics
from vlmask.hookspecs import RunInfo
from vlmask.provenance import git_commit, versions
from vlmask.schedules import lr_at
from vlmask.data_requirements import fill_data
from vlmask.data_loading import EpochBatches, SeededItems, collate_of, infinite, worker_init
from vlmask.paths import cache_dir
from vlmask.plugins import Plugins, default_plugins, new_manager
from vlmask.schema import build, settings, validate
from vlmask.stages import read_stages, stage_plan, staged_total
from vlmask.types import Batch, TokenGrid, gather_tokens


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


def _no_weight_decay(name: str, param: Tensor) -> bool:
    return param.ndim <= 1 or any(k in name for k in ("pos_embed", "mask_token", "cls_token", "logit_scale"))


def _count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _as_record(item: Any) -> Any:
    return dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item


def _non_finite_tensors(modules: dict[str, dict[str, Tensor]]) -> list[str]:
    """``module.key`` of every floating-point tensor holding a NaN or an infinity (one sync)."""
    named = [(f"{module}.{key}", t) for module, tensors in modules.items() for key, t in tensors.items()
             if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return []
    flags = [torch.isfinite(t).all() for _, t in named]
    flags = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    return [name for (name, _), ok in zip(named, flags.tolist()) if not ok]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PhaseTimer:
    """Seconds spent in each phase of ``Trainer.train_step`` (summed over the steps it saw).

    It waits for the device at every phase boundary (CUDA runs asynchronously), so set it only
    to measure (``trainer.phase_timer = PhaseTimer(trainer.device)``), never to train."""

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


class Trainer:
    """Trains a recipe: ``with Trainer(recipe) as trainer: trainer.train()``.

    The parts come from :func:`vlmask.build.build_components`; the Trainer owns only what
    training adds: the device and parallel wrapping, the data loader, the optimizer and loss
    scaler, the loop and its checkpoints, and a plugin manager of its own. That manager holds
    the process's loaded plugins plus this run's components (masker, targets, heads, teacher,
    loggers), so a run's hook implementations never leak into the process-wide manager or into
    another run. Leaving the ``with`` block (or :meth:`close`) unregisters them.
    """

    def __init__(self, recipe: Recipe, plugins: Plugins | None = None, console: Any = None, with_data: bool = True,
                 synthetic_classes: int = 0) -> None:
        """``with_data=False`` builds the model, optimizer and run settings without reading any
        data (benchmarks, FLOP counts, the rehearsal): ``train()`` is then unavailable, and the
        parts that take ``num_classes`` get ``synthetic_classes`` (the classes of the synthetic
        labels the caller feeds, :data:`vlmask.bench.SYNTHETIC_CLASSES`) instead of the data's."""
        self.recipe = recipe
        self.with_data = with_data
        self.synthetic_classes = synthetic_classes
        self.plugins = plugins or default_plugins()
        self.console = console
        problems = validate(recipe, self.plugins.registry)
        if problems:
            raise RecipeError(problems)
        self.train_cfg = settings(recipe, "train")
        self.optim_cfg = settings(recipe, "optim")
        self.data_cfg = settings(recipe, "data")
        self.seed = int(recipe.get("seed", 0))
        self.manager = new_manager()  # this run's own: the process's plugins, then this run's components
        for plugin in self.plugins.manager.get_plugins():
            self.manager.register(plugin, name=self.plugins.manager.get_name(plugin))
        self.hooks = self.manager.hook
        self.lock: rundir.RunDirLock | None = None
        self.features: FeatureTap | None = None
        self._setup_distributed()
        if with_data:
            self._claim_run_dir()  # at once: a second writer, or another recipe, is refused before any work
        try:
            torch.manual_seed(self.seed + self.rank)
            if with_data:
                self._setup_data()
            else:
                self.train_set, self.data_source, self.steps_per_epoch = None, "none (synthetic tensors)", 1
                self.accumulate = self.train_cfg.accumulate
                self.total_steps = int(staged_total(OmegaConf.to_container(recipe.config, resolve=True))  # type: ignore[arg-type]
                                       or self.train_cfg.max_steps or 1)
            self._setup_model()
            torch.manual_seed(self.seed + self.rank)  # then ranks draw differently (augmentation, dropout)
            self._setup_optimizer()
            self.stages = stage_plan(OmegaConf.to_container(recipe.config, resolve=True), self.student,  # type: ignore[arg-type]
                                     self.loss_weights, self.masker, self.parts.objectives, recipe.where("stages"))
            if with_data:
                self._setup_run_dir()
            else:
                self.run_dir, self.start_step, self.resumed_from = Path("."), 0, None
                self.run = RunInfo(Path("."), recipe, self.device, self.rank, self.world_size, 0, self.total_steps,
                                   self.attention)
        except BaseException:
            self._release_run_dir()
            raise
        for name, component in self.parts.hook_parts().items():  # components take part in this run's hooks
            if not self.manager.is_registered(component):
                self.manager.register(component, name=f"run:{name}:{id(component)}")

    #: Set to a :class:`PhaseTimer` to time the phases of :meth:`train_step` (``vlmask bench``).
    phase_timer: "PhaseTimer | None" = None
    #: The loss of the last step this process trained (a device tensor, read only at saves and at the end).
    last_loss: Tensor | None = None
    #: The last step's loss as recorded in the checkpoint a run resumed from (None in older checkpoints).
    resumed_last_loss: float | None = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- setup
    def _setup_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = resolve_device(str(self.recipe.get("device", "auto")))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"  # CPU tensors too (FSDP set-up)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
        self.precision = resolve_precision(self.recipe, self.train_cfg.precision, self.device)
        self.autocast = autocast_of(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def _setup_data(self) -> None:
        train_path = self.data_cfg.train
        self.data_source = train_path or "built-in synthetic"
        if train_path is None:
            if self.rank != 0:  # rank 0 makes the default set on first use; the others wait, then read it
                dist.barrier()
            manifests = self.hooks.vlmask_default_manifests(recipe=self.recipe, cache_dir=cache_dir(), progress=self.rank == 0)
            if self.rank == 0 and self.world_size > 1:
                dist.barrier()
            if manifests is None:
                raise RecipeError([f"{self.recipe.path}: key data.train: not set, and no plugin provides default data "
                                   "(is the built-in plugin blocked?)"])
            train_path = str(manifests[0])
        self.train_manifest = Path(train_path)
        # fields the recipe needs that lines lack (action boxes) are filled by a plugin first (vlmask.data_requirements)
        self.data_manifest, self.data_filled = fill_data(self.recipe, self.plugins.registry, self.hooks,
                                                         self.train_manifest, cache_dir(), self.rank, self.world_size,
                                                         self._log)
        self.train_set = build(self.plugins.registry, self.recipe, "data.dataset", "dataset",
                               manifest=str(self.data_manifest), train=True)
        self.collate = collate_of(self.train_set)
        self.batches = EpochBatches(len(self.train_set), self.train_cfg.batch_size, self.seed, self.rank, self.world_size)
        workers = self.data_cfg.num_workers
        self.loader = DataLoader(
            SeededItems(self.train_set),
            batch_sampler=self.batches,
            num_workers=workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=worker_init,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.accumulate = self.train_cfg.accumulate
        if self.accumulate < 1:
            raise RecipeError([f"{self.recipe.where('train.accumulate')}: key train.accumulate: must be >= 1, got {self.accumulate}"])
        steps_per_epoch = max(1, self.batches.batches_per_epoch // self.accumulate)
        staged = staged_total(OmegaConf.to_container(self.recipe.config, resolve=True))  # type: ignore[arg-type]
        if staged is not None:  # a staged run's length is its stages' (vlmask.stages)
            self.total_steps = staged
        elif self.train_cfg.max_steps is not None:
            self.total_steps = int(self.train_cfg.max_steps)
        elif self.train_cfg.epochs is not None:
            self.total_steps = max(1, round(self.train_cfg.epochs * steps_per_epoch))
        else:
            raise RecipeError([f"{self.recipe.path}: set train.max_steps or train.epochs"])
        self.steps_per_epoch = steps_per_epoch

    def _log(self, line: str) -> None:
        """A line of the run's start-up log (stderr when no console was given)."""
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def _check_clip_shape(self, grid: TokenGrid) -> None:
        """The dataset's clips must be the (frames, height, width) the encoder's grid expects."""
        expected = (grid.t * grid.tubelet, grid.h * grid.patch, grid.w * grid.patch)
        clip_shape = tuple(self.train_set[0]["video"].shape[1:]) if self.train_set is not None else expected
        if clip_shape != expected:
            raise RecipeError([
                f"{self.recipe.where('data.dataset')}: the dataset gives clips of {clip_shape} (frames, height, width) "
                f"but the encoder ({self.recipe.where('model.encoder')}) expects {expected}"
            ])

    def _setup_model(self) -> None:
        recipe = self.recipe
        num_classes = (len(getattr(self.train_set, "classes", []) or []) if self.train_set is not None
                       else self.synthetic_classes)
        self.parts: Components = build_components(recipe, self.plugins, total_steps=self.total_steps,
                                                  num_classes=num_classes, check_grid=self._check_clip_shape)
        self.text_encoder = self.parts.text_encoder
        self.text_table: Tensor | None = None
        if self.text_encoder is not None:
            cache = CaptionEmbeddingCache(cache_dir() / "text")
            captions = list(self.train_set.captions) if self.train_set is not None else []
            if self.rank == 0:  # rank 0 fills the cache; the others then read it
                self.text_table = cache.embed(self.text_encoder, captions, progress=True)
            if self.world_size > 1:
                dist.barrier()
            if self.rank != 0:
                self.text_table = cache.embed(self.text_encoder, captions, progress=False)
            self.text_table = self.text_table.to(self.device)
        self.grid = self.parts.grid
        self.parallel = self.train_cfg.parallel if self.world_size > 1 else "none"
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise RecipeError([f"{self.recipe.where('train.parallel')}: key train.parallel: fsdp runs in fp32 or bf16, not fp16"])
        # under FSDP the full model never goes to the device: it is built on the CPU and each rank moves its shard
        model_device = torch.device("cpu") if self.parallel == "fsdp" else self.device
        self.student: Student = self.parts.student.to(model_device)
        self.teacher = self.parts.teacher.to(model_device) if self.parts.teacher is not None else None
        self.masker = self.parts.masker
        self.loggers = dict(self.parts.loggers)
        self.loss_weights = dict(self.parts.loss_weights)
        self.attention, self.attention_reason = set_attention_backends(self.parts, self.device)
        self.ddp_student: nn.Module = self.student
        self.replicated_params: list[nn.Parameter] = []  # FSDP: scalars left unsharded
        if self.parallel == "fsdp":
            self.replicated_params = parallel.shard_fsdp(self.student, self.teacher, self.precision, self.device)
        elif self.parallel == "ddp":
            if self.teacher is not None:  # DDP broadcasts the student's weights, not the teacher's
                parallel.broadcast_from_rank0(self.teacher)
            if any(p.requires_grad for p in self.student.parameters()):
                # a stage that freezes parameters leaves them without gradients: DDP must not wait for them
                freezes = any(stage.freeze for stage in read_stages(OmegaConf.to_container(self.recipe.config, resolve=True)))
                find_unused = self.train_cfg.find_unused_parameters or freezes
                self.ddp_student = parallel.wrap_ddp(self.student, self.device, find_unused)

        self.features = FeatureTap(self.student.encoder, self.teacher)  # before compile: it ignores later hooks
        if self.train_cfg.compile:
            self.ddp_student = torch.compile(self.ddp_student)

    def _setup_optimizer(self) -> None:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if _no_weight_decay(name, p) else decay).append(p)
        cfg = self.optim_cfg
        effective_batch = self.train_cfg.batch_size * self.world_size * self.train_cfg.accumulate
        scale = effective_batch / cfg.base_batch_size if cfg.lr_scaling == "linear" else 1.0
        self.lr, self.min_lr, self.warmup_lr = cfg.lr * scale, cfg.min_lr * scale, cfg.warmup_lr * scale
        if cfg.warmup_steps is not None:
            self.warmup_steps = cfg.warmup_steps
        else:
            self.warmup_steps = round((cfg.warmup_epochs or 0) * self.steps_per_epoch)
        self.effective = {"batch_size": effective_batch, "lr": self.lr, "lr_scale": scale, "warmup_steps": self.warmup_steps}
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.warmup_lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            fused=self.device.type == "cuda",
        )

    def _claim_run_dir(self) -> None:
        """Choose the run directory, lock it (rank 0: a second writer is refused naming the
        holder, ``vlmask.rundir.RunDirBusy``) and check that a directory trained before was
        trained with this recipe (``RunDirMismatch`` naming the keys that differ; only a larger
        ``train.max_steps`` may continue it)."""
        run = settings(self.recipe, "run")
        if run.dir:
            run_dir = Path(run.dir)
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path(run.root) / f"{run.name or self.recipe.name}-{stamp}"
        self.run_dir = run_dir
        self._made_run_dir = not run_dir.exists()
        if self.rank == 0:
            self.lock = rundir.RunDirLock(run_dir).acquire()
        try:
            self.recipe_check = rundir.check_same_recipe(run_dir, self._resolved_config(), self.recipe.overrides,
                                                         recipe=str(self.recipe.path))
            self.recipe_check.raise_if_refused()
        except BaseException:
            self._release_run_dir()
            raise

    def _release_run_dir(self) -> None:
        """Unlock the run directory; one this Trainer made and never wrote to is removed again."""
        if self.lock is None:
            return
        self.lock.release()
        self.lock = None
        if self._made_run_dir and {p.name for p in self.run_dir.iterdir()} <= {rundir.LOCK_NAME}:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _setup_run_dir(self) -> None:
        """Resume from the latest checkpoint, if any; rank 0 then cuts ``metrics.jsonl`` back to
        the step it resumes at (atomically; a torn last line, the trace of a kill, is dropped with
        a warning naming it) and removes the temporary folders of checkpoint writes that never
        finished."""
        run_dir = self.run_dir
        self.start_step = 0
        self.resumed_from: Path | None = None
        self.resumed_last_loss: float | None = None
        self.clock = rundir.TrainingClock()  # wall_s and clips_per_s, kept across resumes
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if latest is not None:
            self._resume(latest)
        if self.rank == 0:
            rundir.truncate_metrics_after(run_dir / "metrics.jsonl", self.start_step)
            for orphan in ckpt.remove_orphan_temporaries(run_dir / "checkpoints"):
                print(f"removed {orphan} (a checkpoint write that never finished)", file=sys.stderr, flush=True)
        self.run = RunInfo(
            dir=run_dir,
            recipe=self.recipe,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            start_step=self.start_step,
            total_steps=self.total_steps,
            attention=self.attention,
        )

    def close(self) -> None:
        """Unregister this run's components from the run's plugin manager, remove the feature
        hooks and unlock the run directory (what ``__exit__`` calls)."""
        for component in self.parts.hook_parts().values():
            if self.manager.is_registered(component):
                self.manager.unregister(component)
        if self.features is not None:
            self.features.remove()
        self._release_run_dir()

    # ---------------------------------------------------------------- the step
    def mask_generator(self, step: int) -> torch.Generator:
        """Masks depend only on (seed, rank, step): identical after a resume, different per rank."""
        return torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + step) * 4099 + self.rank)

    def train_step(self, batch: Batch | list[Batch], step: int) -> dict[str, Tensor]:
        """One optimizer step: mask, forward (encode, predict, teacher, losses), weighted sum,
        backward, clip, AdamW, EMA teacher update. Returns detached values to log.

        Given a list of micro-batches (``train.accumulate``), their gradients accumulate before
        the one update (DDP synchronises only on the last); logged values are their means.

        Each phase runs under ``torch.profiler.record_function("train_step.<phase>")`` and, when
        ``phase_timer`` is set (``vlmask bench``), is timed by it: ``mask``, ``student_forward``
        (the teacher's forward inside it), ``student_backward``, ``optimizer`` (learning rate,
        zeroing, clipping, AdamW, scaler), ``teacher_update`` and ``hooks``."""
        micro = batch if isinstance(batch, list) else [batch]
        with self._phase("optimizer"):
            self.stages.enter(step)  # the stage follows from the step (vlmask.stages): loss weights, switches, frozen parts
            lr = lr_at(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr, self.warmup_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, Tensor] = {}
        for i, part in enumerate(micro):
            with self._phase("mask"):
                mask = self.masker(part, self.grid, self.mask_generator(step * len(micro) + i))
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
        with self._phase("teacher_update"):
            if self.teacher is not None:
                self.teacher.update(self.student, step + 1)
        with self._phase("hooks"):
            self.hooks.vlmask_after_optimizer_step(step=step + 1, run=self.run)
        return logged

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(f"train_step.{name}"):
            if self.phase_timer is None:
                yield
            else:
                with self.phase_timer.phase(name):
                    yield

    # ---------------------------------------------------------------- the loop
    def prepare(self, batch: Batch) -> Batch:
        """Move a loader batch to the device and attach its cached caption embeddings."""
        batch = batch.to(self.device)
        if self.text_table is not None and batch.index is not None:
            batch.text_embedding = self.text_table[batch.index]
        return batch

    def train(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train to ``total_steps``; returns the summary (also written to ``summary.json``)."""
        main = self.rank == 0
        if main:
            self._write_config()
            if self.start_step < self.total_steps:  # a finished run continued to a larger max_steps
                (self.run_dir / "summary.json").unlink(missing_ok=True)
        self.hooks.vlmask_train_start(run=self.run)
        self.student.train()
        step = self.start_step
        epoch, start_batch = divmod(step * self.accumulate, self.batches.batches_per_epoch)
        batches: Iterator[Batch] = infinite(self.loader, self.batches, epoch, start_batch)
        sums: dict[str, Tensor] = {}
        count, t_log = 0, time.perf_counter()
        clips_per_step = self.train_cfg.batch_size * self.world_size * self.accumulate
        last: dict[str, float] = {}
        rates = self.clock.start()  # the log windows' clips/s; the clock also holds what earlier processes trained
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if main else None
        load_failures: dict[int, tuple[int, str, str]] = {}  # clips that failed to decode while training
        guard = rundir.NonFiniteGuard(self.device, start_step=step)  # on the device: no sync per step
        features = self.features
        assert features is not None
        try:
            while step < self.total_steps:
                micro = [self.prepare(next(batches)) for _ in range(self.accumulate)]
                for failure in (f for part in micro for f in part.extra.get("load_failures", ())):
                    load_failures[failure[0]] = tuple(failure)
                log_step = (step + 1) % self.train_cfg.log_every == 0 or step + 1 == self.total_steps
                with features.arm(enabled=log_step and main):
                    logged = self.train_step(micro if self.accumulate > 1 else micro[0], step)
                step += 1
                guard.observe(logged["loss"], {k: logged[k] for k in self.loss_weights if k in logged})
                self.last_loss = logged["loss"]
                for k, v in logged.items():
                    sums[k] = sums[k] + v.float() if k in sums else v.float()
                count += 1
                if log_step:
                    guard.check(noticed_at=step, kept=self._last_checkpoint())
                    now = time.perf_counter()
                    rate = count * clips_per_step / (now - t_log)
                    rates.append(rate)
                    last = {"step": step, **{k: (v / count).item() for k, v in sums.items()}}
                    last["lr"] = self.optimizer.param_groups[0]["lr"]
                    last["clips_per_s"] = rate
                    last.update(features.diagnostics())
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(last) + "\n")
                        metrics_file.flush()
                        self.hooks.vlmask_step_end(step=step, metrics=last, run=self.run)
                    sums, count, t_log = {}, 0, time.perf_counter()
                if step % self.train_cfg.ckpt_every == 0 or step == self.total_steps:
                    guard.check(noticed_at=step, kept=self._last_checkpoint())  # never save after a bad step
                    self.save(step)
                if progress is not None and main:
                    progress(step, last)
        finally:
            if metrics_file is not None:
                metrics_file.close()
        skipped = [_as_record(s) for s in getattr(self.train_set, "skipped", [])]
        skipped += [{"line": line, "video": video, "reason": f"failed while training: {reason}"}
                    for line, video, reason in load_failures.values()]
        summary = {
            "steps": step,
            "wall_s": self.clock.wall_s(trained=step > self.start_step),  # resumed at the end: the checkpoint's
            "final_loss": self._final_loss(),
            "clips_per_s": self.clock.clips_per_s(),
            "peak_mem_mb": round(peak_memory_mb(self.device), 1),
            "skipped_clips": len(skipped),
            "skipped": skipped[:10],
            "resumed_from_step": self.start_step or None,
            "device": str(self.device),
            "world_size": self.world_size,
            "parallel": self.parallel,
            "params_per_rank": parallel.local_parameter_count(self.student),
        }
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            self.hooks.vlmask_train_end(summary=summary, run=self.run)
        return summary

    def _final_loss(self) -> float | None:
        """``summary.json``'s ``final_loss``: the loss of the run's last step (rank 0's, the mean
        over its micro-batches), not a log-window mean, so a resume does not change it; a run
        resumed at its final checkpoint reads it from that checkpoint."""
        if self.last_loss is not None:
            return float(self.last_loss)
        return self.resumed_last_loss

    def _last_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.run_dir / "checkpoints", report=False)

    # ---------------------------------------------------------------- checkpoints
    def _resolved_config(self) -> dict[str, Any]:
        """The recipe as plain containers, every interpolation resolved (``config.yaml`` without ``record``)."""
        config = OmegaConf.to_container(self.recipe.config, resolve=True)
        assert isinstance(config, dict)
        return config  # type: ignore[return-value]

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = self._resolved_config()
        config["record"] = {
            "recipe": str(self.recipe.path),
            "git_commit": git_commit(self.recipe.path.parent),
            "overrides": self.recipe.overrides,
            "versions": versions(self.plugins.distributions),
            "device": str(self.device),
            "precision": self.precision,
            "attention": self.attention,
            "world_size": self.world_size,
            "parallel": self.parallel,
            "effective": self.effective,
            "total_steps": self.total_steps,
            "data": {"train": str(self.train_manifest), "clips": len(self.train_set),
                     "decoder": getattr(self.train_set, "decoder", None),
                     "decoder_reason": getattr(self.train_set, "decoder_reason", None),
                     **({"read": str(self.data_manifest), "filled": self.data_filled} if self.data_filled else {})},
        }
        tmp = self.run_dir / ".config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        os.replace(tmp, self.run_dir / "config.yaml")

    def save(self, step: int) -> Path | None:
        """Write a checkpoint of full tensors (rank 0 writes; under FSDP every rank gathers)."""
        if self.rank != 0 and self.parallel != "fsdp":
            return None
        modules = {"student": parallel.full_state_dict(self.student)}
        if self.teacher is not None:
            modules["teacher"] = parallel.full_state_dict(self.teacher)
        optimizer_state = parallel.optimizer_state(self.student, self.optimizer)
        if self.rank != 0:
            return None
        bad = _non_finite_tensors(modules)
        if bad:  # a gradient that was not finite can leave the weights so while the loss still was
            kept = self._last_checkpoint()
            raise rundir.NonFiniteLoss(f"not saving step {step}: non-finite weights in {', '.join(bad[:5])}"
                                       + (f"; the last good checkpoint is {kept}" if kept else "")
                                       + "; try train.precision fp32/bf16, a lower optim.lr or train.grad_clip", step)
        state = {
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "total_steps": self.total_steps,
            "last_loss": float(self.last_loss) if self.last_loss is not None else self.resumed_last_loss,
            **self.clock.state(),  # wall_s, clips_per_s: summary.json's figures survive a resume at the end
        }
        path = ckpt.save_checkpoint(self.run_dir / "checkpoints", step, modules, state, keep=self.train_cfg.keep_checkpoints)
        self.hooks.vlmask_checkpoint_saved(step=step, path=path, run=self.run)
        return path

    def _resume(self, path: Path) -> None:
        ckpt.load_strict(self.student, ckpt.load_tensors(path / "student.safetensors"), path / "student.safetensors")
        if self.teacher is not None:
            ckpt.load_strict(self.teacher, ckpt.load_tensors(path / "teacher.safetensors"), path / "teacher.safetensors")
        state = ckpt.load_state(path / "state.pt")
        try:
            parallel.load_optimizer_state(self.student, self.optimizer, state["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise ckpt.CheckpointError(
                f"{path / 'state.pt'}: the optimizer state does not match this run's parameters "
                f"({type(error).__name__}: {error}); the weights in {path} are intact"
            ) from error
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.start_step = int(state["step"])
        self.resumed_from = path
        last_loss = state.get("last_loss")  # absent in checkpoints of older runs
        self.resumed_last_loss = float(last_loss) if isinstance(last_loss, (int, float)) else None
        self.clock = rundir.TrainingClock.resumed(state)

    def describe(self) -> str:
        """The first line of a run: what runs on what."""
        enc = self.student.encoder
        parts = [
            f"vlmask {self.recipe.name}",
            f"device {self.device} ({self.precision}, world {self.world_size}"
            + (f", {self.parallel}" if self.world_size > 1 else "") + ")",
            f"attention {self.attention}" + (f" ({self.attention_reason})" if self.attention_reason else ""),
            f"data {self.data_source}: {len(self.train_set)} clips, {len(getattr(self.train_set, 'skipped', []))} skipped",
            f"decoder {getattr(self.train_set, 'decoder', 'n/a')}"
            + (f" ({self.train_set.decoder_reason})" if getattr(self.train_set, "decoder_reason", None) else ""),
            f"encoder {_human(_count(enc))} params, grid {self.grid.t}x{self.grid.h}x{self.grid.w}, "
            f"predictor {_human(_count(self.student.predictor))}",
            f"{self.total_steps} steps x {self.train_cfg.batch_size * self.world_size * self.accumulate} clips"
            + (f" ({self.accumulate} micro-batches)" if self.accumulate > 1 else ""),
        ]
        if self.resumed_from is not None:
            parts.append(f"resumed at step {self.start_step}")
        return " | ".join(parts)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def remove_run(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
