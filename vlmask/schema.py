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
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
from omegaconf import OmegaConf
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from vlmask.config import Recipe, RecipeError
from vlmask.kinds import (DATA_REQUIREMENTS, DATASET_VIEWS, REQUIREMENTS, RequirementError, missing_members, offers_context,
                          requirements_of)
from vlmask.preemption import DEFAULT_SIGNALS, signal_problem
from vlmask.registry import Registry, RegistryError, factory_defaults
from vlmask.stages import stage_problems
from vlmask.sections import (
    DEFAULT_EVALUATORS,
    EVALUATION_FEATURES,
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
    batch_size: Annotated[int, Field(ge=1)] = 8  # clips per micro-batch per process
    accumulate: Annotated[int, Field(ge=1)] = 1  # micro-batches whose gradients accumulate into one optimizer step
    max_steps: Annotated[int, Field(ge=1)] | None = None  # optimizer steps; overrides epochs
    epochs: Annotated[float, Field(gt=0)] | None = None
    log_every: Annotated[int, Field(ge=1)] = 10
    ckpt_every: Annotated[int, Field(ge=1)] = 100
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA, with loss scaling)
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    find_unused_parameters: bool = False  # DDP
    parallel: str = "ddp"  # with several processes: ddp (replicate the student) | fsdp (shard student and teacher)
    compile: bool = False  # torch.compile the student's forward (first steps include compilation)
    # auto (sharded under fsdp with several processes, else full) | full (full tensors, gathered on rank 0)
    # | sharded (each rank writes its shards through torch.distributed.checkpoint; needs parallel fsdp)
    checkpoint_format: str = "auto"
    # signals that stop the run at a step boundary with a checkpoint and exit code 75 (vlmask.preemption); [] disables
    preempt_signals: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))


@dataclass
class OptimSettings:
    """AdamW with linear warmup then cosine decay (VideoMAE / FILS supplement)."""

    lr: Annotated[float, Field(gt=0)] = 1.5e-4  # peak learning rate (after scaling, see lr_scaling)
    min_lr: Annotated[float, Field(ge=0)] = 1e-5
    warmup_lr: Annotated[float, Field(ge=0)] = 1e-6
    warmup_steps: Annotated[int, Field(ge=0)] | None = None  # takes precedence over warmup_epochs
    warmup_epochs: Annotated[float, Field(ge=0)] | None = None
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: Annotated[float, Field(gt=0)] = 1e-8
    lr_scaling: str = "none"  # none | linear: lr * effective_batch / base_batch_size (VideoMAE)
    base_batch_size: Annotated[int, Field(ge=1)] = 256


@dataclass
class DataSettings:
    train: str | None = None  # manifest path; None: the built-in synthetic set
    val: str | None = None
    num_workers: Annotated[int, Field(ge=0)] = 2
    synthetic: dict[str, Any] = field(default_factory=dict)  # arguments of the built-in set
    dataset: dict[str, Any] = field(default_factory=dict)  # plugin node, kind dataset


@dataclass
class ModelSettings:
    encoder: dict[str, Any] = field(default_factory=dict)  # plugin node, kind encoder
    predictor: dict[str, Any] | None = None  # plugin node, kind predictor
    projection: bool = False  # a video-to-text linear projection (theta), needs text_encoder
    init: str | None = None  # pretrained weights to start from (hook vlmask_load_init): a folder or a file


@dataclass
class RecordSettings:
    """``config.yaml``'s ``record`` (written by the engine, ``vlmask.engine.Trainer._write_config``):
    the fields read back when a run is reopened. It holds more (versions, device, effective
    batch and LR), which nothing reads as a setting."""

    total_steps: int | None = None  # the run's length in optimizer steps (the schedule's)
    data: dict[str, Any] = field(default_factory=dict)  # TrainData.record(): train (manifest), clips, decoder
    recipe: str | None = None  # the recipe file the run was started from
    device: str | None = None  # the device it trained on ("cpu", "cuda:0")


