"""Training in stages: a recipe's ``stages:`` list, each overriding a few keys for a number of steps.

A staged recipe (CoCLR's stage 1 then its alternation, a warm-up with a frozen encoder, a loss
switched on late) writes::

    stages:
      - {name: infonce, steps: 100, overrides: {heads.coclr.positives: self}}
      - {name: rgb, steps: 50, overrides: {heads.coclr.train: rgb}, freeze: [objective_modules.coclr.flow]}
      - {name: flow, steps: 50, overrides: {heads.coclr.train: flow, loss_weights.pixels: 0.0}, freeze: [encoder]}

Stages run in order; the run's total steps is their sum (``train.max_steps``, when set, may
cut the run short inside the stages, never lengthen it; ``train.epochs`` is not used). The active stage is a function of the step alone
(:meth:`StagePlan.index_at`), and ``TrainStep.step`` enters it at the start of every step, so a run
killed in the middle of a stage resumes in the same stage at the same step: the checkpoint
holds nothing about stages.

What a stage may change without rebuilding anything (checked by ``vlmask validate``):

``overrides``
    ``loss_weights.NAME``: the weight of an existing loss term (a number >= 0);
    ``targets.NAME.ARG``, ``heads.NAME.ARG``, ``masker.ARG``: a switch the plugin declares
    settable between steps, listed in its factory's class attribute ``stage_settable`` (a
    tuple of argument names; the built component keeps the value under the same attribute
    name, e.g. the ``coclr`` head's ``train`` and ``positives``). The value must have the
    argument's annotated type.
``freeze``
    prefixes of the student's parameter names (``encoder``, ``predictor``,
    ``objective_modules.coclr.flow``): those parameters get no gradient in this stage, so
    AdamW leaves them (and their moments) as they are. Every other parameter of the student
    trains as it was built. A prefix must match a trainable parameter (checked when the run
    is built).

Under DDP, a stage that freezes parameters changes which of them receive gradients, so the
TrainStep wraps a recipe whose stages freeze anything with ``find_unused_parameters=True``
whatever ``train.find_unused_parameters`` says (DDP would otherwise wait for their gradients
and fail at the first such stage).

Anything else (an encoder width, a masking ratio the plugin does not declare, the optimizer)
would need a rebuild and is refused. This module imports no plugin and nothing above the
schema layer: ``vlmask.schema.validate`` calls :func:`stage_problems` with its own checks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from vlmask.config import RecipeError
from vlmask.registry import Registry

#: Stage keys a recipe may write.
STAGE_KEYS = ("name", "steps", "overrides", "freeze")
_SECTION_KIND = {"targets": "target", "heads": "head"}


@dataclass(frozen=True)
class Stage:
    """One stage: ``steps`` optimizer steps with ``overrides`` applied and ``freeze`` frozen."""

    name: str
    steps: int
    overrides: Mapping[str, Any]
    freeze: tuple[str, ...] = ()


def read_stages(config: Mapping[str, Any]) -> list[Stage]:
    """The stages of a resolved recipe (``[]`` when it has none); assumes :func:`stage_problems` passed."""
    return [
        Stage(str(s.get("name") or f"stage{i + 1}"), int(s["steps"]), flatten(s.get("overrides") or {}),
              tuple(s.get("freeze") or ()))
        for i, s in enumerate(config.get("stages") or [])
    ]


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{a: {b: 1}}`` and ``{a.b: 1}`` alike as ``{"a.b": 1}`` (a command-line override
    ``stages.0.overrides.loss_weights.x=1`` nests; a recipe may write either).

    >>> flatten({"loss_weights": {"pixels": 0.5}, "heads.coclr.train": "rgb"})
    {'loss_weights.pixels': 0.5, 'heads.coclr.train': 'rgb'}
    """
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def staged_total(config: Mapping[str, Any]) -> int | None:
    """A staged run's length: ``train.max_steps`` when set (at most the stages' sum: a short
    run stops inside the stages), else the sum of the stages' steps; None without stages."""
    stages = read_stages(config)
    if not stages:
        return None
    max_steps = (config.get("train") or {}).get("max_steps")
    return int(max_steps) if max_steps is not None else sum(s.steps for s in stages)


