"""``vlmask compare``: train several recipes (and seeds) with the same overrides, evaluate each
(and with ``finetune=True`` fine-tune each), and write ``comparison.json``, ``comparison.md``
and ``comparison.png`` (docs/contract.md, "comparison.json").

* planning (:func:`plan_compare`): every recipe validated, its data checked and its first steps
  rehearsed before anything trains;
* training and reuse (:func:`compare`): a finished run is not retrained, an eval.json or
  finetune.json is reused only when made of the latest checkpoint with the settings asked;
* statistics (:func:`comparison_stats`, :func:`paired_to_baseline`) over the typed records of
  vlmask.records (:class:`ComparedRun`, :class:`FailedRun`);
* the table and the plot are vlmask.report's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape

from vlmask.checkpoint import latest_checkpoint
from vlmask.config import Recipe, RecipeError, load_recipe
from vlmask.data_requirements import check_data
from vlmask.engine import is_finished, train_recipe
from vlmask.evaluate import eval_mismatch, evaluate_run, evaluation_record, read_eval, val_manifest_of
from vlmask.finetune import finetune_record, finetune_run
from vlmask.flops import record_train_flops, train_flops
from vlmask.io import relative_path, write_json
from vlmask.paths import cache_dir
from vlmask.plugins import Plugins, default_plugins
from vlmask.records import ComparedRun, FailedRun, TrainingLoss, eval_metrics, group_runs
from vlmask.rehearsal import rehearse
from vlmask.report import comparison_plot, comparison_table
from vlmask.rundir import RunDirBusy, RunDirMismatch, busy_holder, check_same_recipe
from vlmask.runs import run_recipe
from vlmask.schema import evaluation_settings, finetune_settings, top_settings, validate
from vlmask.schema import settings as section_settings
from vlmask.statistics import PairedDifference, SeedStats, paired_difference, seed_stats

__all__ = [
    "ComparedRun",
    "FailedRun",
    "PlannedRun",
    "compare",
    "comparison_stats",
    "eval_metrics",
    "paired_to_baseline",
    "plan_compare",
    "refuse_busy_runs",
    "trained_clips",
    "training_loss",
]

console = Console(stderr=True, soft_wrap=True)


# --------------------------------------------------------------------------- planning


def _run_name(recipe: str, taken: set[str], seed: int) -> str:
    stem = Path(recipe).stem
    name, n = f"{stem}-seed{seed}", 2
    while name in taken:
        name, n = f"{stem}-{n}-seed{seed}", n + 1
    taken.add(name)
    return name


def _without_run_dir(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("run.dir=")]


def _other_recipe(run_dir: Path, recipe_path: str, run_overrides: list[str]) -> str | None:
    """Why the run already in ``run_dir`` cannot be this compare's run, or None: the training
    settings differ (vlmask.rundir.check_same_recipe, as ``vlmask run`` checks a re-run: keys
    that do not change training, ``evaluation.*`` and ``finetune.*`` among them, may differ), or
    the run is finished and a larger ``train.max_steps`` would continue it (a compare does not
    continue finished runs)."""
    recipe = load_recipe(recipe_path, run_overrides)
    try:
        check = check_same_recipe(run_dir, OmegaConf.to_container(recipe.config, resolve=True), recipe.overrides,
                                  recipe=str(recipe.path))
    except RunDirMismatch as exc:
        return str(exc)
    if check.status == "refused":
        keys = "; ".join(str(d) for d in check.differences[:10])
        more = f"; ... {len(check.differences) - 10} more" if len(check.differences) > 10 else ""
        return f"{run_dir} was trained with other settings: {keys}{more}; compare into another folder, or remove it"
    if check.status == "extend" and check.finished:
        before, after = check.steps or (0, 0)
        return (f"{run_dir} finished at train.max_steps={before}, the compare asks {after}; a compare does not "
                f"continue a finished run: compare into another folder, or continue it with vlmask run")
    return None


@dataclass(frozen=True)
class PlannedRun:
    """One (recipe, seed) of a comparison: its run directory and the overrides it trains with."""

    recipe: str
    seed: int
    run_dir: Path
    overrides: list[str]


def plan_compare(recipes: Sequence[str], overrides: Sequence[str], seeds: Sequence[int] | None, out: Path,
                 plugins: Plugins | None = None, finetune: bool = False) -> list[PlannedRun]:
    """Every (recipe, seed) run of a comparison, each recipe validated first with the overrides
    (``vlmask.schema.validate``, the ``data.train`` / ``data.val`` manifests exist, the data
    carries what the recipe needs or a plugin fills it (``vlmask.data_requirements.check_data``),
    a run already in ``out`` was trained with these settings (:func:`_other_recipe`), the run
    builds and takes the first step of every stage, :func:`vlmask.rehearsal.rehearse`; with
    ``finetune`` also the ``finetune`` section with its overrides, vlmask.schema.finetune_settings).
    Raises one RecipeError listing every problem of every recipe, so that nothing trains when any
    recipe would fail at start."""
    plugins = plugins if plugins is not None else default_plugins()
    registry = plugins.registry
    planned: list[PlannedRun] = []
    problems: list[str] = []
    taken: set[str] = set()
    for recipe_path in recipes:
        try:
            recipe = load_recipe(recipe_path, list(overrides))
        except RecipeError as exc:
            problems += exc.problems
            continue
        found = validate(recipe, registry)
        if finetune and not found:  # validate checks a finetune section that is there; --finetune needs one anyway
            try:
                finetune_settings(recipe)
            except RecipeError as exc:
                found += exc.problems
        data = section_settings(recipe, "data")
        for key, manifest in (("data.train", data.train), ("data.val", data.val)):
            if manifest and not Path(str(manifest)).is_file():
                found.append(f"{recipe.where(key)}: key {key}: manifest {manifest} does not exist")
        if not found:  # the data must carry what the recipe needs, or a plugin must fill it (action boxes)
            data_errors, _ = check_data(recipe, registry, plugins.manager.hook, cache_dir())
            found += [f"{recipe_path}: {error}" for error in data_errors]
        if not found:  # build it and take each stage's first step on meta (vlmask.rehearsal)
            found += rehearse(recipe, plugins)
        problems += found
        run_seeds = list(seeds) if seeds is not None else [top_settings(recipe).seed]
        for seed in run_seeds:
            run_dir = out / _run_name(recipe_path, taken, seed)
            run_overrides = [*overrides, f"seed={seed}", f"run.dir={run_dir}"]
            problem = _other_recipe(run_dir, recipe_path, run_overrides) if not found else None
            if problem:
                problems.append(problem)
            planned.append(PlannedRun(str(recipe_path), seed, run_dir, run_overrides))
    if problems:
        raise RecipeError(problems)
    refuse_busy_runs([run.run_dir for run in planned])
    return planned


def refuse_busy_runs(run_dirs: Sequence[Path]) -> None:
    """Raise ``RunDirBusy`` naming every run directory of the comparison that a live process
    trains in now (``vlmask run``, another compare), before anything trains: the compare would
    otherwise record it as a failed run and go on (vlmask.rundir.busy_holder takes no lock)."""
    busy = [f"{run_dir} is in use by {holder}" for run_dir in run_dirs if (holder := busy_holder(run_dir))]
    if busy:
        raise RunDirBusy("; ".join(busy) + "; wait for it to finish, stop it, or compare into another --out")


# --------------------------------------------------------------------------- training, evaluating, fine-tuning


def compare(recipes: Sequence[str], overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
            out_dir: Path | str | None = None, progress: bool = True, baseline: str | None = None,
            finetune: bool = False) -> Path:
    """Train every recipe for every seed with the same overrides, evaluate each, and write
    ``comparison.json``, ``comparison.md`` and ``comparison.png`` into ``out_dir``; returns it.

    Every recipe is validated first (:func:`plan_compare`): with any problem nothing trains.
    Runs live in ``OUT_DIR/<recipe stem>-seed<S>/``. Running again with the same ``out_dir``
    reuses what is done: a run with ``summary.json`` is not retrained (an interrupted one
    resumes from its last checkpoint), and its ``eval.json`` is reused when it was made of the
    latest checkpoint with the evaluation settings this compare asks (the recipe's ``evaluation``
    section with the overrides, on the run's data, device and precision: eval.json's
    ``settings``); otherwise the run is evaluated again, one line saying which setting differs,
    and the old file is kept as ``eval-<hash>.json`` (vlmask.evaluate.evaluate_run). ``evaluation.*``
    overrides do not change training, so a finished run is reused with other ones (the long
    probe in one command: ``evaluation.evaluators.attentive_probe.epochs=100``).

    ``finetune``: after its evaluation every run is also fine-tuned (vlmask.finetune.finetune_run)
    with the same settings, the recipe's ``finetune`` section with the ``finetune.*`` overrides;
    its top-1 numbers join the statistics as ``finetune_top1``, ``finetune_verb_top1``,
    ``finetune_noun_top1``. A run's ``finetune.json`` is reused by the same rule as eval.json
    (its ``requested`` record: vlmask.finetune.finetune_record), else the run is fine-tuned again
    and the old file kept as ``finetune-<hash>.json``; ``finetune.*`` overrides do not change training.

    A run that fails (training, evaluation or fine-tuning) is reported in ``comparison.json``'s
    ``failed`` list and on stderr; the others still run and are tabulated (``vlmask compare`` then
    exits 1). A run directory another process trains in raises ``RunDirBusy`` (exit 2): before
    anything trains when it is busy at the start (:func:`refuse_busy_runs`), at once when it
    becomes so. ``seeds=None`` runs each recipe once with the seed it sets (after ``overrides``).
    ``out_dir=None``: a new folder ``runs/compare-<time>``. ``baseline`` (a recipe path or stem
    given in ``recipes``) adds the paired differences to it (``paired``; see vlmask.statistics).
    """
    if not recipes:
        raise ValueError("compare needs at least one recipe")
    overrides = list(overrides)
    if baseline is not None and baseline not in {str(r) for r in recipes} | {Path(r).stem for r in recipes}:
        raise ValueError(f"--baseline {baseline!r} is not one of the compared recipes "
                         f"({', '.join(Path(r).stem for r in recipes)})")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    planned = plan_compare(recipes, overrides, seeds, out, finetune=finetune)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[ComparedRun] = []
    failed: list[FailedRun] = []
    for run in planned:
        try:
            runs.append(_compared_run(run, progress, finetune))
        except (KeyboardInterrupt, SystemExit, RunDirBusy):  # a writer that started meanwhile: stop, as vlmask run does
            raise
        except Exception as exc:  # one failed recipe must not lose the others
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            console.print(f"[red]{escape(str(run.recipe))} seed {run.seed} failed:[/] {escape(reason)}", highlight=False)
            failed.append(FailedRun(run.recipe, Path(run.recipe).stem, run.seed, str(run.run_dir), reason))
    stats = comparison_stats(runs)
    result: dict[str, Any] = {"overrides": overrides, "seeds": list(seeds) if seeds is not None else None,
                              "runs": [r.as_json() for r in runs], "stats": [row.as_json() for row in stats]}
    paired = None
    if baseline is not None:
        paired = paired_to_baseline(runs, baseline)
        result["baseline"] = baseline
        result["paired"] = [row.as_json() for row in paired]
    if failed:
        result["failed"] = [f.as_json() for f in failed]
    write_json(out / "comparison.json", result)
    (out / "comparison.md").write_text(comparison_table(runs, stats, overrides, paired=paired, failed=failed))
    comparison_plot(runs, out / "comparison.png")
    console.print(f"comparison written to {out}", highlight=False, markup=False)
    return out


def _compared_run(run: PlannedRun, progress: bool, finetune: bool) -> ComparedRun:
    """Train (or reuse) one planned run, evaluate it (or reuse its eval.json) and, with
    ``finetune``, fine-tune it (or reuse its finetune.json)."""
    recipe_path, seed, run_dir = run.recipe, run.seed, run.run_dir
    if is_finished(run_dir):
        console.print(f"{recipe_path} seed {seed}: finished run {run_dir} reused", highlight=False, markup=False)
    else:
        console.print(f"{recipe_path} seed {seed}: training into {run_dir}", highlight=False, markup=False)
        trained, train_step = train_recipe(load_recipe(recipe_path, run.overrides))
        record_train_flops(run_dir, train_step, trained)
    asked = load_recipe(recipe_path, run.overrides)  # its evaluation and finetune sections: what this compare asks
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    evaluation = _reusable_eval(run_dir, checkpoint, asked)
    if evaluation is None:
        evaluation = evaluate_run(run_dir, progress=progress, evaluation=asked)
    finetuned = None
    if finetune:
        finetuned = _reusable_finetune(run_dir, checkpoint, asked)
        if finetuned is None:
            finetuned = finetune_run(run_dir, progress=progress, finetune=asked)
    summary = json.loads((run_dir / "summary.json").read_text())
    if "train_flops" not in summary:
        summary["train_flops"] = _train_flops_of(recipe_path, run.overrides, summary)
    return ComparedRun(str(recipe_path), Path(recipe_path).stem, seed, str(run_dir), summary, evaluation,
                       training_loss(run_dir, summary), finetuned)


def _train_flops_of(recipe_path: str, run_overrides: list[str], summary: dict[str, Any]) -> float | None:
    """``train_flops`` for a summary.json that lacks it (runs of an engine that does not write
    it): counted at the run's own scale by vlmask.flops; None when it cannot be counted."""
    try:
        recipe = load_recipe(recipe_path, run_overrides)
        return train_flops(recipe_path, _without_run_dir(run_overrides), trained_clips(recipe, summary))
    except Exception as exc:  # FLOPs are an annotation: a counter failure must not fail the run
        console.print(f"[yellow]{escape(str(recipe_path))}: training FLOPs not counted: {escape(str(exc))}[/]", highlight=False)
        return None


