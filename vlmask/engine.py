"""The engine: the training loop of a recipe, its data, checkpoints and resume.

The algorithm a reader looks for is in ``vlmask.step``: ``TrainStep.step`` (mask, forward,
weighted sum, backward, clip, optimizer step, after-step work) and ``Student.forward``
(``vlmask.build``). A :class:`Trainer` is the loop around one TrainStep: the data
(:class:`TrainData`), the run directory (lock, resume, metrics, checkpoints, summary) and the
lifecycle hooks. The parts come from ``vlmask.build.build_components``; a finished run is
reopened with ``vlmask.runs.open_run``, not with a Trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import pluggy
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from vlmask import checkpoint as ckpt
from vlmask import parallel, rundir, sharded
from vlmask.build import build_components
from vlmask.caches import CaptionEmbeddingCache
from vlmask.config import Recipe, RecipeError
from vlmask.data_loading import EpochBatches, SeededItems, WorkerSignals, collate_of, infinite, worker_init
from vlmask.data_requirements import fill_data
from vlmask.hookspecs import RunInfo
from vlmask.kinds import DecodingDataset
from vlmask.launch import in_turn
from vlmask.paths import cache_dir
from vlmask.plugins import Plugins, default_plugins, run_manager
from vlmask.preemption import Preempted, PreemptionWatch, signal_name, signal_numbers
from vlmask.provenance import git_commit, versions
from vlmask.schedules import lr_at  # noqa: F401  (a public name of this module before vlmask.step)
from vlmask.schema import build, settings, top_settings, validate
from vlmask.stages import staged_total
from vlmask.step import FeatureTap, PhaseTimer, Process, TrainStep, join_processes, weighted_sum  # noqa: F401
from vlmask.types import Batch, TokenGrid


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


class TrainData:
    """A recipe's training data for one process: the manifest (``data.train``, or the default
    set a plugin answers ``vlmask_default_manifests`` with), filled where the recipe needs fields
    its lines lack (``vlmask.data_requirements``), the dataset, its resumable batch order and
    loader, the run's length in optimizer steps, and (:meth:`embed_captions`) the cached caption
    embeddings of its clips. ``vlmask bench --loader`` reads one without a Trainer.

    ``hooks`` is the plugin manager's hook relay that answers the data hooks; ``log`` prints a
    line of the run's start-up log.
    """

    def __init__(self, recipe: Recipe, plugins: Plugins, hooks: pluggy.HookRelay, process: Process,
                 log: Callable[[str], None]) -> None:
        self.recipe = recipe
        rank, world_size = process.rank, process.world_size
        train = settings(recipe, "train")
        data = settings(recipe, "data")
        train_path = data.train
        #: Where the clips come from, for the run's first line.
        self.source = train_path or "built-in synthetic"
        if train_path is None:  # rank 0 makes the default set on first use, then each node's first process
            manifests = in_turn(rank, process.local_rank, world_size, lambda progress: hooks.vlmask_default_manifests(
                recipe=recipe, cache_dir=cache_dir(), progress=progress))
            if manifests is None:
                raise RecipeError([f"{recipe.path}: key data.train: not set, and no plugin provides default data "
                                   "(is the built-in plugin blocked?)"])
            train_path = str(manifests[0])
        self.manifest = Path(train_path)
        # fields the recipe needs that lines lack (action boxes) are filled by a plugin first (vlmask.data_requirements)
        self.read, self.filled = fill_data(recipe, plugins.registry, hooks, self.manifest, cache_dir(), rank,
                                           world_size, log, local_rank=process.local_rank)
        self.dataset = build(plugins.registry, recipe, "data.dataset", "dataset", manifest=str(self.read), train=True)
        seed = top_settings(recipe).seed
        # A stream (an IterableDataset, e.g. video_shards) orders and splits its own clips: its plan(...) is
        # EpochBatches' contract (epoch, start_batch, batches_per_epoch); workers are not persistent, so
        # each epoch's workers see the epoch it sets.
        streamed = isinstance(self.dataset, IterableDataset)
        self.batches = (self.dataset.plan(train.batch_size, seed, rank, world_size) if streamed  # type: ignore[attr-defined]
                        else EpochBatches(len(self.dataset), train.batch_size, seed, rank, world_size))
        workers = data.num_workers
        #: The preemption signals the loader's workers ignore until released (vlmask.data_loading).
        self.worker_signals = WorkerSignals(signal_numbers(train.preempt_signals) if workers > 0 else ())
        self.loader = DataLoader(
            self.dataset if streamed else SeededItems(self.dataset),
            batch_sampler=None if streamed else self.batches,
            batch_size=train.batch_size if streamed else 1,
            drop_last=streamed,
            num_workers=workers,
            collate_fn=collate_of(self.dataset),
            pin_memory=process.device.type == "cuda",
            persistent_workers=workers > 0 and not streamed,
            worker_init_fn=functools.partial(worker_init, signals=self.worker_signals),
            prefetch_factor=4 if workers > 0 else None,
        )
        self.accumulate = train.accumulate
        if self.accumulate < 1:
            raise RecipeError([f"{recipe.where('train.accumulate')}: key train.accumulate: must be >= 1, got {self.accumulate}"])
        self.steps_per_epoch = max(1, self.batches.batches_per_epoch // self.accumulate)
        staged = staged_total(OmegaConf.to_container(recipe.config, resolve=True))  # type: ignore[arg-type]
        if staged is not None:  # a staged run's length is its stages' (vlmask.stages)
            self.total_steps = staged
        elif train.max_steps is not None:
            self.total_steps = int(train.max_steps)
        elif train.epochs is not None:
            self.total_steps = max(1, round(train.epochs * self.steps_per_epoch))
        else:
            raise RecipeError([f"{recipe.path}: set train.max_steps or train.epochs"])
        self.device = process.device
        #: Caption embeddings of the clips, by clip index, on the device (:meth:`embed_captions`).
        self.text_table: Tensor | None = None

    @property
    def num_classes(self) -> int:
        """The dataset's classes (what parts that take ``num_classes`` are built with)."""
        return len(self.dataset.classes or [])

    def check_clip_shape(self, grid: TokenGrid) -> None:
        """The dataset's clips must be the (frames, height, width) the encoder's grid expects."""
        expected = (grid.t * grid.tubelet, grid.h * grid.patch, grid.w * grid.patch)
        clip_shape = tuple(self.dataset[0]["video"].shape[1:])
        if clip_shape != expected:
            raise RecipeError([
                f"{self.recipe.where('data.dataset')}: the dataset gives clips of {clip_shape} (frames, height, width) "
                f"but the encoder ({self.recipe.where('model.encoder')}) expects {expected}"
            ])

    def embed_captions(self, text_encoder: Any | None, process: Process) -> None:
        """Embed every clip's caption with the frozen text encoder once, through the cache
        (rank 0 fills it, then each node's first process, :func:`vlmask.launch.in_turn`; the
        others read it), into :attr:`text_table` on the device."""
        if text_encoder is None:
            return
        cache = CaptionEmbeddingCache(cache_dir() / "text")
        captions = list(self.dataset.captions)
        table = in_turn(process.rank, process.local_rank, process.world_size,
                        lambda progress: cache.embed(text_encoder, captions, progress=progress))
        assert table is not None
        self.text_table = table.to(self.device)

    def prepare(self, batch: Batch) -> Batch:
        """Move a loader batch to the device and attach its cached caption embeddings."""
        batch = batch.to(self.device)
        if self.text_table is not None and batch.index is not None:
            batch.text_embedding = self.text_table[batch.index]
        return batch

    def record(self) -> dict[str, Any]:
        """``config.yaml``'s ``record.data``."""
        return {"train": str(self.manifest), "clips": len(self.dataset),
                **({"decoder": self.dataset.decoder, "decoder_reason": self.dataset.decoder_reason}
                   if isinstance(self.dataset, DecodingDataset) else {"decoder": None, "decoder_reason": None}),
                **({"read": str(self.read), "filled": self.filled} if self.filled else {})}