def settable_of(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments of a plugin factory that a stage may change (its ``stage_settable``)."""
    return tuple(getattr(factory, "stage_settable", ()))


def stage_problems(
    config: Mapping[str, Any],
    where: Callable[[str], str],
    registry: Registry,
    value_problem: Callable[[Any, Any], str | None],
) -> list[str]:
    """Every problem of a recipe's ``stages`` (shape, steps >= 1, override keys that exist and may
    change between steps, value types, ``train.max_steps`` against the sum), naming the key.
    ``value_problem(value, annotation)`` is the schema's type check (None: fine)."""
    stages = config.get("stages")
    if stages is None:
        return []
    at = where("stages")
    if not isinstance(stages, list) or not stages:
        return [f"{at}: key stages: a non-empty list of {{steps: N, overrides: {{key: value}}, freeze: [prefix]}}"]
    problems: list[str] = []
    weights = config.get("loss_weights") or {}
    for i, stage in enumerate(stages):
        key = f"stages.{i}"
        if not isinstance(stage, dict):
            problems.append(f"{at}: key {key}: a stage is a mapping with steps (and overrides, freeze), got {stage!r}")
            continue
        for unknown in sorted(set(stage) - set(STAGE_KEYS)):
            problems.append(f"{at}: key {key}.{unknown}: unknown; a stage has {', '.join(STAGE_KEYS)}")
        steps = stage.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            problems.append(f"{at}: key {key}.steps: must be an integer >= 1, got {steps!r}")
        freeze = stage.get("freeze") or []
        if not isinstance(freeze, list) or not all(isinstance(p, str) and p for p in freeze):
            problems.append(f"{at}: key {key}.freeze: a list of parameter-name prefixes, got {freeze!r}")
        overrides = stage.get("overrides") or {}
        if not isinstance(overrides, dict):
            problems.append(f"{at}: key {key}.overrides: a mapping of dotted keys to values, got {overrides!r}")
            continue
        for dotted, value in flatten(overrides).items():
            problem = _override_problem(str(dotted), value, config, weights, registry, value_problem)
            if problem:
                problems.append(f"{at}: key {key}.overrides.{dotted}: {problem}")
    total = sum(s["steps"] for s in stages if isinstance(s, dict) and isinstance(s.get("steps"), int))
    max_steps = (config.get("train") or {}).get("max_steps")
    if not problems and isinstance(max_steps, int) and max_steps > total:
        problems.append(f"{where('train.max_steps')}: key train.max_steps: {max_steps} is more than the stages ({at}) "
                        f"sum to ({total} steps); set train.max_steps={total} or less, or null")
    return problems


def _override_problem(dotted: str, value: Any, config: Mapping[str, Any], weights: Mapping[str, Any],
                      registry: Registry, value_problem: Callable[[Any, Any], str | None]) -> str | None:
    parts = dotted.split(".")
    if parts[0] == "loss_weights" and len(parts) == 2:
        if parts[1] not in weights or weights[parts[1]] is None:
            return f"no loss term {parts[1]!r} (terms: {', '.join(k for k, v in weights.items() if v is not None)})"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return f"a loss weight is a number >= 0, got {value!r}"
        return None
    if parts[0] in _SECTION_KIND and len(parts) == 3:
        kind, node, argument = _SECTION_KIND[parts[0]], (config.get(parts[0]) or {}).get(parts[1]), parts[2]
        if not isinstance(node, dict):
            return f"no {kind} {parts[1]!r} in {parts[0]}"
    elif parts[0] == "masker" and len(parts) == 2:
        kind, node, argument = "masker", config.get("masker"), parts[1]
    else:
        return ("a stage may override loss_weights.NAME, targets.NAME.ARG, heads.NAME.ARG or masker.ARG "
                "(switches a plugin declares in stage_settable); anything else needs a rebuild")
    if not isinstance(node, dict) or (kind, node.get("name")) not in registry:
        return None  # the plugin node's own problem is reported by validate
    factory = registry.get(kind, node["name"]).factory
    settable = settable_of(factory)
    if argument not in settable:
        return (f"{kind} {node['name']!r} cannot change {argument!r} between steps "
                f"(settable: {', '.join(settable) or 'none'})")
    parameter = inspect.signature(factory).parameters.get(argument)
    annotation = parameter.annotation if parameter is not None else inspect.Parameter.empty
    if annotation is not inspect.Parameter.empty:
        return value_problem(value, annotation)
    return None


