"""What a recipe may contain, and checking it without building anything (``vlmask validate``).

The engine's own settings are the dataclasses below; everything else in a recipe names a
plugin (``{name: ..., <constructor keyword arguments>}``) in one of the ``PLUGIN_SLOTS``.
A plugin node is checked against its factory's signature: the name must be registered, every
key must be a parameter, every required parameter present (unless the engine injects it) and
every value of the annotated type. All problems are collected and reported together.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from vlmask.config import Recipe, RecipeError
from vlmask.registry import Registry, RegistryError
from vlmask.sections import (
    DEFAULT_EVALUATORS,
    EVALUATION_KEYS,
    FINETUNE_KEYS,
    EvaluationSettings,
    FinetuneSettings,
    finetune_range_problems,
)


@dataclass
class RunSettings:
    dir: str | None = None  # None: a new folder under ``root``
    root: str = "runs"
    name: str | None = None  # None: the recipe's file name


@dataclass
class TrainSettings:
    batch_size: int = 8  # clips per micro-batch per process
    accumulate: int = 1  # micro-batches whose gradients accumulate into one optimizer step
    max_steps: int | None = None  # optimizer steps; overrides epochs
    epochs: float | None = None
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA, with loss scaling)
    grad_clip: float | None = 1.0
    find_unused_parameters: bool = False  # DDP
    parallel: str = "ddp"  # with several processes: ddp (replicate the student) | fsdp (shard student and teacher)
    compile: bool = False  # torch.compile the student's forward (first steps include compilation)


@dataclass
class OptimSettings:
    """AdamW with linear warmup then cosine decay (VideoMAE / FILS supplement)."""

    lr: float = 1.5e-4  # peak learning rate (after scaling, see lr_scaling)
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int | None = None  # takes precedence over warmup_epochs
    warmup_epochs: float | None = None
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    lr_scaling: str = "none"  # none | linear: lr * effective_batch / base_batch_size (VideoMAE)
    base_batch_size: int = 256


@dataclass
class DataSettings:
    train: str | None = None  # manifest path; None: the built-in synthetic set
    val: str | None = None
    num_workers: int = 2
    synthetic: dict[str, Any] = field(default_factory=dict)  # arguments of the built-in set
    dataset: dict[str, Any] = field(default_factory=dict)  # plugin node, kind dataset


@dataclass
class ModelSettings:
    encoder: dict[str, Any] = field(default_factory=dict)  # plugin node, kind encoder
    predictor: dict[str, Any] | None = None  # plugin node, kind predictor
    projection: bool = False  # a video-to-text linear projection (theta), needs text_encoder


SECTIONS: dict[str, type] = {
    "run": RunSettings,
    "train": TrainSettings,
    "optim": OptimSettings,
    "data": DataSettings,
    "model": ModelSettings,
}

#: Top-level keys that are not sections, with their types.
TOP_LEVEL: dict[str, Any] = {
    "description": str,
    "seed": int,
    "device": str,
    "masker": dict,
    "teacher": typing.Optional[dict],
    "text_encoder": typing.Optional[dict],
    "targets": typing.Optional[dict],
    "heads": typing.Optional[dict],
    "loss_weights": dict,
    "loggers": typing.Optional[dict],
    "evaluation": typing.Optional[dict],
    "finetune": typing.Optional[dict],  # vlmask finetune settings (vlmask.finetune.FinetuneSettings)
    "record": typing.Optional[dict],  # written by the engine into config.yaml: versions, device, effective batch and LR
}

#: Where plugins sit in a recipe: dotted key (``*``: every entry of a mapping) -> (kind, required).
PLUGIN_SLOTS: dict[str, tuple[str, bool]] = {
    "data.dataset": ("dataset", True),  # the engine passes manifest= and train= (SLOT_PROVIDED)
    "model.encoder": ("encoder", True),
    "model.predictor": ("predictor", False),
    "masker": ("masker", True),
    "teacher": ("teacher", False),
    "text_encoder": ("text_encoder", False),
    "targets.*": ("target", False),
    "heads.*": ("head", False),
    "loggers.*": ("logger", False),
}

#: Arguments the engine passes to the plugin of a slot itself; a recipe must not set them.
SLOT_PROVIDED: dict[str, dict[str, str]] = {
    "data.dataset": {"manifest": "set data.train / data.val instead", "train": "the engine sets it per split"},
}

#: Constructor arguments the engine fills when a factory declares them and the recipe does not.
INJECTED = ("grid", "encoder_dim", "text_dim", "num_classes", "student", "total_steps")

CHOICES: dict[str, tuple[str, ...]] = {
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.parallel": ("ddp", "fsdp"),
    "optim.lr_scaling": ("none", "linear"),
    "device": ("auto", "cpu", "cuda"),
}


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether a plain (YAML) value fits a type annotation; unknown annotations accept."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, Path):
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(type_matches(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(type_matches(v, inner) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        # Objects a YAML file cannot spell (modules, tensors): only the engine injects them.
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def factory_parameters(factory: Callable[..., Any]) -> dict[str, tuple[Any, bool]]:
    """name -> (annotation, required) of a factory's keyword arguments."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    params: dict[str, tuple[Any, bool]] = {}
    for name, p in inspect.signature(factory).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            params["**"] = (Any, False)
            continue
        params[name] = (hints.get(name, p.annotation), p.default is inspect.Parameter.empty)
    return params


