"""The entry point of vlmask's first-party plugins (group ``vlmask``, name ``builtin``).

Every built-in factory is registered here, explicitly, through the same hooks third-party
plugins implement; nothing registers itself by being imported. Besides the factories, the
built-in plugin starts ``model.init`` from VideoMAE checkpoints (``vlmask_load_init``), provides the
default data (the synthetic video-caption set, through ``vlmask_default_manifests``), action boxes
detected before training where a recipe needs them and the manifest lacks them
(``vlmask_plan_requirement`` / ``vlmask_fill_requirement``), the commands
``vlmask data synth|boxes|captions|import|shard`` and ``vlmask export`` (through ``vlmask_add_commands``)
and the pictures ``vlmask show masks|reconstruction|attention`` (through ``vlmask_picture_kinds``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmask import hookimpl
from vlmask.hookspecs import FilledManifest
from vlmask.registry import Register
from vlmask_plugins import (
    action_area,
    captioners,
    data,
    encoders,
    evaluation,
    heads,
    loggers,
    maskers,
    targets,
    teachers,
    text,
)


@hookimpl
def vlmask_register_plugins(register: Register) -> None:
    for package in (maskers, encoders, teachers, targets, heads, text, data, action_area, captioners, evaluation, loggers):
        package.register_plugins(register)


@hookimpl
def vlmask_default_manifests(recipe: Any, cache_dir: Path, progress: bool) -> tuple[Path, Path]:
    """The built-in synthetic set (arguments: the recipe's ``data.synthetic``), made on first use."""
    from vlmask_plugins.data import synthetic

    return synthetic.ensure_builtin(cache_dir, **(recipe.get("data.synthetic") or {}), progress=progress)


@hookimpl
def vlmask_plan_requirement(requirement: str, manifest: Path, cache_dir: Path) -> str | None:
    """Missing ``action_box`` fields are detected (MoFo's action area, ``vlmask data boxes``'s detector)."""
    if requirement != "action_box":
        return None
    return (f"they will be detected before training (detector 'flow', as vlmask data boxes; "
            f"cached in {Path(cache_dir) / 'boxes'})")


@hookimpl
def vlmask_fill_requirement(requirement: str, manifest: Path, cache_dir: Path, progress: bool) -> FilledManifest | None:
    """Detect the missing ``action_box`` fields (cached per clip) into a filled copy of the manifest."""
    if requirement != "action_box":
        return None
    from vlmask_plugins.action_area.boxes import boxes_for_training

    return boxes_for_training(manifest, cache_dir, progress=progress)


@hookimpl
def vlmask_load_init(path: Path, encoder: Any, predictor: Any) -> Any:
    """``model.init``: VideoMAE checkpoints (Hugging Face folders, original ``.pth`` files)."""
    from vlmask_plugins.encoders.videomae_init import load_init

    return load_init(path, encoder, predictor)


@hookimpl
def vlmask_picture_kinds() -> dict[str, Any]:
    """``vlmask show masks|reconstruction|attention`` (vlmask_plugins.pictures)."""
    from vlmask_plugins.pictures import picture_kinds

    return picture_kinds()


@hookimpl
def vlmask_add_commands(subparsers: argparse._SubParsersAction, data: argparse._SubParsersAction) -> None:
    from vlmask_plugins.commands import add_commands

    add_commands(subparsers, data)