SECTIONS: dict[str, type] = {
    "run": RunSettings,
    "train": TrainSettings,
    "optim": OptimSettings,
    "data": DataSettings,
    "model": ModelSettings,
}

#: Sections the engine writes and reads back, not settings of a recipe (not checked by ``validate``).
WRITTEN: dict[str, type] = {"record": RecordSettings}


@dataclass
class TopSettings:
    """A recipe's top-level keys that are not sections (:data:`TOP_LEVEL` is their types), with
    the engine's defaults: read them through :func:`top_settings`, never ``recipe.get``."""

    description: str = ""
    seed: int = 0  # parts are built and masks drawn from it (every process builds the same model)
    device: str = "auto"  # auto (this process's CUDA device, else the CPU) | cpu | cuda
    masker: dict = field(default_factory=dict)  # plugin node, kind masker
    teacher: typing.Optional[dict] = None  # plugin node, kind teacher
    text_encoder: typing.Optional[dict] = None  # plugin node, kind text_encoder
    targets: typing.Optional[dict] = None  # term name -> plugin node (kind target) or null (removed)
    heads: typing.Optional[dict] = None  # term name -> plugin node (kind head) or null (removed)
    loss_weights: dict = field(default_factory=dict)  # term name -> weight (null: removed)
    loggers: typing.Optional[dict] = None  # name -> plugin node (kind logger) or null
    evaluation: typing.Optional[dict] = None  # vlmask eval settings (vlmask.sections.EvaluationSettings)
    finetune: typing.Optional[dict] = None  # vlmask finetune settings (vlmask.finetune.FinetuneSettings)
    stages: typing.Optional[list] = None  # training in stages (vlmask.stages): [{steps, overrides, freeze}, ...]
    record: typing.Optional[dict] = None  # written by the engine into config.yaml (RecordSettings)

    def terms(self, section: str) -> dict[str, dict]:
        """The plugin nodes of ``targets`` or ``heads`` that are set (null removes an inherited term)."""
        nodes = {"targets": self.targets, "heads": self.heads}[section]
        return {k: v for k, v in (nodes or {}).items() if v is not None}


#: Top-level keys that are not sections, with their types.
TOP_LEVEL: dict[str, Any] = typing.get_type_hints(TopSettings)

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
INJECTED = ("grid", "encoder", "encoder_dim", "text_dim", "num_classes", "student", "total_steps")

CHOICES: dict[str, tuple[str, ...]] = {
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.parallel": ("ddp", "fsdp"),
    "train.checkpoint_format": ("auto", "full", "sharded"),
    "optim.lr_scaling": ("none", "linear"),
    "device": ("auto", "cpu", "cuda"),
}


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


_CONSTRAINTS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                "too_short", "too_long", "finite_number")


@functools.lru_cache(maxsize=512)
def _adapter(annotation: Any) -> TypeAdapter:
    try:
        return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True, strict=True))
    except Exception:  # a type with its own config (pydantic models): their own rules
        return TypeAdapter(annotation)