@dataclasses.dataclass
class LogWindow:
    """The steps since the last ``metrics.jsonl`` line: the sum of each logged value (device
    tensors, no sync per step) and how many steps. Checkpoints keep it (``state.pt``'s
    ``log_window``), so a run resumed between two log steps (a preemption, ``ckpt_every`` not a
    multiple of ``log_every``) writes the same next line as a run never stopped."""

    sums: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    count: int = 0

    def add(self, logged: dict[str, Tensor]) -> None:
        for k, v in logged.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: (v / self.count).item() for k, v in self.sums.items()}

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "sums": {k: v.detach().cpu() for k, v in self.sums.items()}}

    @classmethod
    def resumed(cls, state: Any, device: torch.device) -> "LogWindow":
        """The window a checkpoint kept (none in checkpoints of older runs: an empty one)."""
        if not isinstance(state, dict) or not state.get("count"):
            return cls()
        return cls({k: v.to(device) for k, v in state["sums"].items()}, int(state["count"]))


class Trainer:
    """Trains a recipe: ``with Trainer(recipe) as trainer: trainer.train()``.

    The loop around one :class:`vlmask.step.TrainStep` (``trainer.train_step``: the parts on
    their device, the optimizer, the step itself): the Trainer adds the data
    (:class:`TrainData`, ``trainer.data``), the run directory (lock, resume, ``metrics.jsonl``,
    checkpoints, ``summary.json``) and the lifecycle hooks. It has a plugin manager of its own:
    the process's loaded plugins plus this run's components (masker, targets, heads, teacher,
    loggers), so a run's hook implementations never leak into the process-wide manager or into
    another run. Leaving the ``with`` block (or :meth:`close`) unregisters them.
    """

    #: The loss of the last step this process trained (a device tensor, read only at saves and at the end).
    last_loss: Tensor | None = None
    #: The last step's loss as recorded in the checkpoint a run resumed from (None in older checkpoints).
    resumed_last_loss: float | None = None
    #: The log window the checkpoint a run resumed from kept (``LogWindow.state``; None: empty).
    resumed_window: dict[str, Any] | None = None
    #: The steps since the last metrics line (while training; saved with each checkpoint).
    window: LogWindow | None = None

    def __init__(self, recipe: Recipe, plugins: Plugins | None = None, console: Any = None) -> None:
        self.recipe = recipe
        self.plugins = plugins or default_plugins()
        self.console = console
        problems = validate(recipe, self.plugins.registry)
        if problems:
            raise RecipeError(problems)
        process = join_processes(recipe)
        self.lock: rundir.RunDirLock | None = None
        self._claim_run_dir(process.rank)  # at once: a second writer, or another recipe, is refused before any work
        try:
            self.data, self.train_step = build_training(recipe, self.plugins, process, self._log, validated=True)
        except BaseException:
            self._release_run_dir()
            raise
        try:
            self._resume_run_dir()
            rundir.check_shared(self.run_dir, self.start_step, process.rank, process.world_size)  # several nodes
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def rank(self) -> int:
        return self.train_step.rank

    @property
    def total_steps(self) -> int:
        """The run's length in optimizer steps (its stages', ``train.max_steps`` or ``train.epochs`` of the data)."""
        return self.data.total_steps

    @property
    def train_set(self) -> Any:
        return self.data.dataset

    # ---------------------------------------------------------------- the run directory
    def _log(self, line: str) -> None:
        """A line of the run's start-up log (stderr when no console was given)."""
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def _claim_run_dir(self, rank: int) -> None:
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
        if rank == 0:
            self.lock = rundir.RunDirLock(run_dir).acquire()
        try:
            rundir.check_same_recipe(run_dir, self._resolved_config(), self.recipe.overrides,
                                     recipe=str(self.recipe.path)).raise_if_refused()
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

    def _resume_run_dir(self) -> None:
        """Resume from the latest checkpoint, if any; rank 0 then cuts ``metrics.jsonl`` back to
        the step it resumes at (atomically; a torn last line, the trace of a kill, is dropped with
        a warning naming it) and removes the temporary folders of checkpoint writes that never
        finished. The TrainStep's hooks then learn this run (``RunInfo``)."""
        run_dir, step = self.run_dir, self.train_step
        self.start_step = 0
        self.resumed_from: Path | None = None
        self.clock = rundir.TrainingClock()  # wall_s and clips_per_s, kept across resumes
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if latest is not None:
            self._resume(latest)
        if step.rank == 0:
            rundir.truncate_metrics_after(run_dir / "metrics.jsonl", self.start_step)
            for orphan in ckpt.remove_orphan_temporaries(run_dir / "checkpoints"):
                print(f"removed {orphan} (a checkpoint write that never finished)", file=sys.stderr, flush=True)
        step.run = RunInfo(
            dir=run_dir,
            recipe=self.recipe,
            device=step.device,
            rank=step.rank,
            world_size=step.world_size,
            start_step=self.start_step,
            total_steps=self.total_steps,
            attention=step.attention,
        )

    def close(self) -> None:
        """Unregister this run's components from the run's plugin manager, remove the feature
        hooks and unlock the run directory (what ``__exit__`` calls)."""
        self.train_step.close()
        self.data.worker_signals.release()  # the loader's workers end on SIGTERM again
        self._release_run_dir()

    # ---------------------------------------------------------------- the loop
    def prepare(self, batch: Batch) -> Batch:
        """Move a loader batch to the device and attach its cached caption embeddings."""
        return self.data.prepare(batch)

    def train(self, progress: Callable[[int, dict[str, float]], None] | None = None,
              preemption: PreemptionWatch | None = None) -> dict[str, Any]:
        """Train to ``total_steps``; returns the summary (also written to ``summary.json``).

        A preemption signal (``train.preempt_signals``, ``vlmask.preemption``) stops every rank
        after the step it is taking: they save that step (unless just saved) and this raises
        :class:`vlmask.preemption.Preempted`; ``summary.json`` is not written (the run is not
        finished), ``metrics.jsonl`` keeps its lines. The signals are watched by ``preemption``
        when given (``vlmask run`` installs it and keeps it while the process exits), else by a
        watch installed for this call only, whose previous handlers are restored when it returns
        or raises."""
        if preemption is not None:
            return self._train(progress, preemption)
        with PreemptionWatch(settings(self.recipe, "train").preempt_signals) as watch:
            return self._train(progress, watch)

    def _train(self, progress: Callable[[int, dict[str, float]], None] | None, watch: PreemptionWatch) -> dict[str, Any]:
        train_step = self.train_step
        main = train_step.rank == 0
        if main:
            self._write_config()
            if self.start_step < self.total_steps:  # a finished run continued to a larger max_steps
                (self.run_dir / "summary.json").unlink(missing_ok=True)
        hooks, data = train_step.hooks, self.data
        hooks.vlmask_train_start(run=train_step.run)
        train_step.student.train()
        step = self.start_step
        epoch, start_batch = divmod(step * data.accumulate, data.batches.batches_per_epoch)
        batches: Iterator[Batch] = infinite(data.loader, data.batches, epoch, start_batch)
        window = self.window = LogWindow.resumed(self.resumed_window, train_step.device)
        timed, t_log = 0, time.perf_counter()  # steps this process took in the log window, for clips/s
        train_cfg = train_step.train_cfg
        clips_per_step = train_cfg.batch_size * train_step.world_size * data.accumulate
        last: dict[str, float] = {}
        rates = self.clock.start()  # the log windows' clips/s; the clock also holds what earlier processes trained
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if main else None
        load_failures: dict[int, tuple[int, str, str]] = {}  # clips that failed to decode while training
        guard = rundir.NonFiniteGuard(train_step.device, start_step=step)  # on the device: no sync per step
        features = train_step.features
        saved = -1  # the step this process saved last
        try:
            while step < self.total_steps:
                stop = watch.agreed(train_step.world_size)  # every rank, every step: after a signal all stop here
                if stop:
                    self._preempt(step, stop, saved, guard)
                micro = [data.prepare(next(batches)) for _ in range(data.accumulate)]
                for failure in (f for part in micro for f in part.extra.get("load_failures", ())):
                    load_failures[failure[0]] = tuple(failure)
                log_step = (step + 1) % train_cfg.log_every == 0 or step + 1 == self.total_steps
                with features.arm(enabled=log_step and main):
                    logged = train_step.step(micro if data.accumulate > 1 else micro[0], step)
                step += 1
                guard.observe(logged["loss"], {k: logged[k] for k in train_step.loss_weights if k in logged})
                self.last_loss = logged["loss"]
                window.add(logged)
                timed += 1
                if log_step:
                    guard.check(noticed_at=step, kept=self._last_checkpoint())
                    now = time.perf_counter()
                    rate = timed * clips_per_step / (now - t_log)
                    rates.append(rate)
                    last = {"step": step, **window.means()}
                    last["lr"] = train_step.optimizer.param_groups[0]["lr"]
                    last["clips_per_s"] = rate
                    last.update(features.diagnostics())
                    if train_step.teacher is not None:  # what is left of its random init (Teacher.init_share)
                        last["teacher_init_share"] = train_step.teacher.init_share(step)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(last) + "\n")
                        metrics_file.flush()
                        hooks.vlmask_step_end(step=step, metrics=last, run=train_step.run)
                    window = self.window = LogWindow()
                    timed, t_log = 0, time.perf_counter()
                if step % train_cfg.ckpt_every == 0 or step == self.total_steps:
                    guard.check(noticed_at=step, kept=self._last_checkpoint())  # never save after a bad step
                    self.save(step)
                    saved = step
                if progress is not None and main:
                    progress(step, last)
        finally:
            if metrics_file is not None:
                metrics_file.close()
        skipped = [_as_record(s) for s in data.dataset.skipped]
        skipped += [{"line": line, "video": video, "reason": f"failed while training: {reason}"}
                    for line, video, reason in load_failures.values()]
        summary = {
            "steps": step,
            "wall_s": self.clock.wall_s(trained=step > self.start_step),  # resumed at the end: the checkpoint's
            "final_loss": self._final_loss(),
            "clips_per_s": self.clock.clips_per_s(),
            "peak_mem_mb": round(peak_memory_mb(train_step.device), 1),
            "skipped_clips": len(skipped),
            "skipped": skipped[:10],
            "resumed_from_step": self.start_step or None,
            "device": str(train_step.device),
            "world_size": train_step.world_size,
            "parallel": train_step.parallel,
            "params_per_rank": parallel.local_parameter_count(train_step.student),
        }
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            hooks.vlmask_train_end(summary=summary, run=train_step.run)
        return summary

    def _final_loss(self) -> float | None:
        """``summary.json``'s ``final_loss``: the loss of the run's last step (rank 0's, the mean
        over its micro-batches), not a log-window mean, so a resume does not change it; a run
        resumed at its final checkpoint reads it from that checkpoint."""
        if self.last_loss is not None:
            return float(self.last_loss)
        return self.resumed_last_loss

    def _preempt(self, step: int, signum: int, saved: int, guard: rundir.NonFiniteGuard) -> None:
        """Stop for a preemption signal the ranks agreed on at ``step``: save that step unless this
        process saved it already or trained nothing, wait until every rank has (under FSDP saving
        is a collective, and torchrun stops the other workers as soon as one exits), then raise
        :class:`Preempted` naming the checkpoint a rerun resumes from."""
        if step > self.start_step and saved != step:
            guard.check(noticed_at=step, kept=self._last_checkpoint())  # never save after a bad step
            self.save(step)
        if self.train_step.world_size > 1:
            dist.barrier()
        raise Preempted(step, signal_name(signum), self._last_checkpoint(), self.rank)

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
        step = self.train_step
        config["record"] = {
            "recipe": str(self.recipe.path),
            "git_commit": git_commit(self.recipe.path.parent),
            "overrides": self.recipe.overrides,
            "versions": versions(self.plugins.distributions),
            "device": str(step.device),
            "precision": step.precision,
            "attention": step.attention,
            "world_size": step.world_size,
            "parallel": step.parallel,
            "effective": step.effective,
            "total_steps": self.total_steps,
            "data": self.data.record(),
        }
        tmp = self.run_dir / ".config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        os.replace(tmp, self.run_dir / "config.yaml")

    @property
    def checkpoint_format(self) -> str:
        """``full`` or ``sharded``: what :meth:`save` writes (``train.checkpoint_format``; ``auto``
        shards under FSDP with several processes)."""
        train_step = self.train_step
        return sharded.checkpoint_format(train_step.train_cfg.checkpoint_format, train_step.parallel)

    def save(self, step: int) -> Path | None:
        """Write a checkpoint (every rank calls it). Full format: rank 0 writes full tensors
        (under FSDP every rank gathers to it); sharded (``vlmask.sharded``): every rank writes its
        own shards. Either way ``state.pt`` keeps the RNG states of every rank. Returns the
        checkpoint on the ranks that know it (rank 0, every rank when sharded)."""
        train_step = self.train_step
        rngs = parallel.gather_on_rank0(ckpt.rng_state()) if train_step.world_size > 1 else [ckpt.rng_state()]
        if self.checkpoint_format == "sharded":
            return self._save_sharded(step, rngs)
        if train_step.rank != 0 and train_step.parallel != "fsdp":
            return None
        state = train_step.state_dict()
        if train_step.rank != 0:
            return None
        modules = {name: state.pop(name) for name in ("student", "teacher") if name in state}
        self._refuse_non_finite(step, _non_finite_tensors(modules))
        state.update(self._loop_state(rngs))
        path = ckpt.save_checkpoint(self.run_dir / "checkpoints", step, modules, state,
                                    keep=train_step.train_cfg.keep_checkpoints)
        train_step.hooks.vlmask_checkpoint_saved(step=step, path=path, run=train_step.run)
        return path

    def _save_sharded(self, step: int, rngs: list[Any] | None) -> Path:
        train_step = self.train_step
        state = train_step.sharded_state_dict()
        tensors = state.pop("tensors")
        local = {name: parallel.local_tensors(tensors[name]) for name in ("student", "teacher") if name in tensors}
        self._refuse_non_finite(step, parallel.union_over_ranks(_non_finite_tensors(local)))  # the same on every rank
        loop = {**state, **self._loop_state(rngs)} if train_step.rank == 0 else None
        path = sharded.save_sharded(self.run_dir / "checkpoints", step, tensors, loop,
                                    keep=train_step.train_cfg.keep_checkpoints)
        if train_step.rank == 0:
            train_step.hooks.vlmask_checkpoint_saved(step=step, path=path, run=train_step.run)
        return path

    def _refuse_non_finite(self, step: int, bad: list[str]) -> None:
        if bad:  # a gradient that was not finite can leave the weights so while the loss still was
            kept = self._last_checkpoint()
            raise rundir.NonFiniteLoss(f"not saving step {step}: non-finite weights in {', '.join(bad[:5])}"
                                       + (f"; the last good checkpoint is {kept}" if kept else "")
                                       + "; try train.precision fp32/bf16, a lower optim.lr or train.grad_clip", step)

    def _loop_state(self, rngs: list[Any] | None) -> dict[str, Any]:
        """``state.pt``'s loop state (rank 0): the RNG states (``rng``: rank 0's, ``rng_by_rank``:
        every rank's when several processes train, so each resumes its own), the run's length,
        the last loss and the clock."""
        assert rngs is not None
        return {
            "rng": rngs[0],
            **({"rng_by_rank": rngs} if len(rngs) > 1 else {}),
            "total_steps": self.total_steps,
            "last_loss": float(self.last_loss) if self.last_loss is not None else self.resumed_last_loss,
            "log_window": (self.window or LogWindow()).state(),  # the steps since the last metrics line
            **self.clock.state(),  # wall_s, clips_per_s: summary.json's figures survive a resume at the end
        }

    def _resume(self, path: Path) -> None:
        """Load checkpoint ``path`` of either format, whatever world size wrote it (a sharded one
        is re-sharded by DCP; a full one is loaded whole and sharded under FSDP)."""
        state = ckpt.load_state(path / "state.pt")
        if sharded.is_sharded(path):
            self.train_step.load_sharded(path, state)
        else:
            modules = {name: ckpt.load_tensors(path / f"{name}.safetensors") for name in ("student", "teacher")
                       if name == "student" or self.train_step.teacher is not None}
            sources = {**{name: path / f"{name}.safetensors" for name in modules}, "optimizer": path / "state.pt"}
            self.train_step.load_state_dict({**modules, **state}, sources)
        ckpt.set_rng_state(ckpt.rng_of_rank(state, self.train_step.rank))
        self.start_step = int(state["step"])
        self.resumed_from = path
        last_loss = state.get("last_loss")  # absent in checkpoints of older runs
        self.resumed_last_loss = float(last_loss) if isinstance(last_loss, (int, float)) else None
        self.resumed_window = state.get("log_window")  # absent in checkpoints of older runs
        self.clock = rundir.TrainingClock.resumed(state)

    def describe(self) -> str:
        """The first line of a run: what runs on what."""
        step, dataset = self.train_step, self.data.dataset
        enc = step.student.encoder
        accumulate = self.data.accumulate
        parts = [
            f"vlmask {self.recipe.name}",
            f"device {step.device} ({step.precision}, world {step.world_size}"
            + (f", {step.parallel}" if step.world_size > 1 else "") + ")",
            f"attention {step.attention}" + (f" ({step.attention_reason})" if step.attention_reason else ""),
            f"data {self.data.source}: {len(dataset)} clips, {len(dataset.skipped)} skipped",
            (f"decoder {dataset.decoder}" + (f" ({dataset.decoder_reason})" if dataset.decoder_reason else ""))
            if isinstance(dataset, DecodingDataset) else "decoder n/a",
            f"encoder {_human(_count(enc))} params, grid {step.grid.t}x{step.grid.h}x{step.grid.w}, "
            f"predictor {_human(_count(step.student.predictor))}",
            f"{self.total_steps} steps x {step.train_cfg.batch_size * step.world_size * accumulate} clips"
            + (f" ({accumulate} micro-batches)" if accumulate > 1 else ""),
        ]
        if self.resumed_from is not None:
            parts.append(f"resumed at step {self.start_step}")
        return " | ".join(parts)


