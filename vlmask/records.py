"""The typed records of a comparison (``vlmask compare``): one frozen :class:`ComparedRun` per
run that trained and was evaluated, one :class:`FailedRun` per run that failed.

Plain data at a low layer, so that :mod:`vlmask.compare` (which makes them) and
:mod:`vlmask.report` (which draws them) both import them downward and neither imports the
other's insides. ``as_json`` gives each record's entry of ``comparison.json`` with the keys, in
the order, that comparison.json has always had (docs/contract.md, "comparison.json").

A run's metrics (:attr:`ComparedRun.metrics`) are its eval.json numbers as ``section.metric``
(:func:`eval_metrics`) followed by its fine-tuning numbers as ``finetune_<metric>``
(:func:`finetune_metrics`), so the statistics, the table and the plot treat both alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FINETUNE_METRICS", "ComparedRun", "FailedRun", "RecipeGroup", "TrainingLoss", "eval_metrics",
           "finetune_metrics", "group_runs"]

#: finetune.json keys that a comparison tabulates, each as ``finetune_<key>``.
FINETUNE_METRICS = ("top1", "verb_top1", "noun_top1")


def eval_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval.json as ``section.metric`` (plus ``chance_top1``), in file order.

    >>> eval_metrics({"chance_top1": 0.25, "knn": {"top1": 0.5}, "settings": {"device": "cpu"}})
    {'chance_top1': 0.25, 'knn.top1': 0.5}
    """
    metrics: dict[str, float] = {}
    for section, value in evaluation.items():
        if section in ("data", "evaluators", "settings"):
            continue
        if isinstance(value, dict):
            for metric, number in value.items():
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    metrics[f"{section}.{metric}"] = float(number)
        elif section == "chance_top1" and isinstance(value, (int, float)):
            metrics[section] = float(value)
    return metrics


def finetune_metrics(finetune: dict[str, Any] | None) -> dict[str, float]:
    """The top-1 numbers of a finetune.json as ``finetune_top1``, ``finetune_verb_top1``, ...

    >>> finetune_metrics({"top1": 0.5, "chance_top1": 0.25, "steps": 2})
    {'finetune_top1': 0.5}
    """
    if not finetune:
        return {}
    return {f"finetune_{key}": float(finetune[key]) for key in FINETUNE_METRICS
            if isinstance(finetune.get(key), (int, float)) and not isinstance(finetune.get(key), bool)}


@dataclass(frozen=True)
class TrainingLoss:
    """The training loss at the first logged step (``metrics.jsonl``) and at the last step
    (``summary.json``'s ``final_loss``): whether the objective fell. Losses of different recipes
    are on different scales; only a recipe's own two numbers compare."""

    first_step: int | None = None
    first: float | None = None
    final: float | None = None
    final_step: int | None = None

    def as_json(self) -> dict[str, float | int | None]:
        return {"first_step": self.first_step, "first": self.first, "final": self.final, "final_step": self.final_step}


@dataclass(frozen=True)
class ComparedRun:
    """One recipe at one seed, trained, evaluated and (``vlmask compare --finetune``) fine-tuned.

    ``summary``, ``evaluation`` and ``finetune`` are the run's summary.json, eval.json and
    finetune.json as read (None: not fine-tuned), kept whole because comparison.json carries them.
    """

    recipe: str
    name: str
    seed: int
    run_dir: str
    summary: dict[str, Any]
    evaluation: dict[str, Any]
    loss: TrainingLoss = TrainingLoss()
    finetune: dict[str, Any] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """eval.json's numbers (:func:`eval_metrics`), then finetune.json's (:func:`finetune_metrics`)."""
        return {**eval_metrics(self.evaluation), **finetune_metrics(self.finetune)}

    @property
    def features(self) -> str:
        """Which features eval.json probed (``evaluation.features``): ``encoder`` or ``context``;
        an eval.json written before the setting existed probed the encoder."""
        return str(self.evaluation.get("features") or "encoder")

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def as_json(self) -> dict[str, Any]:
        """The run's entry of comparison.json's ``runs``; ``finetune`` only when it was fine-tuned."""
        entry = {"recipe": self.recipe, "name": self.name, "seed": self.seed, "run_dir": self.run_dir,
                 "summary": self.summary, "eval": self.evaluation, "loss": self.loss.as_json()}
        if self.finetune is not None:
            entry["finetune"] = self.finetune
        return entry


@dataclass(frozen=True)
class FailedRun:
    """A run that failed to train, evaluate or fine-tune: ``error`` is the first line of why."""

    recipe: str
    name: str
    seed: int
    run_dir: str
    error: str

    def as_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "name": self.name, "seed": self.seed, "run_dir": self.run_dir, "error": self.error}


@dataclass(frozen=True)
class RecipeGroup:
    """The runs of one recipe (one per seed), in the order they were given."""

    recipe: str
    name: str
    runs: tuple[ComparedRun, ...]


def group_runs(runs: list[ComparedRun]) -> list[RecipeGroup]:
    """Runs grouped by recipe, recipes in first-seen order."""
    groups: dict[str, list[ComparedRun]] = {}
    for run in runs:
        groups.setdefault(run.recipe, []).append(run)
    return [RecipeGroup(recipe, members[0].name, tuple(members)) for recipe, members in groups.items()]