def _tuples(value: Any) -> Any:
    """YAML has no tuples: lists become tuples for a second try against tuple annotations."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def value_problem(value: Any, annotation: Any) -> str | None:
    """Why a plain (YAML) value does not fit an annotation, or None when it fits.

    The check is pydantic's strict mode (no ``"3"`` for an int, no ``true`` for an int) with
    ``typing.Annotated`` constraints (``Annotated[int, Field(ge=1)]``); lists also fit tuples.
    Returns ``"is not of type int"`` or, for a value of the right type out of its range,
    ``"should be greater than or equal to 1"``. Unknown (string) annotations accept.

    >>> value_problem(-4, Annotated[int, Field(ge=1)])
    'should be greater than or equal to 1'
    >>> value_problem("many", int)
    'is not of type int'
    >>> value_problem([0.5, 1.0], tuple[float, float]) is None
    True
    """
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    try:
        adapter = _adapter(annotation)
    except Exception:  # not hashable, or no schema: accept (the factory checks its own arguments)
        return None
    errors: list[Any] = []
    for candidate in (value, _tuples(value)):
        try:
            adapter.validate_python(candidate)
            return None
        except ValidationError as exc:
            errors += exc.errors()
    for error in errors:
        if error["type"] in _CONSTRAINTS:
            return str(error["msg"]).replace("Input should", "should")
    return f"is not of type {_type_name(annotation)}"


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether a plain (YAML) value fits a type annotation (see :func:`value_problem`)."""
    return value_problem(value, annotation) is None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def factory_parameters(factory: Callable[..., Any]) -> dict[str, tuple[Any, bool]]:
    """name -> (annotation, required) of a factory's keyword arguments."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target, include_extras=True)
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
        problem = value_problem(value, annotation)
        if problem is None and kind == "masker" and arg.endswith("ratio") and isinstance(value, (int, float)) \
                and not 0 < value < 1:
            problem = "should be a masking ratio in (0, 1)"
        if problem is not None:
            problems.append(f"{where(f'{key}.{arg}')}: key {key}.{arg}: {value!r} {problem} ({kind} {name!r})")
    for arg, (_, required) in params.items():
        if required and arg not in node and arg not in INJECTED and arg not in provided:
            problems.append(f"{where(key)}: key {key}: {kind} {name!r} needs argument {arg!r}")
    return problems


def check_section(section: str, value: Any, schema: type, where: Callable[[str], str]) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where(section)}: key {section}: expected a mapping, got {value!r}"]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema, include_extras=True)
    problems = []
    for key, v in value.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            problems.append(f"{where(dotted)}: unknown key {dotted}{_nearest(key, list(fields))}; known: {', '.join(fields)}")
            continue
        if any(dotted == slot for slot in PLUGIN_SLOTS):
            continue  # checked as a plugin node
        problem = value_problem(v, hints[key])
        if problem is not None:
            problems.append(f"{where(dotted)}: key {dotted}: {v!r} {problem}")
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
            problem = value_problem(value, TOP_LEVEL[key])
            if problem is not None:
                problems.append(f"{recipe.where(key)}: key {key}: {value!r} {problem}")
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
    problems += stage_problems(config, recipe.where, registry, value_problem)
    if not problems:  # rules across keys assume every key has its type
        problems += check_rules(config, recipe, registry)
        errors, _ = check_requirements(config, recipe, registry)
        problems += errors
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


def check_rules(config: dict[str, Any], recipe: Recipe, registry: Registry) -> list[str]:
    """Rules across keys that the engine would otherwise meet at set-up or at step 1.

    Single-value ranges (``train.batch_size >= 1``, ``optim.lr > 0``, masking ratios in (0, 1))
    are the settings' annotations; these are the rules that need several keys or the machine.
    """
    where = recipe.where
    train, optim, model = (config.get(k) or {} for k in ("train", "optim", "model"))
    problems: list[str] = []
    if train.get("max_steps") is None and train.get("epochs") is None and not config.get("stages"):
        problems.append(f"{where('train.max_steps')}: key train.max_steps: set train.max_steps or train.epochs")
    if model.get("projection") and not config.get("text_encoder"):
        problems.append(f"{where('model.projection')}: key model.projection: the projection maps into a text space "
                        f"and needs a text_encoder (set text_encoder or model.projection=false)")
    precision, device = train.get("precision", "auto"), config.get("device", "auto")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        problems.append(f"{where('device')}: key device: 'cuda' was asked for but torch sees no CUDA device")
    if precision == "fp16" and (device == "cpu" or (device == "auto" and not cuda)):
        problems.append(f"{where('train.precision')}: key train.precision: fp16 needs CUDA "
                        f"(device {device!r}, set by {where('device')}); use bf16 or fp32 on CPU")
    if precision == "fp16" and train.get("parallel") == "fsdp":
        problems.append(f"{where('train.parallel')}: key train.parallel: fsdp runs in fp32 or bf16, not fp16 "
                        f"(train.precision set by {where('train.precision')})")
    if train.get("checkpoint_format") == "sharded" and train.get("parallel", "ddp") != "fsdp":
        problems.append(f"{where('train.checkpoint_format')}: key train.checkpoint_format: sharded checkpoints need "
                        f"train.parallel=fsdp (got {train.get('parallel', 'ddp')!r}, set by {where('train.parallel')}); "
                        "DDP writes full checkpoints (checkpoint_format auto or full)")
    signals_problem = signal_problem(train.get("preempt_signals", list(DEFAULT_SIGNALS)))
    if signals_problem:
        problems.append(f"{where('train.preempt_signals')}: key train.preempt_signals: {signals_problem}")
    if isinstance(optim.get("min_lr"), (int, float)) and isinstance(optim.get("lr"), (int, float)) and optim["min_lr"] > optim["lr"]:
        problems.append(f"{where('optim.min_lr')}: key optim.min_lr: {optim['min_lr']} is above optim.lr={optim['lr']} "
                        f"({where('optim.lr')})")
    init = model.get("init")
    if init is not None and not Path(str(init)).exists():
        problems.append(f"{where('model.init')}: key model.init: {init} does not exist (a Hugging Face VideoMAE "
                        "folder or a VideoMAE checkpoint file)")
    problems += _check_clip_geometry(config, recipe, registry)
    return problems


def _arguments(registry: Registry, kind: str, node: Any) -> dict[str, Any] | None:
    """A plugin node's arguments with the factory's defaults filled in (None: not a known plugin)."""
    if not isinstance(node, dict) or (kind, node.get("name")) not in registry:
        return None
    values = factory_defaults(registry.get(kind, node["name"]).factory)
    values.update({k: v for k, v in node.items() if k != "name"})
    return values


def _check_clip_geometry(config: dict[str, Any], recipe: Recipe, registry: Registry) -> list[str]:
    """The encoder's frames and size split into whole tubelets and patches, and the dataset's
    clips have the encoder's shape (else the engine fails when it reads the first clip)."""
    where = recipe.where
    encoder = _arguments(registry, "encoder", (config.get("model") or {}).get("encoder"))
    if encoder is None or not all(isinstance(encoder.get(k), int) for k in ("num_frames", "img_size", "tubelet", "patch")):
        return []
    problems = []
    frames, size, tubelet, patch = (encoder[k] for k in ("num_frames", "img_size", "tubelet", "patch"))
    if tubelet >= 1 and (frames < 1 or frames % tubelet):
        problems.append(f"{where('model.encoder.num_frames')}: key model.encoder.num_frames: {frames} frames do not split "
                        f"into tubelets of {tubelet} (model.encoder.tubelet)")
    if patch >= 1 and (size < 1 or size % patch):
        problems.append(f"{where('model.encoder.img_size')}: key model.encoder.img_size: {size} pixels do not split "
                        f"into patches of {patch} (model.encoder.patch)")
    dataset = _arguments(registry, "dataset", (config.get("data") or {}).get("dataset"))
    for data_key, model_key, expected in (("num_frames", "num_frames", frames), ("size", "img_size", size)):
        value = (dataset or {}).get(data_key)
        if isinstance(value, int) and value != expected:
            problems.append(f"{where(f'data.dataset.{data_key}')}: key data.dataset.{data_key}: the dataset gives {value} "
                            f"but the encoder expects model.encoder.{model_key}={expected} ({where(f'model.encoder.{model_key}')})")
    return problems


