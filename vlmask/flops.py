"""Training FLOPs of a run (``summary.json``'s ``train_flops``): one step's FLOP count per clip
(vlmask.bench's counter: ``FlopCounterMode`` around the real ``TrainStep.step``, on the ``meta``
device) x clips trained.

:func:`record_train_flops` counts on the run's own TrainStep: :meth:`vlmask.step.TrainStep.on_meta`
copies its parts onto the ``meta`` device (no weight copied, no memory, no arithmetic; under
FSDP the copy taken before sharding), so nothing is built again and the run's own modules are
left as they are. The count is taken at the run's own scale (its clip size, model width, masker
ratio, the data's classes): FLOPs per clip do not depend on the batch size, so a batch of
:data:`vlmask.bench.FLOP_COUNT_BATCH` clips is counted. ``vlmask run`` and ``vlmask compare``
call it once at the end of training, on the main rank (the counter is in a layer above the
engine); a counting failure is a warning there, never a failed run (``train_flops`` is then
null). :func:`train_flops` counts a recipe that has no run (it builds the parts once).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from vlmask.config import Recipe
from vlmask.plugins import Plugins
from vlmask.step import TrainStep

__all__ = ["record_train_flops", "train_flops", "train_flops_of_recipe"]


def train_flops(recipe_path: str | Path, overrides: Sequence[str], clips_trained: int,
                plugins: Plugins | None = None) -> float:
    """FLOPs of training ``clips_trained`` clips with the recipe at ``recipe_path`` + ``overrides``:
    ``flops_per_clip * clips_trained`` (vlmask.bench.count_flops, unrounded). ``plugins``: the
    run's own (third-party parts of the recipe), default the process's."""
    from vlmask.bench import count_flops

    if clips_trained < 0:
        raise ValueError(f"clips_trained must be >= 0, got {clips_trained}")
    counted = count_flops(recipe_path, [o for o in overrides if not o.startswith("run.dir=")], plugins=plugins)
    return float(counted["flops_per_clip"]) * clips_trained


def train_flops_of_recipe(recipe: Recipe, clips_trained: int, plugins: Plugins | None = None) -> float:
    """:func:`train_flops` for an already loaded recipe (e.g. ``TrainStep.recipe``): its source
    file with the overrides it was loaded with (``run.dir`` dropped)."""
    return train_flops(recipe.path, list(recipe.overrides), clips_trained, plugins)


def record_train_flops(run_dir: str | Path, train_step: TrainStep, summary: dict[str, Any]) -> dict[str, Any]:
    """Count ``train_flops`` for a run that just finished with ``train_step`` (one step's FLOPs
    per clip, counted on :meth:`TrainStep.on_meta`, x ``steps * batch_size * world_size *
    accumulate``), put it into ``summary`` and rewrite ``RUN_DIR/summary.json`` with it
    (atomically). A counting failure is a warning on stderr and ``train_flops: null``, never an
    exception; the process's random state is left as it was."""
    from vlmask.bench import count_step_flops

    train = train_step.train_cfg
    clips = int(summary.get("steps") or 0) * train.batch_size * int(summary.get("world_size") or 1) * train.accumulate
    try:
        with torch.random.fork_rng(devices=[]), train_step.on_meta() as on_meta:
            summary["train_flops"] = float(count_step_flops(on_meta)["gflops_per_clip"] * 1e9) * clips
    except Exception as error:  # FLOPs annotate a run; they must never fail one
        print(f"warning: {run_dir}: training FLOPs not counted ({type(error).__name__}: {error}); "
              f"summary.json has train_flops null", file=sys.stderr, flush=True)
        summary["train_flops"] = None
    path = Path(run_dir) / "summary.json"
    scratch = path.with_name(".summary.json.tmp")
    scratch.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(scratch, path)
    return summary
