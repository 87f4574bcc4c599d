"""Rehearsal: build a recipe's run and take the first step of every stage on the ``meta`` device.

``vlmask validate`` checks each key and the rules across keys that :mod:`vlmask.schema` knows;
what only a plugin knows (a constructor's own rules, a mask the token grid cannot hold, a queue
shorter than the batch, a shape one part gives and another refuses) shows only when the parts
are built and run. :func:`rehearse` does both without reading any data: it builds the run's
parts as ``vlmask run`` would (``build_components``) and a :class:`vlmask.step.TrainStep` of
them on the ``meta`` device (the optimizer, the stage plan), then takes the real
``TrainStep.step`` at the first step of every stage with a synthetic batch of
``train.batch_size`` clips shaped like the recipe's data: the stage entered, the masker (on the
CPU), the student's forward, every loss term, the weighted sum and its backward, clipping,
AdamW and the after-step work (the teacher's update, the parts' ``vlmask_after_optimizer_step``
hooks: the logit-scale clamp, CoCLR's momentum update). It is the step the FLOP counter runs
(:func:`vlmask.bench.count_step_flops`). Nothing is computed (``meta`` tensors have shapes, no
values), so a demo recipe rehearses in about a second beyond building it.

A failure becomes one line naming the key of the part that raised it (``masker``,
``model.encoder``, ``targets.NAME``, ``heads.NAME`` ...; ``stages.N`` for a failure outside
every part in a stage that overrides or freezes something, such as a stage with nothing left to
train or a value a plugin refuses), its file, the stage and the error's first line.
``vlmask validate`` and ``vlmask compare`` (before anything trains) call it.

Not rehearsed: what depends on the data (``vlmask.data_requirements`` checks that against the
manifest), on values (a loss that becomes NaN), on several processes, and the hooks of plugins
that are not parts of the recipe (loggers of the process, a probe): they observe runs, and a
rehearsal is not one.
"""

from __future__ import annotations

import copy
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from omegaconf import OmegaConf
from torch import nn

from vlmask.bench import SYNTHETIC_CLASSES, clip_shape, synthetic_batch
from vlmask.config import Recipe, RecipeError
from vlmask.plugins import Plugins
from vlmask.schema import settings, top_settings
from vlmask.step import ON_META, TrainStep, build_step