#: Slots whose plugins may declare requirements (vlmask.kinds.REQUIREMENTS).
_REQUIRING = {"targets.*": "target", "heads.*": "head", "masker": "masker"}


def _requirers(config: dict[str, Any], registry: Registry) -> list[tuple[str, str, str, frozenset[str] | str]]:
    """(key, kind, plugin name, requirements or the reason they cannot be read) per requiring plugin."""
    found = []
    for key, kind, node, _ in plugin_nodes(config):
        if kind not in _REQUIRING.values() or not isinstance(node, dict) or (kind, node.get("name")) not in registry:
            continue
        entry = registry.get(kind, node["name"])
        try:
            needs: frozenset[str] | str = requirements_of(entry.factory, {k: v for k, v in node.items() if k != "name"})
        except RequirementError as exc:
            needs = str(exc)
        found.append((key, kind, node["name"], needs))
    return found


def check_requirements(config: dict[str, Any], recipe: Recipe, registry: Registry) -> tuple[list[str], list[str]]:
    """(errors, notes): what targets, heads and maskers require against what the recipe provides.

    A missing predictor, teacher, projection or text encoder is an error naming the key that
    removed it (or the file) and the plugin that needs it; what the data provides (action boxes,
    labels) cannot be known without reading it and is a note.
    """
    where = recipe.where
    dataset = (config.get("data") or {}).get("dataset") or {}
    provided = {
        "predictor": bool((config.get("model") or {}).get("predictor")),
        "teacher": bool(config.get("teacher")),
        "projection": bool((config.get("model") or {}).get("projection")),
        "text_embedding": bool(config.get("text_encoder")),
        **{need: bool(dataset.get(argument)) for need, argument in DATASET_VIEWS.items()},
    }
    provider_key = {"predictor": "model.predictor", "teacher": "teacher", "projection": "model.projection",
                    "text_embedding": "text_encoder",
                    **{need: f"data.dataset.{argument}" for need, argument in DATASET_VIEWS.items()}}
    errors, notes = [], []
    for key, kind, name, needs in _requirers(config, registry):
        if isinstance(needs, str):
            errors.append(f"{where(key)}: key {key}: {needs}")
            continue
        for need in sorted(needs):
            what = f"{kind} {name!r} ({key}, {where(key)})"
            if need in DATA_REQUIREMENTS:
                notes.append(f"{where(key)}: {kind} {name!r} ({key}) needs {REQUIREMENTS[need]}")
            elif not provided[need]:
                slot = provider_key[need]
                errors.append(f"{where(slot)}: key {slot}: {what} requires {REQUIREMENTS[need]}; the recipe has none")
    return errors, notes


