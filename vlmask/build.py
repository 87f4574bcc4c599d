"""Building a recipe's parts: ``build_components(recipe, plugins, ...)``.

Every part a run is made of (encoder, predictor, projection, teacher, masker, targets and
heads, loggers, text encoder, token grid, loss weights) is built here from the registry, on
the CPU, in the recipe's seed, and returned as one frozen :class:`Components`. Nothing here
touches a device, an optimizer, a data loader or a plugin manager: ``vlmask.step.TrainStep``
adds the device and optimizer to step them (``vlmask.engine.Trainer`` the data and the loop
to train), ``vlmask.runs.open_run`` adds a checkpoint to evaluate or export.
"""

from __future__ import annotations

import copy
import itertools
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import Tensor, nn

from vlmask.config import Recipe, RecipeError
from vlmask.kinds import SwitchesAttention, no_weight_decay_of
from vlmask.plugins import Plugins
from vlmask.schema import build, settings, top_settings, validate
from vlmask.types import Batch, Mask, StepOutputs, TokenGrid

LossTerm = Tensor | tuple[Tensor, dict[str, Tensor]]


class Student(nn.Module):
    """Everything the optimizer trains: encoder, predictor, video-to-text projection and the
    parameters of targets and heads (e.g. a contrastive head's temperature)."""

    def __init__(
        self,
        encoder: nn.Module,
        predictor: nn.Module | None,
        projection: nn.Module | None,
        objectives: dict[str, Callable[[StepOutputs], LossTerm]],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.projection = projection
        self.objectives = objectives  # plain dict: the call order, kept outside the module tree
        self.objective_modules = nn.ModuleDict({k: v for k, v in objectives.items() if isinstance(v, nn.Module)})

    def no_weight_decay(self) -> set[str]:
        """What the parts declare exempt from weight decay (``vlmask.kinds.NoWeightDecay``),
        under their paths here (``encoder.pos_embed``, ``objective_modules.<term>.logit_scale``):
        the parts know which of their parameters are positions or tokens, the engine does not."""
        parts = {"encoder": self.encoder, "predictor": self.predictor, "projection": self.projection,
                 **{f"objective_modules.{k}": v for k, v in self.objective_modules.items()}}
        return {f"{path}.{name}" for path, part in parts.items() for name in no_weight_decay_of(part)}

    def forward(self, batch: Batch, mask: Mask, grid: TokenGrid, teacher: nn.Module | None) -> dict[str, LossTerm]:
        """Encode the visible tokens, predict the masked ones, get the targets, score every term."""
        visible_features = self.encoder(batch.video, mask.visible)
        predictions = self.predictor(visible_features, mask) if self.predictor is not None else None
        teacher_features = teacher(batch.video) if teacher is not None else None
        out = StepOutputs(
            batch=batch,
            grid=grid,
            mask=mask,
            visible_features=visible_features,
            predictions=predictions,
            teacher_features=teacher_features,
            projection=self.projection,
            teacher_projection=teacher.module("projection") if teacher is not None else None,
            encoder=self.encoder,
            predictor=self.predictor,
        )
        return {name: objective(out) for name, objective in self.objectives.items()}


@dataclass(frozen=True)
class Components:
    """The parts of a run, built from its recipe on the CPU (see :func:`build_components`)."""

    student: Student  # encoder, predictor, projection, targets and heads: what the optimizer trains
    teacher: nn.Module | None
    masker: Any
    text_encoder: Any | None  # kind text_encoder: .dim, .identity, .encode(texts)
    loggers: Mapping[str, Any]
    grid: TokenGrid
    loss_weights: Mapping[str, float]  # term name -> weight; exactly the objectives' names

    @property
    def encoder(self) -> nn.Module:
        return self.student.encoder

    @property
    def predictor(self) -> nn.Module | None:
        return self.student.predictor

    @property
    def projection(self) -> nn.Module | None:
        return self.student.projection

    @property
    def objectives(self) -> Mapping[str, Any]:
        """Targets then heads, in recipe order: ``{term name: callable(StepOutputs) -> loss}``."""
        return self.student.objectives

    def hook_parts(self) -> dict[str, Any]:
        """The parts that take part in lifecycle hooks (masker, targets, heads, loggers, teacher)."""
        parts: dict[str, Any] = {"masker": self.masker, **self.objectives, **{f"logger.{k}": v for k, v in self.loggers.items()}}
        if self.teacher is not None:
            parts["teacher"] = self.teacher
        return parts

    def on_meta(self) -> "Components":
        """A copy of the parts whose every parameter and buffer is an empty tensor of the same
        shape and dtype on the ``meta`` device: no weight is copied and nothing is allocated,
        but the copy has its own modules, switches and hook implementations (to count FLOPs or
        rehearse a step without touching these). The text encoder and the loggers are shared,
        not copied. Parts already sharded by FSDP cannot be copied: copy them before."""
        memo: dict[int, Any] = {id(self.text_encoder): self.text_encoder}
        memo.update({id(logger): logger for logger in self.loggers.values()})
        for module in (self.student, self.teacher, self.masker):
            if isinstance(module, nn.Module):
                for tensor in itertools.chain(module.parameters(), module.buffers()):
                    memo[id(tensor)] = _empty_on_meta(tensor)
        return copy.deepcopy(self, memo)


def _empty_on_meta(tensor: Tensor) -> Tensor:
    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


def build_components(recipe: Recipe, plugins: Plugins, *, total_steps: int, num_classes: int = 0,
                     check_grid: Callable[[TokenGrid], None] | None = None, init: bool = True,
                     validated: bool = False) -> Components:
    """Validate ``recipe`` and build its parts on the CPU, in the recipe's ``seed`` (so every
    process builds the same initial model). The caller's random state is left as it was.

    ``total_steps`` and ``num_classes`` are what the engine injects into factories that
    declare them (schedules, classification heads). ``check_grid`` is called with the encoder's
    token grid as soon as the encoder is built, before the other parts, under the same random
    state (the Trainer checks that its dataset's clips fit the encoder there; what the check
    draws is part of the recipe's initial model). ``init=False`` skips ``model.init`` (a caller
    that loads a checkpoint over the parts anyway). ``validated=True``: the caller has just
    validated this very recipe (the Trainer does, before it claims the run directory), so it is
    not checked twice. Raises ``RecipeError`` naming file and key.
    """
    problems = [] if validated else validate(recipe, plugins.registry)
    if problems:
        raise RecipeError(problems)
    registry = plugins.registry
    top, model = top_settings(recipe), settings(recipe, "model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(top.seed))
        text_encoder = build(registry, recipe, "text_encoder", "text_encoder") if top.text_encoder else None
        encoder = build(registry, recipe, "model.encoder", "encoder")
        grid: TokenGrid = encoder.grid
        if check_grid is not None:
            check_grid(grid)
        injected: dict[str, Any] = {"grid": grid, "encoder": encoder, "encoder_dim": encoder.embed_dim, "total_steps": total_steps,
                                    "num_classes": num_classes}
        projection = None
        if model.projection:
            if text_encoder is None:
                raise RecipeError([f"{recipe.where('model.projection')}: key model.projection needs a text_encoder"])
            projection = nn.Linear(encoder.embed_dim, text_encoder.dim, bias=False)
            nn.init.normal_(projection.weight, std=encoder.embed_dim**-0.5)
        if text_encoder is not None:
            injected["text_dim"] = text_encoder.dim
        predictor = build(registry, recipe, "model.predictor", "predictor", injected) if model.predictor else None
        if init and model.init:  # before the teacher: an EMA teacher copies the imported weights
            load_init(recipe, plugins, encoder, predictor)
        objectives: dict[str, Any] = {}
        for section, kind in (("targets", "target"), ("heads", "head")):
            for name in top.terms(section):  # a derived recipe removes an inherited term by setting it to null
                objectives[name] = build(registry, recipe, f"{section}.{name}", kind, injected)
        student = Student(encoder, predictor, projection, objectives)
        injected["student"] = student
        teacher = build(registry, recipe, "teacher", "teacher", injected) if top.teacher else None
        masker = build(registry, recipe, "masker", "masker", injected)
        loggers = {
            name: build(registry, recipe, f"loggers.{name}", "logger", injected)
            for name, node in (top.loggers or {}).items() if node is not None
        }
    loss_weights = {k: float(v) for k, v in top.loss_weights.items() if v is not None}
    return Components(student, teacher, masker, text_encoder, loggers, grid, loss_weights)


def load_init(recipe: Recipe, plugins: Plugins, encoder: nn.Module, predictor: nn.Module | None) -> Any:
    """Start the encoder (and predictor) from ``model.init`` through the ``vlmask_load_init`` hook
    (the built-in plugin reads VideoMAE checkpoints); returns the plugin's report of every key.
    Raises ``RecipeError`` with one line naming the key, the path and the first problem."""
    path = Path(str(settings(recipe, "model").init))
    where = f"{recipe.where('model.init')}: key model.init"
    try:
        report = plugins.manager.hook.vlmask_load_init(path=path, encoder=encoder, predictor=predictor)
    except (ValueError, OSError, RuntimeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RecipeError([f"{where}: {first}"]) from None
    if report is None:
        raise RecipeError([f"{where}: no plugin reads {path} (the built-in one reads VideoMAE checkpoints)"])
    return report


def resolve_device(requested: str) -> torch.device:
    """``auto``: this process's CUDA device when torch sees CUDA, else the CPU.

    This process's device is ``cuda:LOCAL_RANK`` (its index on its node, never the global
    ``RANK``); when torch sees a single device (``srun --gpus-per-task=1`` and other bindings
    that leave each process one GPU in ``CUDA_VISIBLE_DEVICES``) it is that one, ``cuda:0``.
    A local rank beyond the devices torch sees is an error naming both."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RecipeError(["key device: 'cuda' was asked for but torch sees no CUDA device"])
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise RecipeError([f"key device: this process's LOCAL_RANK is {local_rank} but torch sees {count} CUDA "
                           "devices on its node: start at most one process per GPU"])
    return torch.device("cuda", local_rank)


def resolve_precision(recipe: Recipe, requested: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA, fp32 elsewhere; fp16 off CUDA is an error naming the key."""
    precision = requested
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise RecipeError([f"{recipe.where('train.precision')}: key train.precision: fp16 needs CUDA; use bf16 or fp32 on CPU"])
    return precision


def autocast_of(precision: str, device: torch.device) -> Callable[[], ContextManager[Any]]:
    """A factory of the autocast context of a precision (a no-op context for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def set_attention_backends(components: Components, device: torch.device, requested: str | None = None,
                           ) -> tuple[str, str]:
    """Switch every module that can choose its attention kernel to the best one on ``device``
    (``requested``: that backend instead of each module's own choice, e.g. ``"sdpa"`` on
    ``meta``, where xformers has no kernels); returns the (backend, reason) of the last one
    (``("sdpa", "")`` when none can)."""
    attention, reason = "sdpa", ""
    for part in (components.student, components.teacher):
        for module in part.modules() if part is not None else ():
            if isinstance(module, SwitchesAttention):
                attention, reason = (module.set_attention_backend(device=device) if requested is None
                                     else module.set_attention_backend(requested, device=device))
    return attention, reason
