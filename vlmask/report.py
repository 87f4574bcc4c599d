"""The report of a comparison: ``comparison.md`` (:func:`comparison_table`: the table, the
evaluators line, the paired differences, the failed runs) and ``comparison.png``
(:func:`comparison_plot`).

It draws the typed records that :mod:`vlmask.compare` makes (vlmask.records) and the statistics
it computed (vlmask.statistics rows); it trains, evaluates and reads no run itself, apart from
each run's ``metrics.jsonl`` for the curves.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmask.records import ComparedRun, FailedRun, group_runs
from vlmask.statistics import PairedDifference, SeedStats, describe_difference

__all__ = ["DIAGNOSTICS", "comparison_plot", "comparison_table", "evaluators_line", "features_line"]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def _cell(values: list[float], digits: int) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _interval_cell(row: SeedStats | None, digits: int) -> str:
    if row is None:
        return "-"
    text = f"{row.mean:.{digits}f}"
    if row.std is not None:
        text += f" ± {row.std:.{digits}f} [{row.ci95[0]:.{digits}f}, {row.ci95[1]:.{digits}f}]"
    return text


def comparison_table(entries: list[ComparedRun], stats: Sequence[SeedStats], overrides: Sequence[str] = (),
                     paired: Sequence[PairedDifference] | None = None, failed: Sequence[FailedRun] = ()) -> str:
    """Markdown: one row per recipe; each metric as mean ± sample std [95% interval] over seeds
    (just the mean for one seed; "-" where a run lacks it), then training wall time, clips/s,
    training FLOPs and the training loss at the first logged and the last step; then, with ``paired`` (vlmask.statistics.PairedDifference rows), one
    sentence per recipe and metric saying whether it differs from the baseline beyond seed
    noise; then the failed runs. ``stats``: vlmask.compare.comparison_stats of ``entries``."""
    by_key = {(row.recipe, row.metric): row for row in stats}
    metrics: list[str] = []
    for entry in entries:
        for name in entry.metrics:
            if name not in metrics:
                metrics.append(name)
    header = ["recipe", "seeds", *metrics, "wall s", "clips/s", "train PFLOP", "loss first → final"]
    evaluators = " ".join(line for line in (features_line(entries), evaluators_line(entries)) if line)
    lines = [
        "# vlmask compare",
        "",
        f"overrides: `{' '.join(overrides)}`" if overrides else "overrides: none",
        "",
        *([evaluators, ""] if evaluators else []),
        "Metrics are mean ± sample standard deviation [95% confidence interval of the mean, Student t] "
        "over seeds; with one seed, the value alone (no interval can be computed from one seed).",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + " |",
    ]
    for group in group_runs(entries):
        row = [group.name, str(len(group.runs))]
        for metric in metrics:
            if metric == "chance_top1":
                values = [r.metrics.get(metric) for r in group.runs]
                row.append(_cell([v for v in values if v is not None], 3))
            else:
                row.append(_interval_cell(by_key.get((group.name, metric)), 3))
        row.append(_cell([float(r.summary.get("wall_s") or math.nan) for r in group.runs], 1))
        row.append(_cell([float(r.summary.get("clips_per_s") or math.nan) for r in group.runs], 1))
        row.append(_cell([float(r.summary.get("train_flops") or math.nan) / 1e15 for r in group.runs], 4))
        first = _cell([v for v in (r.loss.first for r in group.runs) if v is not None], 3)
        final = _cell([v for v in (r.loss.final for r in group.runs) if v is not None], 3)
        row.append("-" if first == "-" and final == "-" else f"{first} → {final}")
        lines.append("| " + " | ".join(row) + " |")
    if paired is not None:
        base = paired[0].baseline if paired else None
        lines += ["", f"## Paired differences to the baseline{f' ({base})' if base else ''}", "",
                  "Each recipe minus the baseline on the same seeds (same clips, crops and, for equal maskers, "
                  "masks), in points (1 point = 0.01 of a fraction). A difference is beyond seed noise when "
                  "its 95% interval excludes 0.", ""]
        if not paired:
            lines.append("No recipe shares a seed and a metric with the baseline.")
        significant = [r for r in paired if r.significant]
        lines += [f"- **{describe_difference(r)}**" for r in significant]
        lines += [f"- {describe_difference(r)}" for r in paired if not r.significant]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {f.name} seed {f.seed} (`{f.run_dir}`): {f.error}" for f in failed]
    lines += ["", "Runs:", ""]
    lines += [f"- {e.name} seed {e.seed}: `{e.run_dir}`" for e in entries]
    return "\n".join(lines) + "\n"


def _node_text(section: str, node: dict[str, Any]) -> str:
    arguments = [f"{k}={json.dumps(v, default=str)}" for k, v in node.items() if k != "name"]
    name = [] if node.get("name") == section else [str(node.get("name"))]
    return f"{section} ({', '.join(name + arguments)})" if name or arguments else section


def features_line(entries: Sequence[ComparedRun]) -> str | None:
    """Which features the evaluations probed (eval.json ``features``), said when some run probed
    the predictor's context rather than the encoder (None when every run probed the encoder)."""
    by_features: dict[str, list[str]] = {}
    for entry in entries:
        names = by_features.setdefault(entry.features, [])
        names += [] if entry.name in names else [entry.name]
    if set(by_features) <= {"encoder"}:
        return None
    return "features probed: " + "; ".join(f"`{features}` for {', '.join(names)}"
                                           for features, names in by_features.items()) + "."