class StagePlan:
    """Applies a recipe's stages to a built run: :meth:`enter` at the start of every step.

    ``student``: the trained module (its ``named_parameters`` are what ``freeze`` names);
    ``loss_weights``: the dict the step's weighted sum reads (changed in place);
    ``components``: ``{"masker": ..., "targets.NAME": ..., "heads.NAME": ...}``. Entering a
    stage first restores what the recipe built (weights, switches, trainable parameters), then
    applies the stage, so the state at a step never depends on the stages run before it.
    """

    def __init__(self, stages: list[Stage], student: nn.Module, loss_weights: dict[str, float],
                 components: Mapping[str, Any], where: str = "stages") -> None:
        self.stages = stages
        self.student = student
        self.loss_weights = loss_weights
        self.components = components
        self.base_weights = dict(loss_weights)
        self.trainable = {name for name, p in student.named_parameters() if p.requires_grad}
        self.base_switches: dict[tuple[str, str], Any] = {}
        for stage in stages:
            for dotted in stage.overrides:
                if not dotted.startswith("loss_weights."):
                    owner, argument = dotted.rsplit(".", 1)
                    self.base_switches[(owner, argument)] = getattr(components[owner], argument)
            for prefix in stage.freeze:
                if not any(_under(name, prefix) for name in self.trainable):
                    raise RecipeError([f"{where}: key freeze of stage {stage.name!r}: {prefix!r} names no trainable "
                                       f"parameter of the student (e.g. encoder, predictor, objective_modules.NAME)"])
        self.current: int | None = None
        self.ends = [sum(s.steps for s in stages[: i + 1]) for i in range(len(stages))]

    @property
    def total_steps(self) -> int:
        return self.ends[-1] if self.ends else 0

    def index_at(self, step: int) -> int:
        """The stage of the step ``step`` (0-based count of completed steps); the last after the end."""
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.stages) - 1)

    def enter(self, step: int) -> Stage | None:
        """Make the stage of ``step`` active (a no-op while it already is); returns it."""
        if not self.stages:
            return None
        index = self.index_at(step)
        if index != self.current:
            self._apply(self.stages[index])
            self.current = index
        return self.stages[index]

    def _apply(self, stage: Stage) -> None:
        self.loss_weights.clear()
        self.loss_weights.update(self.base_weights)
        for (owner, argument), value in self.base_switches.items():
            setattr(self.components[owner], argument, value)
        for dotted, value in stage.overrides.items():
            if dotted.startswith("loss_weights."):
                self.loss_weights[dotted.split(".", 1)[1]] = float(value)
            else:
                owner, argument = dotted.rsplit(".", 1)
                setattr(self.components[owner], argument, value)
        for name, parameter in self.student.named_parameters():
            if name in self.trainable:
                parameter.requires_grad_(not any(_under(name, prefix) for prefix in stage.freeze))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def stage_plan(config: Mapping[str, Any], student: nn.Module, loss_weights: dict[str, float], masker: Any,
               objectives: Mapping[str, Any], where: str = "stages") -> StagePlan:
    """The plan of a resolved recipe's stages over a built run (targets and heads by section)."""
    components: dict[str, Any] = {"masker": masker}
    for section in _SECTION_KIND:
        for name in config.get(section) or {}:
            if name in objectives:
                components[f"{section}.{name}"] = objectives[name]
    return StagePlan(read_stages(config), student, loss_weights, components, where)
