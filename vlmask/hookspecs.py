"""Every vlmask hook, grouped by lifecycle.

A plugin implements any of these with ``from vlmask import hookimpl`` as a module-level function
(a distribution's entry-point module, group ``vlmask``) or as a method of a component the engine
built from a recipe (maskers, targets, heads, teachers and loggers are registered with the run's
plugin manager for the run's duration). An implementation may accept a subset of the arguments.

Unless a spec says ``firstresult``, every implementation is called and their return values are
ignored or collected as a list.

A run's components are registered with the run's OWN plugin manager (see
``vlmask.engine.Trainer``), never with the process-wide one: they take part in that run's
lifecycle hooks and leave with it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
import torch

if TYPE_CHECKING:
    from vlmask.config import Recipe
    from vlmask.registry import Register

hookspec = pluggy.HookspecMarker("vlmask")


@dataclass
class RunInfo:
    """What lifecycle hooks learn about the run."""

    dir: Path
    recipe: "Recipe"
    device: torch.device
    rank: int
    world_size: int
    start_step: int
    total_steps: int
    attention: str = "sdpa"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class FilledManifest:
    """A plugin's answer to :func:`vlmask_fill_requirement`: the manifest to read instead.

    ``path`` holds every line of the source manifest at its own line number (so skipped lines
    keep their numbers in reports), good lines with the field filled and relative ``video``
    paths rewritten to stay correct from ``path``'s folder. ``counts`` says what was done (for
    action boxes: ``lines``, ``kept``, ``detected``, ``from_cache``, ``failed``); ``summary`` is
    one line for the run's log.
    """

    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    summary: str = ""


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


@hookspec
def vlmask_add_commands(subparsers: argparse._SubParsersAction, data: argparse._SubParsersAction) -> None:
    """Add command-line commands.

    ``subparsers`` makes top-level commands (``vlmask NAME``), ``data`` makes ``vlmask data
    NAME`` commands; each is an ``argparse`` sub-parsers object (``.add_parser(name, help=...)``).
    A command sets ``func`` with ``set_defaults(func=...)``: a callable taking the parsed
    ``argparse.Namespace`` and returning the exit status (0: success). It may raise
    ``vlmask.config.RecipeError`` (printed as a list of problems, exit status 2) or any
    exception (printed on one line, exit status 1). The built-in plugin adds ``data synth``,
    ``data boxes``, ``data captions``, ``data import`` and ``export`` here. Called once per ``vlmask``
    invocation, while the parser is built. Every implementation is called; two plugins adding
    one name is an ``argparse`` error naming it.
    """


# --- data -----------------------------------------------------------------------------------

@hookspec(firstresult=True)
def vlmask_default_manifests(recipe: "Recipe", cache_dir: Path, progress: bool) -> tuple[Path, Path] | None:
    """The ``(train, val)`` manifests of a recipe that sets no ``data.train``.

    ``recipe`` is the run's recipe (its ``data.synthetic`` node holds the default set's
    arguments), ``cache_dir`` the folder for generated data (``VLMASK_CACHE``), ``progress``
    whether to show progress. The engine calls it on rank 0 first, then on the other ranks
    after a barrier, so an implementation may generate the data on first use and must return
    existing files on later calls. ``firstresult``: implementations are called until one answers
    (not None) and that answer is used; None from
    every plugin (e.g. the built-in one blocked) makes ``data.train`` required. The built-in
    plugin answers with its synthetic video-caption set.
    """


@hookspec(firstresult=True)
def vlmask_plan_requirement(requirement: str, manifest: Path, cache_dir: Path) -> str | None:
    """How a plugin would provide the data field ``requirement`` that lines of ``manifest`` lack.

    ``requirement`` is one of ``vlmask.kinds.DATA_REQUIREMENTS`` (e.g. ``"action_box"``, needed by
    the action-area masker and ActCLIP's ``pooling='action_area'``), ``manifest`` the JSONL file
    whose lines lack it, ``cache_dir`` the cache root (``VLMASK_CACHE``). The answer is a clause
    that ``vlmask validate`` and ``vlmask compare`` print after "N of M lines of FILE lack
    FIELD; ", e.g. ``"they will be detected before training (cached in DIR)"``; None means this
    plugin cannot provide it. It must not read videos nor write anything. Called by
    ``vlmask.data_requirements.check_data`` (validate, compare's plan) on one process.
    ``firstresult``: implementations are called until one answers; None from every plugin makes
    the missing field an error before any training.
    """


@hookspec(firstresult=True)
def vlmask_fill_requirement(requirement: str, manifest: Path, cache_dir: Path,
                            progress: bool) -> "FilledManifest | None":
    """Fill the data field ``requirement`` where lines of ``manifest`` lack it, before training.

    Same ``requirement``, ``manifest`` and ``cache_dir`` as :func:`vlmask_plan_requirement`, which
    must answer for the same plugin; ``progress``: whether to show progress. Returns a
    :class:`FilledManifest` (a new manifest, written under ``cache_dir``; the source is never
    modified) or None when this plugin cannot fill it. The engine calls it from the Trainer's
    data setup for ``data.train``, on rank 0 first, then on the other ranks after a barrier, so
    an implementation should cache its per-clip results (the second call computes nothing) and
    write its output atomically. ``firstresult``: implementations are called until one answers;
    None from every plugin stops the run before training with an error naming the manifest and
    the field.
    """


# --- model ---------------------------------------------------------------------------------

@hookspec(firstresult=True)
def vlmask_load_init(path: Path, encoder: torch.nn.Module, predictor: torch.nn.Module | None) -> Any | None:
    """Start ``encoder`` (and ``predictor``) from the pretrained weights at ``path`` (recipe key
    ``model.init``), in place and strictly, and return a report of every key (its ``str`` is
    printed; it should have an ``ok`` attribute).

    Called by ``vlmask.build.build_components`` once the encoder and predictor are built and
    before the teacher and the targets and heads are (an EMA teacher then starts from the
    imported weights too); a run that resumes loads its checkpoint over them afterwards, and
    ``vlmask.runs.open_run`` does not call it. ``predictor`` is None when the recipe has none
    (then only the encoder is started). An implementation that does not recognise ``path``
    returns None; one that recognises it but finds that it does not fit raises ``ValueError``
    with one line naming the first mismatched key (nothing loaded). ``firstresult``: the first
    answer is used; None from every plugin is an error naming the key. The built-in plugin
    reads Hugging Face ``VideoMAEForPreTraining``/``VideoMAEModel`` folders and original
    VideoMAE checkpoints (``vlmask_plugins.encoders.videomae_init``).
    """


# --- pictures ------------------------------------------------------------------------------

@hookspec
def vlmask_picture_kinds() -> dict[str, Any]:
    """Picture kinds this plugin adds to ``vlmask show WHAT RUN_DIR ... --out FILE``.

    Returns ``{WHAT: picture}``. A picture is a callable taking a ``vlmask.show.ShownClips``
    (one run reopened read-only with ``vlmask.runs.open_run``, the shown clips as a ``Batch``
    on its device, their frames as uint8 images, their texts, ``--layer``, and
    ``training_mask()``: the run's masker seeded as at training step 1) and returning, per
    clip, a list of ``vlmask.pictures.Panel`` (rows of images with boxes, token outlines and
    heat-map values); the command lays the runs side by side and writes PNG, GIF or MP4. The
    first line of its docstring is its help text. For a run it cannot draw it raises
    ``vlmask.show.ShowError`` with one line naming the run and what it lacks (nothing is
    written). Called by ``vlmask.show.picture_kinds`` once per ``vlmask show``, in the process
    that draws. Every implementation is called; a ``WHAT`` given by two plugins, or by a plugin
    and vlmask (``curves``, ``similarity``), is an error naming both. The built-in plugin adds
    ``masks``, ``reconstruction`` and ``attention``.
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
    "vlmask_add_commands",
    "vlmask_default_manifests",
    "vlmask_plan_requirement",
    "vlmask_fill_requirement",
    "vlmask_load_init",
    "vlmask_picture_kinds",
    "vlmask_train_start",
    "vlmask_after_optimizer_step",
    "vlmask_step_end",
    "vlmask_checkpoint_saved",
    "vlmask_train_end",
)