def trained_clips(recipe: Recipe, summary: dict[str, Any]) -> int:
    """Clips trained: steps x batch size x world size x accumulation (from the run's summary)."""
    steps = int(summary.get("steps") or 0)
    train = section_settings(recipe, "train")  # its defaults, not a second set (a batch size of 1 undercounted 8x)
    return steps * train.batch_size * int(summary.get("world_size") or 1) * train.accumulate


def training_loss(run_dir: Path, summary: dict[str, Any]) -> TrainingLoss:
    """The run's training loss at its first logged step and at its last step (``summary.json``'s
    ``final_loss``): whether the objective fell (vlmask.records.TrainingLoss)."""
    first_step = first = None
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
                    first_step, first = row.get("step"), float(row["loss"])
                    break
    except OSError:
        pass
    final = summary.get("final_loss")
    return TrainingLoss(first_step, first, float(final) if isinstance(final, (int, float)) else None, summary.get("steps"))


# --------------------------------------------------------------------------- reuse


def _reusable(run_dir: Path, name: str, checkpoint: Path | None, record: dict[str, Any], key: str,
              what: str, again: str) -> dict[str, Any] | None:
    """``RUN_DIR/<name>`` when it was made of ``checkpoint`` with ``record`` (under its ``key``),
    else None, saying in one line why it is not reused."""
    previous = read_eval(run_dir, name)
    if previous is None or checkpoint is None:
        return None
    mismatch = eval_mismatch(previous, relative_path(checkpoint, run_dir), record, key, what)
    if mismatch is None:
        console.print(f"{run_dir / name} reused: made of {previous['checkpoint']} with the {what} settings "
                      f"this compare asks", highlight=False, markup=False)
        return previous
    console.print(f"{run_dir / name} {mismatch.describe('the compare asks')}: {again}", highlight=False, markup=False)
    return None