class _Blame:
    """Which part of the step is running: the key of the innermost part entered."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.blamed: str | None = None  # the innermost part an error left

    @property
    def current(self) -> str | None:
        return self.blamed or (self.stack[-1] if self.stack else None)

    def clear(self) -> None:
        self.stack.clear()
        self.blamed = None

    @contextmanager
    def inside(self, key: str) -> Iterator[None]:
        self.stack.append(key)
        depth = len(self.stack)
        try:
            yield
        except BaseException:
            # a module that raised never ran its post-forward hook: its key is still on the stack
            self.blamed = self.blamed or self.stack[-1]
            raise
        finally:
            del self.stack[depth - 1:]

    def watch(self, module: nn.Module, key: str) -> list[Any]:
        """Forward hooks that enter ``key`` for the duration of ``module``'s forward."""

        def enter(*_: Any) -> None:
            self.stack.append(key)

        def leave(*_: Any) -> None:
            if self.stack and self.stack[-1] == key:
                self.stack.pop()

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _attributed(blame: _Blame, key: str, part: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with blame.inside(key):
            return part(*args, **kwargs)

    return call


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def rehearse(recipe: Recipe, plugins: Plugins) -> list[str]:
    """Problems a run of ``recipe`` would meet before or at the first step of each stage, each
    naming the file and key (empty: it builds and steps). Builds on the CPU and steps on
    ``meta`` in fp32 in one process whatever the recipe says (the device and precision are
    checked by ``vlmask.schema.validate``); reads no data and writes nothing. The random state is left as
    it was (the TrainStep seeds torch's generators with the recipe's seed; the parts draw from them)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        return _rehearse(recipe, plugins)


def _rehearse(recipe: Recipe, plugins: Plugins) -> list[str]:
    recipe = copy.deepcopy(recipe)
    OmegaConf.update(recipe.config, "device", "cpu")
    OmegaConf.update(recipe.config, "train.precision", "fp32")
    try:
        train_step = build_step(recipe, plugins, num_classes=SYNTHETIC_CLASSES, process=ON_META)
    except RecipeError as error:
        return list(error.problems)
    except Exception as error:  # a plugin may raise anything (AttributeError, ...): one line, never a traceback
        return [f"{recipe.path}: building the run fails: {_first_line(error)}"]
    with train_step:
        return _rehearse_steps(recipe, train_step)


class _AfterStep:
    """A ``phase_watch`` naming the part whose after-step work fails: the teacher in its
    update; in the hooks, the part whose hook implementation raised (pluggy calls the parts'
    methods, so its frame in the traceback is the part's)."""

    def __init__(self, blame: _Blame, keys: dict[int, str]) -> None:
        self.blame = blame
        self.keys = keys  # id(part) -> its key

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name == "teacher_update":
            with self.blame.inside("teacher"):
                yield
        elif name == "hooks":
            try:
                yield
            except BaseException as error:
                frames = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(error.__traceback__)]
                owners = [self.keys[id(owner)] for owner in frames if id(owner) in self.keys]
                self.blame.blamed = self.blame.blamed or (owners[-1] if owners else None)
                raise
        else:
            yield


def _rehearse_steps(recipe: Recipe, train_step: TrainStep) -> list[str]:
    """Take the first step of every stage on ``train_step`` (this rehearsal's own, on meta),
    with its masker, targets and heads wrapped to name the key of the one that fails."""
    blame = _Blame()
    student = train_step.student
    handles = []
    for key, module in (("model.encoder", student.encoder), ("model.predictor", student.predictor),
                        ("model.projection", student.projection), ("teacher", train_step.teacher)):
        if isinstance(module, nn.Module):
            handles += blame.watch(module, key)
    top = top_settings(recipe)
    keys = {name: f"{section}.{name}" for section in ("targets", "heads") for name in top.terms(section)}
    objectives = student.objectives
    owners = {id(part): keys.get(name, name) for name, part in objectives.items()}  # whose after-step hook fails
    owners.update({id(part): key for key, part in (("masker", train_step.masker), ("teacher", train_step.teacher))
                   if part is not None})
    student.objectives = {name: _attributed(blame, keys.get(name, name), part) for name, part in objectives.items()}
    train_step.masker = _attributed(blame, "masker", train_step.masker)
    train_step.phase_watch = _AfterStep(blame, owners)
    batch_size = settings(recipe, "train").batch_size
    stages = train_step.stages.stages
    firsts = [0] + train_step.stages.ends[:-1] if stages else [0]
    try:
        for index, step in enumerate(firsts):
            try:
                video = torch.zeros(()).expand(batch_size, *clip_shape(train_step.grid))
                train_step.step(synthetic_batch(train_step, batch_size, "cpu", video=video), step)
            except Exception as error:  # whatever a part raises (AttributeError on a field it lacks ...)
                # outside every part, the failure is the stage's when the stage changes something
                # (its overrides or freeze): what differs from the stages before it
                changes = bool(stages) and bool(stages[index].overrides or stages[index].freeze)
                key = blame.current or (f"stages.{index}" if changes else None)
                where = recipe.where(key) if key else str(recipe.path)
                stage = f" (stage {stages[index].name!r})" if stages else ""
                part = f"key {key}: " if key else ""
                return [f"{where}: {part}the first training step{stage} would fail: {_first_line(error)}"]
            finally:
                blame.clear()
    finally:
        for handle in handles:
            handle.remove()
        student.objectives = objectives  # the parts again, for close() to unregister
    return []