def plugin_nodes(config: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | Any, bool]]:
    """Every plugin node of a recipe: (dotted key, kind, node, required)."""
    found = []
    for slot, (kind, required) in PLUGIN_SLOTS.items():
        if slot.endswith(".*"):
            parent = _select(config, slot[:-2])
            if isinstance(parent, dict):
                for name, node in parent.items():
                    if node is not None:
                        found.append((f"{slot[:-2]}.{name}", kind, node, True))
            continue
        node = _select(config, slot)
        if node is not None or required:
            found.append((slot, kind, node, required))
    return found


def _select(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_plugin_node(registry: Registry, key: str, kind: str, node: Any, where: Callable[[str], str]) -> list[str]:
    if not isinstance(node, dict):
        return [f"{where(key)}: key {key}: expected a plugin node {{name: ..., ...}} of kind {kind}, got {node!r}"]
    name = node.get("name")
    if name is None:
        return [f"{where(key)}: key {key}: missing 'name' (registered {kind}s: {', '.join(registry.names(kind)) or 'none'})"]
    try:
        entry = registry.get(kind, name)
    except RegistryError as exc:
        return [f"{where(key + '.name')}: key {key}.name: {exc}"]
    params = factory_parameters(entry.factory)
    provided = SLOT_PROVIDED.get(key, {})
    problems = []
    for arg, value in node.items():
        if arg == "name":
            continue
        if arg in provided:
            problems.append(f"{where(f'{key}.{arg}')}: key {key}.{arg}: not a recipe setting ({provided[arg]})")
            continue
        if arg not in params:
            if "**" in params:
                continue
            known = [p for p in params if p != "**"]
            problems.append(
                f"{where(f'{key}.{arg}')}: key {key}.{arg}: {kind} {name!r} has no argument {arg!r}"
                f"{_nearest(arg, known)}; its arguments: {', '.join(known) or 'none'}"
            )
            continue
        annotation, _ = params[arg]
        if not type_matches(value, annotation):
            problems.append(
                f"{where(f'{key}.{arg}')}: key {key}.{arg}: {value!r} is not of type {_type_name(annotation)} "
                f"({kind} {name!r})"
            )
    for arg, (_, required) in params.items():
        if required and arg not in node and arg not in INJECTED and arg not in provided:
            problems.append(f"{where(key)}: key {key}: {kind} {name!r} needs argument {arg!r}")
    return problems


def check_section(section: str, value: Any, schema: type, where: Callable[[str], str]) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where(section)}: key {section}: expected a mapping, got {value!r}"]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    problems = []
    for key, v in value.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            problems.append(f"{where(dotted)}: unknown key {dotted}{_nearest(key, list(fields))}; known: {', '.join(fields)}")
            continue
        if any(dotted == slot for slot in PLUGIN_SLOTS):
            continue  # checked as a plugin node
        if not type_matches(v, hints[key]):
            problems.append(f"{where(dotted)}: key {dotted}: {v!r} is not of type {_type_name(hints[key])}")
        elif dotted in CHOICES and v not in CHOICES[dotted]:
            problems.append(f"{where(dotted)}: key {dotted}: {v!r} is not one of {', '.join(CHOICES[dotted])}")
    return problems


