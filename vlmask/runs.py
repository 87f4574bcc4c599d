"""Reopening a run directory to use what it trained: ``open_run(run_dir)``.

``vlmask eval``, ``embed``, ``finetune`` and ``export`` open runs here, never through a
``Trainer``: the recipe is read from ``config.yaml``, its parts are built with
:func:`vlmask.build.build_components` and the latest checkpoint is loaded strictly (every key,
every shape; a sharded checkpoint is read whole in this one process). No optimizer, data loader or hook registration is made, and nothing in the run
directory is written or truncated (the layout is in docs/contract.md, "A run directory").
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from vlmask.build import Components, Student, autocast_of, build_components, resolve_device, resolve_precision, set_attention_backends
from vlmask import sharded
from vlmask.checkpoint import CheckpointError, latest_checkpoint, load_strict, load_tensors
from vlmask.config import Recipe, RecipeError, load_recipe
from vlmask.paths import cache_dir
from vlmask.plugins import Plugins, default_plugins
from vlmask.schema import build, factory_parameters, settings, top_settings


class OpenRun:
    """A run reopened for use: its recipe, its parts with the latest checkpoint's weights (on
    ``device``, in eval mode) and what it was trained on. See :func:`open_run`."""

    def __init__(self, run_dir: Path, recipe: Recipe, plugins: Plugins, checkpoint: Path, parts: Components,
                 device: torch.device, precision: str, train_manifest: Path | None) -> None:
        self.run_dir = run_dir
        self.recipe = recipe
        self.plugins = plugins
        self.checkpoint = checkpoint
        self.parts = parts
        self.device = device
        self.precision = precision
        self.train_manifest = train_manifest
        self.autocast: Callable[[], ContextManager[Any]] = autocast_of(precision, device)

    @property
    def student(self) -> Student:
        return self.parts.student

    @property
    def encoder(self) -> nn.Module:
        return self.parts.encoder

    @property
    def teacher(self) -> nn.Module | None:
        return self.parts.teacher

    @property
    def text_encoder(self) -> Any | None:
        return self.parts.text_encoder

    @functools.cached_property
    def train_set(self) -> Any:
        """The recipe's dataset on the training manifest, train=True (built on first use)."""
        return _train_set(self.recipe, self.plugins, self.train_manifest)


def train_manifest_of(recipe: Recipe, plugins: Plugins) -> Path | None:
    """``data.train``, else the manifest the run recorded, else the default data's (a plugin's)."""
    train = settings(recipe, "data").train or settings(recipe, "record").data.get("train")
    if train:
        return Path(train)
    manifests = plugins.manager.hook.vlmask_default_manifests(recipe=recipe, cache_dir=cache_dir(), progress=False)
    return Path(manifests[0]) if manifests is not None else None


def _train_set(recipe: Recipe, plugins: Plugins, manifest: Path | None) -> Any:
    if manifest is None:
        raise RecipeError([f"{recipe.path}: key data.train: not set, and no plugin provides default data"])
    return build(plugins.registry, recipe, "data.dataset", "dataset", manifest=str(manifest), train=True)


def _needs_classes(recipe: Recipe, plugins: Plugins) -> bool:
    """Whether a target, head or predictor of the recipe takes the injected ``num_classes``."""
    for section, kind in (("targets", "target"), ("heads", "head")):
        for node in top_settings(recipe).terms(section).values():
            if "num_classes" in factory_parameters(plugins.registry.get(kind, node["name"]).factory):
                return True
    node = settings(recipe, "model").predictor
    return bool(node) and "num_classes" in factory_parameters(plugins.registry.get("predictor", node["name"]).factory)


def run_recipe(run_dir: str | Path, overrides: Sequence[str], plugins: Plugins) -> tuple[Recipe, torch.device, str, Path | None]:
    """What :func:`open_run` reads before it builds anything: the recipe (``config.yaml`` with
    ``overrides``), the device and precision it resolves to here, and the training manifest.
    Nothing is built or loaded (``vlmask compare`` uses it to know what an evaluation would be)."""
    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "config.yaml", [*overrides, f"run.dir={run_dir}"])
    device = resolve_device(top_settings(recipe).device)
    precision = resolve_precision(recipe, settings(recipe, "train").precision, device)
    return recipe, device, precision, train_manifest_of(recipe, plugins)


def checkpoint_tensors(checkpoint: Path, name: str) -> tuple[dict[str, torch.Tensor], Path]:
    """Module ``name``'s full tensors from ``checkpoint`` of either format, and the file (or
    shard folder) they come from: a full checkpoint's ``<name>.safetensors``, or a sharded
    checkpoint's shards gathered in this process alone, with no process group and nothing
    written (``vlmask.sharded.load_full``)."""
    if sharded.is_sharded(checkpoint):
        return sharded.load_full(checkpoint, name), checkpoint / sharded.SHARDS
    return load_tensors(checkpoint / f"{name}.safetensors"), checkpoint / f"{name}.safetensors"


def open_run(run_dir: str | Path, overrides: Sequence[str] = (), plugins: Plugins | None = None) -> OpenRun:
    """The run in ``run_dir`` with its latest checkpoint loaded strictly, on the recipe's
    device (``overrides``, KEY=VALUE on ``config.yaml``, may change it: ``device=cpu``).

    Raises ``FileNotFoundError`` for a folder without ``config.yaml`` and
    ``vlmask.checkpoint.CheckpointError`` for a run without a checkpoint or whose checkpoint
    does not match its recipe. Reads only: the run directory is left byte for byte as it was.
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    plugins = plugins or default_plugins()
    recipe, device, precision, train_manifest = run_recipe(run_dir, overrides, plugins)
    num_classes = 0
    if _needs_classes(recipe, plugins):
        num_classes = len(_train_set(recipe, plugins, train_manifest).classes or [])
    total_steps = int(settings(recipe, "record").total_steps or settings(recipe, "train").max_steps or 1)
    parts = build_components(recipe, plugins, total_steps=total_steps, num_classes=num_classes, init=False)
    for name in ("student", "teacher"):
        module = getattr(parts, name)
        if module is not None:
            load_strict(module, *checkpoint_tensors(checkpoint, name))
    parts.student.to(device).eval()
    if parts.teacher is not None:
        parts.teacher.to(device).eval()
    set_attention_backends(parts, device)
    return OpenRun(run_dir, recipe, plugins, checkpoint, parts, device, precision, train_manifest)
