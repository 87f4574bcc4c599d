"""What a recipe needs from its data: checked against the manifest, filled before training.

Targets, heads and maskers declare requirements (``vlmask.kinds``). Those the data provides
(``DATA_REQUIREMENTS``: ``action_box``, ``label``) can only be checked by reading the manifest:
:func:`measure` counts the lines of ``data.train`` that lack each one (docs/contract.md, "Data
manifest": ``label`` is also given by ``verb`` and ``noun``) and asks the plugins what they
would do about it (hook ``vlmask_plan_requirement``; the built-in plugin detects missing action
boxes). :func:`check_data` turns that into ``vlmask validate``'s notes and errors and is what
``vlmask compare`` checks before it trains anything; :func:`fill_data` is what the Trainer calls
before building its dataset (hook ``vlmask_fill_requirement``, rank 0 first under torchrun).
A field some lines lack that no plugin provides is an error before any training step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlmask.config import Recipe, RecipeError
from vlmask.kinds import REQUIREMENTS
from vlmask.launch import in_turn
from vlmask.registry import Registry
from vlmask.schema import data_requirers, requirements_report, settings


def _has_action_box(row: dict[str, Any]) -> bool:
    return row.get("action_box") is not None


def _has_label(row: dict[str, Any]) -> bool:
    return bool(row.get("label")) or (bool(row.get("verb")) and bool(row.get("noun")))


#: Data requirement -> whether a manifest line provides it (docs/contract.md, "Data manifest").
PROVIDED_BY_LINE: dict[str, Callable[[dict[str, Any]], bool]] = {"action_box": _has_action_box, "label": _has_label}


@dataclass
class DataNeed:
    """One data requirement of a recipe against one manifest: ``lacking`` of its ``lines`` (lines
    with a ``video``; bad lines are the dataset's to skip) lack the field; ``plan`` is what a
    plugin will do about it (None: nothing can), ``needed_by`` who requires it."""

    requirement: str
    manifest: Path
    lines: int
    lacking: int
    needed_by: list[str] = field(default_factory=list)
    plan: str | None = None

    def note(self) -> str:
        who = ", ".join(self.needed_by)
        if not self.lacking:
            return f"all {self.lines} lines of {self.manifest} have {self.requirement} (needed by {who})"
        return (f"{self.lacking} of {self.lines} lines of {self.manifest} lack {self.requirement}; "
                f"{self.plan or 'nothing provides it'}")

    def error(self) -> str | None:
        """One line when lines lack the field and no plugin provides it, else None."""
        if not self.lacking or self.plan is not None:
            return None
        return (f"{self.manifest}: {self.lacking} of {self.lines} lines lack {self.requirement}, needed by "
                f"{', '.join(self.needed_by)}; no plugin provides {REQUIREMENTS[self.requirement]}")


def count_lacking(manifest: Path, requirement: str) -> tuple[int, int]:
    """(lines with a ``video``, of those the lines that lack ``requirement``) in a JSONL manifest."""
    has = PROVIDED_BY_LINE[requirement]
    lines = lacking = 0
    with Path(manifest).open("r", encoding="utf-8-sig", errors="replace") as handle:
        for text in handle:
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError):
                continue
            if not isinstance(row, dict) or not isinstance(row.get("video"), str):
                continue
            lines += 1
            lacking += not has(row)
    return lines, lacking


def measure(recipe: Recipe, registry: Registry, hooks: Any, manifest: Path, cache_root: Path) -> list[DataNeed]:
    """Every data requirement of the recipe against ``manifest``, with the plugins' plans
    (``hooks``: a plugin manager's ``hook``) for the fields some lines lack."""
    needs = []
    for requirement, who in sorted(data_requirers(recipe, registry).items()):
        lines, lacking = count_lacking(manifest, requirement)
        plan = None
        if lacking:
            plan = hooks.vlmask_plan_requirement(requirement=requirement, manifest=manifest, cache_dir=cache_root)
        needs.append(DataNeed(requirement, manifest, lines, lacking, who, plan))
    return needs


def check_data(recipe: Recipe, registry: Registry, hooks: Any, cache_root: Path) -> tuple[list[str], list[str]]:
    """(errors, notes) of the recipe's data requirements against its ``data.train`` manifest,
    reading the manifest (not the videos) and building nothing. Without ``data.train`` the
    notes say what the default data must provide; a ``data.train`` that is not a file is left to
    the caller to report."""
    manifest = settings(recipe, "data").train
    if not manifest:
        return [], requirements_report(recipe, registry)
    path = Path(str(manifest)).expanduser()
    if not path.is_file():
        return [], []
    where = recipe.where("data.train")
    errors, notes = [], []
    for need in measure(recipe, registry, hooks, path, cache_root):
        error = need.error()
        if error is not None:
            errors.append(f"{where}: key data.train: {error}")
        else:
            notes.append(need.note())
    return errors, notes


def fill_data(recipe: Recipe, registry: Registry, hooks: Any, manifest: Path, cache_root: Path, rank: int = 0,
              world_size: int = 1, log: Callable[[str], None] = print, *,
              local_rank: int = 0) -> tuple[Path, dict[str, dict[str, int]]]:
    """The manifest to train on: ``manifest`` itself when its lines carry every data field the
    recipe needs, else the manifest a plugin filled (hook ``vlmask_fill_requirement``: rank 0
    first, then each node's first process, then the rest, :func:`vlmask.launch.in_turn`, so
    they read what was cached). Returns it with the counts per filled field; ``log`` gets one
    line per field (rank 0). Raises RecipeError naming the manifest and the field when lines
    lack a field that no plugin fills."""
    counts: dict[str, dict[str, int]] = {}
    current = manifest
    for need in measure(recipe, registry, hooks, manifest, cache_root):
        if not need.lacking:
            continue
        filled = None
        if need.plan is not None:
            filled = in_turn(rank, local_rank, world_size, lambda progress: hooks.vlmask_fill_requirement(
                requirement=need.requirement, manifest=current, cache_dir=cache_root, progress=progress))
        if filled is None:
            raise RecipeError([f"{recipe.where('data.train')}: key data.train: "
                               f"{need.error() or f'{manifest}: no plugin filled {need.requirement}'}"])
        if rank == 0:
            log(f"{need.lacking} of {need.lines} lines of {manifest} lacked {need.requirement}; {filled.summary}")
        counts[need.requirement] = dict(filled.counts)
        current = Path(filled.path)
    return current, counts