def _reusable_eval(run_dir: Path, checkpoint: Path | None, asked: Recipe) -> dict[str, Any] | None:
    """``RUN_DIR/eval.json`` when it was made of ``checkpoint`` with the evaluation settings the
    compare asks (``asked``'s evaluation section on the run's data, device and precision:
    vlmask.evaluate.evaluation_record), else None."""
    if read_eval(run_dir) is None or checkpoint is None:
        return None
    plugins = default_plugins()
    recipe, device, precision, train = run_recipe(run_dir, (), plugins)
    record = evaluation_record(recipe, plugins, evaluation_settings(asked, plugins.registry), device, precision,
                               train, val_manifest_of(recipe, plugins))
    return _reusable(run_dir, "eval.json", checkpoint, record, "settings", "evaluation", "evaluating again")


def _reusable_finetune(run_dir: Path, checkpoint: Path | None, asked: Recipe) -> dict[str, Any] | None:
    """``RUN_DIR/finetune.json`` when it was made of ``checkpoint`` with the finetuning settings
    the compare asks (``asked``'s finetune section on the run's data, device and precision:
    vlmask.finetune.finetune_record), else None."""
    if read_eval(run_dir, "finetune.json") is None or checkpoint is None:
        return None
    plugins = default_plugins()
    recipe, device, precision, train = run_recipe(run_dir, (), plugins)
    record = finetune_record(recipe, finetune_settings(asked), device, precision, train,
                             val_manifest_of(recipe, plugins))
    return _reusable(run_dir, "finetune.json", checkpoint, record, "requested", "finetuning", "finetuning again")