def validate(recipe: Recipe, registry: Registry) -> list[str]:
    """Every problem of a recipe, each naming the file (and line) and key that set it."""
    config = OmegaConf.to_container(recipe.config, resolve=True)
    assert isinstance(config, dict)
    problems: list[str] = []
    for key, value in config.items():
        if key in SECTIONS:
            problems += check_section(key, value, SECTIONS[key], recipe.where)
        elif key in TOP_LEVEL:
            if not type_matches(value, TOP_LEVEL[key]):
                problems.append(f"{recipe.where(key)}: key {key}: {value!r} is not of type {_type_name(TOP_LEVEL[key])}")
            elif key in CHOICES and value not in CHOICES[key]:
                problems.append(f"{recipe.where(key)}: key {key}: {value!r} is not one of {', '.join(CHOICES[key])}")
        else:
            known = list(SECTIONS) + list(TOP_LEVEL)
            problems.append(f"{recipe.where(key)}: unknown key {key}{_nearest(key, known)}; known: {', '.join(known)}")
    for key, kind, node, required in plugin_nodes(config):
        if node is None and required:
            problems.append(f"{recipe.path}: key {key}: a {kind} is required (registered: {', '.join(registry.names(kind))})")
            continue
        problems += check_plugin_node(registry, key, kind, node, recipe.where)
    problems += _check_loss_weights(config, recipe)
    if config.get("finetune") is not None:
        try:
            finetune_settings(recipe)
        except RecipeError as exc:
            problems += exc.problems
    if config.get("evaluation") is not None:
        try:
            evaluation_settings(recipe, registry)
        except RecipeError as exc:
            problems += exc.problems
    return problems


def _check_loss_weights(config: dict[str, Any], recipe: Recipe) -> list[str]:
    terms = {k for section in ("targets", "heads") for k, v in (config.get(section) or {}).items() if v is not None}
    weights = config.get("loss_weights") or {}
    if not isinstance(weights, dict):
        return []
    weights = {k: v for k, v in weights.items() if v is not None}  # null removes an inherited weight
    problems = []
    if not terms:
        problems.append(f"{recipe.path}: a recipe needs at least one loss term under targets or heads")
    for term in sorted(terms - set(weights)):
        problems.append(f"{recipe.where('targets.' + term if term in (config.get('targets') or {}) else 'heads.' + term)}: "
                        f"loss term {term!r} has no weight: add loss_weights.{term}")
    for term in sorted(set(weights) - terms):
        problems.append(f"{recipe.where('loss_weights.' + term)}: key loss_weights.{term}: weight for a loss term "
                        f"that no target or head produces{_nearest(term, sorted(terms))}")
    for term, w in weights.items():
        if not type_matches(w, float):
            problems.append(f"{recipe.where('loss_weights.' + term)}: key loss_weights.{term}: {w!r} is not a number")
    return problems


def settings(recipe: Recipe, section: str) -> Any:
    """The typed settings of a section (defaults filled in)."""
    schema = SECTIONS[section]
    value = recipe.get(section) or {}
    names = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in value.items() if k in names})