def evaluators_line(entries: Sequence[ComparedRun]) -> str | None:
    """One line for comparison.md: each evaluation section with the arguments set by the recipe
    or the overrides (eval.json ``evaluators``; the others are the evaluator's defaults, all of
    them in eval.json ``settings``), the recipes after a variant when the runs differ."""
    variants: dict[str, dict[str, list[str]]] = {}
    for entry in entries:
        for section, node in (entry.evaluation.get("evaluators") or {}).items():
            if isinstance(node, dict):
                names = variants.setdefault(section, {}).setdefault(_node_text(section, node), [])
                names += [] if entry.name in names else [entry.name]
    if not variants:
        return None
    parts = []
    for by_text in variants.values():
        if len(by_text) == 1:
            parts.append(f"`{next(iter(by_text))}`")
        else:
            parts.append("; ".join(f"`{text}` for {', '.join(names)}" for text, names in by_text.items()))
    return ("evaluators: " + ", ".join(parts) + " (arguments not shown are the evaluator's defaults; "
            "every argument is in each run's eval.json `settings`)")


#: metrics.jsonl keys drawn by ``compare`` when a run logs them (vlmask.diagnostics names).
DIAGNOSTICS = ("rankme", "student_std", "teacher_std", "student_teacher_cos")


def _curves(run_dir: Path, keys: Sequence[str] = ("loss",)) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) per key of ``metrics.jsonl`` (rows lacking a key are skipped for it)."""
    curves: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in keys}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                curves[key][0].append(step)
                curves[key][1].append(float(value))
    return curves


def _flops_per_step(summary: dict[str, Any]) -> float | None:
    flops, steps = summary.get("train_flops"), summary.get("steps")
    if isinstance(flops, (int, float)) and flops > 0 and isinstance(steps, int) and steps > 0:
        return float(flops) / steps
    return None


def comparison_plot(entries: Sequence[ComparedRun], path: Path) -> Path:
    """Training loss against steps and against training FLOPs (``summary.train_flops`` spread
    evenly over the steps), metric bars with ± std error bars, and, when ``metrics.jsonl`` has
    them, the diagnostics curves (:data:`DIAGNOSTICS`) against steps; Agg backend (matplotlib is
    imported here: it is slow to import and only this function draws)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_runs(list(entries))
    metrics: list[str] = []
    for entry in entries:
        for name in entry.metrics:
            if name not in metrics and name != "chance_top1":
                metrics.append(name)
    curves_of = {run.run_dir: _curves(run.path, ("loss", *DIAGNOSTICS)) for run in entries}
    diagnostics = [k for k in DIAGNOSTICS if any(c[k][0] for c in curves_of.values())]
    rows = 2 if diagnostics else 1
    figure = Figure(figsize=(17, 4.8 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, max(3, len(diagnostics)))
    top = grid[0, :].subgridspec(1, 3, width_ratios=[1, 1, 1.4])
    curves, by_flops, bars = (figure.add_subplot(top[0, i]) for i in range(3))
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for colour, group in zip(colours, groups):
        for i, run in enumerate(group.runs):
            steps, losses = curves_of[run.run_dir]["loss"]
            label = group.name if i == 0 else None
            if steps:
                curves.plot(steps, losses, color=colour, alpha=0.9 if i == 0 else 0.5, label=label)
                per_step = _flops_per_step(run.summary)
                if per_step is not None:
                    by_flops.plot([s * per_step for s in steps], losses, color=colour, alpha=0.9 if i == 0 else 0.5, label=label)
    curves.set(xlabel="step", ylabel="training loss", title="loss")
    by_flops.set(xlabel="training FLOPs", ylabel="training loss", title="loss against training compute")
    for axis in (curves, by_flops):
        axis.grid(alpha=0.3)
        if groups and axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    for d, key in enumerate(diagnostics):
        axis = figure.add_subplot(grid[1, d])
        for colour, group in zip(colours, groups):
            for i, run in enumerate(group.runs):
                steps, values = curves_of[run.run_dir][key]
                if steps:
                    axis.plot(steps, values, color=colour, alpha=0.9 if i == 0 else 0.5, label=group.name if i == 0 else None)
        axis.set(xlabel="step", ylabel=key, title=f"diagnostics: {key}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    if metrics:
        width = 0.8 / max(1, len(groups))
        positions = np.arange(len(metrics))
        for g, (colour, group) in enumerate(zip(colours, groups)):
            stats = [_mean_std([r.metrics.get(m, math.nan) for r in group.runs]) for m in metrics]
            shown = [i for i, (mean, _) in enumerate(stats) if not math.isnan(mean)]  # a missing metric: no bar
            bars.bar(positions[shown] + (g - (len(groups) - 1) / 2) * width, [stats[i][0] for i in shown], width,
                     yerr=[stats[i][1] or 0.0 for i in shown], capsize=3, color=colour, label=group.name)
        chance = [e.metrics.get("chance_top1") for e in entries]
        chance = [c for c in chance if c is not None]
        if chance:
            bars.axhline(statistics.fmean(chance), color="grey", linestyle="--", linewidth=1, label="chance top1")
        bars.set_xticks(positions, metrics, rotation=30, ha="right", fontsize="small")
        bars.set(ylabel="value (mean ± std over seeds)", title="evaluation", ylim=(0, 1.05))
        bars.legend(fontsize="small")
    else:
        bars.text(0.5, 0.5, "no evaluation metrics", ha="center", va="center", transform=bars.transAxes)
        bars.set_axis_off()
    figure.savefig(path, dpi=110)
    return path