def requirements_report(recipe: Recipe, registry: Registry) -> list[str]:
    """Notes on what the data must provide (``action_box``, ``label``) for the recipe's targets,
    heads and masker: not errors, since only reading the manifest can tell."""
    config = OmegaConf.to_container(recipe.config, resolve=True)
    assert isinstance(config, dict)
    return check_requirements(config, recipe, registry)[1]


def data_requirers(recipe: Recipe, registry: Registry) -> dict[str, list[str]]:
    """What the data must provide for the recipe: each requirement of ``DATA_REQUIREMENTS`` that
    a target, head or masker declares -> who needs it, e.g. ``{"action_box": ["head
    'video_text_infonce' (heads.actclip)"]}``. Requirements that cannot be read are left out
    (``validate`` reports them)."""
    config = OmegaConf.to_container(recipe.config, resolve=True)
    assert isinstance(config, dict)
    found: dict[str, list[str]] = {}
    for key, kind, name, needs in _requirers(config, registry):
        if not isinstance(needs, str):
            for need in sorted(needs & DATA_REQUIREMENTS):
                found.setdefault(need, []).append(f"{kind} {name!r} ({key})")
    return found


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
        if value_problem(w, float) is not None:
            problems.append(f"{recipe.where('loss_weights.' + term)}: key loss_weights.{term}: {w!r} is not a number")
    return problems


def settings(recipe: Recipe, section: str) -> Any:
    """The typed settings of a section (defaults filled in): the one place a setting's default
    lives (``SECTIONS``, and ``record`` as the engine wrote it: :class:`RecordSettings`)."""
    schema = SECTIONS.get(section) or WRITTEN[section]
    value = recipe.get(section) or {}
    names = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in value.items() if k in names})


def top_settings(recipe: Recipe) -> TopSettings:
    """The recipe's top-level keys (``seed``, ``device``, the plugin nodes ...), defaults filled in."""
    names = {f.name for f in dataclasses.fields(TopSettings)}
    return TopSettings(**{k: recipe.get(k) for k in names if recipe.get(k) is not None})