# --------------------------------------------------------------------------- statistics


def comparison_stats(runs: Sequence[ComparedRun]) -> list[SeedStats]:
    """vlmask.statistics.SeedStats per recipe (its stem) and metric, metrics in first-seen order."""
    rows = []
    for group in group_runs(list(runs)):
        metrics: list[str] = []
        for run in group.runs:
            metrics += [m for m in run.metrics if m not in metrics and m != "chance_top1"]
        for metric in metrics:
            row = seed_stats(group.name, metric, [r.metrics.get(metric) for r in group.runs])
            if row is not None:
                rows.append(row)
    return rows


def paired_to_baseline(runs: Sequence[ComparedRun], baseline: str) -> list[PairedDifference]:
    """vlmask.statistics.PairedDifference of every other recipe to ``baseline`` (path or stem)
    per metric both have, paired by seed."""
    groups = group_runs(list(runs))
    base = next((g for g in groups if baseline in (g.recipe, g.name)), None)
    if base is None:
        return []

    def by_metric(members: Sequence[ComparedRun]) -> dict[str, dict[int, float]]:
        values: dict[str, dict[int, float]] = {}
        for run in members:
            for metric, value in run.metrics.items():
                values.setdefault(metric, {})[int(run.seed)] = value
        return values

    base_values = by_metric(base.runs)
    rows = []
    for group in groups:
        if group is base:
            continue
        for metric, by_seed in by_metric(group.runs).items():
            if metric == "chance_top1" or metric not in base_values:
                continue
            row = paired_difference(group.name, base.name, metric, by_seed, base_values[metric])
            if row is not None:
                rows.append(row)
    return rows