def build_training(recipe: Recipe, plugins: Plugins, process: Process, log: Callable[[str], None],
                   validated: bool = False) -> tuple[TrainData, TrainStep]:
    """A run's data and TrainStep, as a Trainer (and ``vlmask bench --loader``) builds them:
    torch seeded with ``seed + rank``, the data (:class:`TrainData`: its length and classes),
    the parts (:func:`vlmask.build.build_components`, checking that the clips fit the encoder),
    the caption embeddings, then the TrainStep on a run manager of its own
    (:func:`vlmask.plugins.run_manager`: the process's plugins, then the parts). ``validated``:
    the caller has validated ``recipe`` already (the Trainer), else the parts' build does."""
    manager = run_manager(plugins)
    torch.manual_seed(int(top_settings(recipe).seed) + process.rank)
    data = TrainData(recipe, plugins, manager.hook, process, log)
    parts = build_components(recipe, plugins, total_steps=data.total_steps, num_classes=data.num_classes,
                             check_grid=data.check_clip_shape, validated=validated)
    data.embed_captions(parts.text_encoder, process)
    train_step = TrainStep(parts, recipe, total_steps=data.total_steps, steps_per_epoch=data.steps_per_epoch,
                           process=process, manager=manager)
    return data, train_step


def train_recipe(recipe: Recipe, plugins: Plugins | None = None) -> tuple[dict[str, Any], TrainStep]:
    """``with Trainer(recipe, plugins) as trainer: trainer.train()`` for callers above the engine
    (``vlmask compare``): the summary, and the run's TrainStep (its parts stay as trained, e.g.
    for :func:`vlmask.flops.record_train_flops`)."""
    with Trainer(recipe, plugins) as trainer:
        return trainer.train(), trainer.train_step


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def remove_run(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
