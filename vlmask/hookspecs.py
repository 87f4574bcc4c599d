"""Every vlmask hook, grouped by lifecycle.

A plugin implements any of these with ``from vlmask import hookimpl`` as a module-level function
(a distribution's entry-point module, group ``vlmask``) or as a method of a component the engine
built from a recipe (maskers, targets, heads, teachers and loggers are registered with the run's
plugin manager for the run's duration). An implementation may accept a subset of the arguments.

Unless a spec says ``firstresult``, every implementation is called and their return values are
ignored or collected as a list.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vlmask.engine import RunInfo
    from vlmask.registry import Register

hookspec = pluggy.HookspecMarker("vlmask")


# --- registration ---------------------------------------------------------------------------

@hookspec
def vlmask_register_plugins(register: "Register") -> None:
    """Add factories to the registry.

    Called once per plugin when the plugin manager starts. ``register(kind, name, factory)``
    adds ``factory`` as the plugin of ``kind`` (one of ``vlmask.registry.KINDS``) selectable by
    ``name`` in a recipe; the factory receives the recipe node's other keys as keyword
    arguments. A duplicate (kind, name) is an error naming both providers. Every
    implementation is called; the return value is ignored.
    """


# --- run lifecycle --------------------------------------------------------------------------

@hookspec
def vlmask_train_start(run: "RunInfo") -> None:
    """The run is set up and about to take its first (or, on resume, next) step.

    ``run`` describes the run: directory, resolved config, device, world size and rank, step to
    start from, total steps. Called on every rank. Every implementation is called.
    """


@hookspec
def vlmask_after_optimizer_step(step: int, run: "RunInfo") -> None:
    """The optimizer has just updated the student; ``step`` counts completed updates (1-based).

    Called on every rank, after the teacher update, before metrics are logged. Parameters
    constrained after each update (e.g. the contrastive head's logit-scale clamp, open_clip) do
    it here. Every implementation is called. Keep it cheap: it runs every step.
    """


@hookspec
def vlmask_step_end(step: int, metrics: dict[str, float], run: "RunInfo") -> None:
    """A logging step has ended (every ``train.log_every`` steps and the last one).

    ``metrics`` is the object written to ``metrics.jsonl``: ``step``, ``loss``, one key per loss
    term, ``lr``, ``clips_per_s`` and any statistics the targets and heads reported. Called on
    rank 0 only (loggers). Every implementation is called.
    """


@hookspec
def vlmask_checkpoint_saved(step: int, path: Path, run: "RunInfo") -> None:
    """A checkpoint was written atomically to the folder ``path`` after ``step`` updates.

    Called on rank 0 only. Every implementation is called.
    """


@hookspec
def vlmask_train_end(summary: dict[str, Any], run: "RunInfo") -> None:
    """Training has finished; ``summary`` is what was written to ``summary.json``.

    Called on rank 0 only. Every implementation is called.
    """


#: Every hook name, for documentation and the test that each hook is exercised.
HOOKS = (
    "vlmask_register_plugins",
    "vlmask_train_start",
    "vlmask_after_optimizer_step",
    "vlmask_step_end",
    "vlmask_checkpoint_saved",
    "vlmask_train_end",
)