def build(registry: Registry, recipe: Recipe, key: str, kind: str, injected: dict[str, Any] | None = None, *,
          if_taken: dict[str, Any] | None = None, node: dict[str, Any] | None = None, **extra: Any) -> Any:
    """Build the plugin at ``key`` of a recipe: THE construction path of every plugin kind
    (parts, datasets for training, evaluation and finetuning; evaluators with ``node``).

    The node's arguments, then ``extra`` (the caller's, over the recipe's: a dataset's
    ``manifest``), then ``if_taken`` (over the recipe's too, but only those the factory takes:
    evaluation turning training views off), then ``injected`` (only those the factory takes
    and the recipe does not set). ``node`` is the plugin node when it is not the recipe's value
    at ``key`` (an evaluator merged from defaults). The product must keep its kind's contract
    (:func:`vlmask.kinds.missing_members`). Every problem is a RecipeError naming file and key."""
    node = recipe.get(key) if node is None else node
    problems = check_plugin_node(registry, key, kind, node, recipe.where)
    if problems:
        raise RecipeError(problems)
    entry = registry.get(kind, node["name"])
    kwargs = {k: v for k, v in node.items() if k != "name"}
    kwargs.update(extra)
    params = factory_parameters(entry.factory)
    kwargs.update({name: value for name, value in (if_taken or {}).items() if name in params})
    for name, value in (injected or {}).items():
        if name in params and name not in kwargs:
            kwargs[name] = value
    try:
        product = entry.factory(**kwargs)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise RecipeError([f"{recipe.where(key)}: key {key} ({kind} {node['name']!r}): {exc}"]) from exc
    missing = missing_members(kind, product)
    if missing:
        raise RecipeError([f"{recipe.where(key)}: key {key}: {kind} {node['name']!r} (from {entry.provider}) breaks the "
                           f"{kind} contract (vlmask.kinds): it lacks {', '.join(missing)}"])
    return product


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
    batch_size = settings(recipe, "train").batch_size if batch_size is None else batch_size
    workers = section.get("num_workers")
    workers = settings(recipe, "data").num_workers if workers is None else workers
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
    features = section.get("features", "encoder")
    problems += evaluation_features_problems(recipe, registry, features)
    if problems:
        raise RecipeError(problems)
    return EvaluationSettings(int(batch_size), int(workers), evaluators, features)


def evaluation_features_problems(recipe: Recipe, registry: Registry, features: Any) -> list[str]:
    """``evaluation.features``: one of :data:`vlmask.sections.EVALUATION_FEATURES`; ``context``
    only with a predictor whose class offers the aggregated context
    (:class:`vlmask.kinds.ContextFeatures`; a factory function is checked once built, by
    ``vlmask.evaluate.context_of``). One line per problem, naming the file and key."""
    where = recipe.where("evaluation.features")
    if not isinstance(features, str) or features not in EVALUATION_FEATURES:
        return [f"{where}: key evaluation.features: {features!r} is not one of {', '.join(EVALUATION_FEATURES)}"]
    if features != "context":
        return []
    node = settings(recipe, "model").predictor
    offering = [name for name in registry.names("predictor") if offers_context(registry.get("predictor", name).factory)]
    hint = f"registered predictors that offer it: {', '.join(offering) or 'none'}"
    if not isinstance(node, dict):
        return [f"{where}: key evaluation.features: 'context' probes the predictor's aggregated context c_t "
                f"(DPC, MemDPC), and this recipe has no predictor (model.predictor); {hint}"]
    if ("predictor", node.get("name")) in registry and offers_context(registry.get("predictor", node["name"]).factory) is False:
        return [f"{where}: key evaluation.features: 'context' probes the predictor's aggregated context c_t "
                f"(DPC, MemDPC), and predictor {node['name']!r} (set by {recipe.where('model.predictor')}) offers none "
                f"(vlmask.kinds.ContextFeatures); {hint}"]
    return []
