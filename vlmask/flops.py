"""Training FLOPs of a run (``summary.json``'s ``train_flops``): one step's FLOP count per clip
(vlmask.bench's counter: forward, backward and teacher, on the ``meta`` device) x clips trained.

Counting builds a second copy of the recipe's model on the CPU without data and moves it to
the ``meta`` device (no memory, no arithmetic), so it costs a model build (about a second at
demo scale) and never touches the training run's own modules. The count is taken at the
run's own scale (its clip size, model width, masker ratio): FLOPs per clip do not depend on
the batch size, so a batch of :data:`vlmask.bench.FLOP_COUNT_BATCH` clips is counted.

Engine wiring (the engine owner): at the end of ``Trainer.train``, on the main rank::

    from vlmask.flops import train_flops
    summary["train_flops"] = train_flops_of_recipe(self.recipe, clips_trained)

with ``clips_trained = step * batch_size * world_size * accumulate`` (the summary's steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlmask.config import Recipe

__all__ = ["train_flops", "train_flops_of_recipe"]


def train_flops(recipe_path: str | Path, overrides: Sequence[str], clips_trained: int) -> float:
    """FLOPs of training ``clips_trained`` clips with the recipe at ``recipe_path`` + ``overrides``:
    ``gflops_per_clip * 1e9 * clips_trained`` (vlmask.bench.count_flops)."""
    from vlmask.bench import count_flops

    if clips_trained < 0:
        raise ValueError(f"clips_trained must be >= 0, got {clips_trained}")
    counted = count_flops(recipe_path, [o for o in overrides if not o.startswith("run.dir=")])
    return float(counted["gflops_per_clip"]) * 1e9 * clips_trained


def train_flops_of_recipe(recipe: Recipe, clips_trained: int) -> float:
    """:func:`train_flops` for an already loaded recipe (e.g. ``Trainer.recipe``): its source
    file with the overrides it was loaded with (``run.dir`` dropped)."""
    overrides = list(recipe.overrides)
    return train_flops(recipe.path, overrides, clips_trained)