def build(registry: Registry, recipe: Recipe, key: str, kind: str, injected: dict[str, Any] | None = None, **extra: Any) -> Any:
    """Build the plugin at ``key`` of a recipe, filling injected arguments it declares."""
    node = recipe.get(key)
    problems = check_plugin_node(registry, key, kind, node, recipe.where)
    if problems:
        raise RecipeError(problems)
    entry = registry.get(kind, node["name"])
    kwargs = {k: v for k, v in node.items() if k != "name"}
    kwargs.update(extra)
    params = factory_parameters(entry.factory)
    for name, value in (injected or {}).items():
        if name in params and name not in kwargs:
            kwargs[name] = value
    try:
        return entry.factory(**kwargs)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise RecipeError([f"{recipe.where(key)}: key {key} ({kind} {node['name']!r}): {exc}"]) from exc


# --------------------------------------------------------------------------- sections of commands


def finetune_settings(recipe: Recipe) -> FinetuneSettings:
    """The recipe's ``finetune`` section with defaults filled in; every problem (unknown key,
    wrong type, value out of range) is collected into one RecipeError naming file and key.
    ``batch_size``, ``num_workers`` and ``seed`` stay None when unset (see :func:`finetune_run`)."""
    section = recipe.get("finetune")
    if section is None:
        section = {}
    problems = check_section("finetune", section, FinetuneSettings, recipe.where)
    if not isinstance(section, dict):
        raise RecipeError(problems)
    hints = typing.get_type_hints(FinetuneSettings)
    valid = {k: v for k, v in section.items() if k in FINETUNE_KEYS and type_matches(v, hints[k])}
    settings = FinetuneSettings(**valid)
    for key, need in finetune_range_problems(settings, set(valid)).items():
        problems.append(f"{recipe.where('finetune.' + key)}: key finetune.{key}: {valid[key]!r} is not {need}")
    if problems:
        raise RecipeError(problems)
    settings.betas = [float(b) for b in settings.betas]
    settings.crop_scale = [float(c) for c in settings.crop_scale]
    return settings


def evaluation_settings(recipe: Recipe, registry: Registry) -> EvaluationSettings:
    """The recipe's ``evaluation`` section with defaults filled in; every problem is a RecipeError
    naming the file and key."""
    section = recipe.get("evaluation") or {}
    problems: list[str] = []
    if not isinstance(section, dict):
        raise RecipeError([f"{recipe.where('evaluation')}: key evaluation: expected a mapping, got {section!r}"])
    for key in section:
        if key not in EVALUATION_KEYS:
            problems.append(f"{recipe.where('evaluation.' + str(key))}: unknown key evaluation.{key}; "
                            f"known: {', '.join(EVALUATION_KEYS)}")
    batch_size = section.get("batch_size")
    batch_size = (recipe.get("train.batch_size") or 8) if batch_size is None else batch_size
    workers = section.get("num_workers")
    workers = recipe.get("data.num_workers", 2) if workers is None else workers
    for key, value in (("batch_size", batch_size), ("num_workers", workers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "batch_size" else 0):
            problems.append(f"{recipe.where('evaluation.' + key)}: key evaluation.{key}: {value!r} is not "
                            f"an integer >= {1 if key == 'batch_size' else 0}")
    evaluators = copy.deepcopy(DEFAULT_EVALUATORS)
    overrides = section.get("evaluators") or {}
    if not isinstance(overrides, dict):
        problems.append(f"{recipe.where('evaluation.evaluators')}: key evaluation.evaluators: expected a mapping "
                        f"of section -> evaluator node, got {overrides!r}")
        overrides = {}
    for name, node in overrides.items():
        key = f"evaluation.evaluators.{name}"
        if node is None:
            evaluators.pop(name, None)
            continue
        if not isinstance(node, dict):
            problems.append(f"{recipe.where(key)}: key {key}: expected an evaluator node {{name: ..., ...}} or null, got {node!r}")
            continue
        base = evaluators.get(name, {})
        evaluators[name] = dict(node) if "name" in node and node["name"] != base.get("name") else {**base, **node}
    for name, node in evaluators.items():
        problems += check_plugin_node(registry, f"evaluation.evaluators.{name}", "evaluator", node, recipe.where)
    if problems:
        raise RecipeError(problems)
    return EvaluationSettings(int(batch_size), int(workers), evaluators)
