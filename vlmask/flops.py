"""Training FLOPs of a run (``summary.json``'s ``train_flops``): one step's FLOP count per clip
(vlmask.bench's counter: forward, backward and teacher, on the ``meta`` device) x clips trained.

Counting builds a second copy of the recipe's model on the CPU without data and moves it to
the ``meta`` device (no memory, no arithmetic), so it costs a model build (well under a second
at demo scale once vlmask.bench is imported) and never touches the training run's own modules.
The count is taken at the run's own scale (its clip size, model width, masker ratio): FLOPs per
clip do not depend on the batch size, so a batch of :data:`vlmask.bench.FLOP_COUNT_BATCH` clips
is counted.

``vlmask.engine.Trainer.train`` calls :func:`train_flops_of_recipe` once at the end of a run, on
the main rank, with ``clips_trained = steps * batch_size * world_size * accumulate``; a counting
failure is a warning there, never a failed run (``train_flops`` is then null).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlmask.config import Recipe
from vlmask.plugins import Plugins

__all__ = ["train_flops", "train_flops_of_recipe"]


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
    """:func:`train_flops` for an already loaded recipe (e.g. ``Trainer.recipe``): its source
    file with the overrides it was loaded with (``run.dir`` dropped)."""
    return train_flops(recipe.path, list(recipe.overrides), clips_trained, plugins)
