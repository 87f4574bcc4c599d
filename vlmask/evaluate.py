"""Evaluating trained runs: ``vlmask eval``, ``vlmask embed`` and ``vlmask compare``.

* :func:`evaluate_run` extracts frozen features of the run's latest checkpoint on the train and
  val manifests (cached in ``RUN_DIR/features/``), runs the recipe's evaluators (plugin kind
  ``evaluator``) and writes ``RUN_DIR/eval.json`` (contract: "eval.json").
* :func:`embed_manifest` writes one pooled feature per manifest line to a ``.npy`` file.
* :func:`compare` trains several recipes (and seeds) with the same overrides, evaluates each and
  writes ``comparison.json``, ``comparison.md`` and ``comparison.png`` (contract: "comparison.json").

Evaluators come from the recipe's optional ``evaluation`` section; every key is optional::

    evaluation:
      batch_size: 32          # clips per feature-extraction batch (default: train.batch_size)
      num_workers: 2          # default: data.num_workers
      evaluators:             # section of eval.json -> evaluator plugin node (merged over the defaults)
        knn: {name: knn, k: 10}
        linear_probe_temporal: null   # null drops a default section

The default sections are :data:`DEFAULT_EVALUATORS`. An evaluator is any object with
``evaluate(features: EvalFeatures) -> dict[str, float] | None`` (see
``vlmask_plugins.evaluation.features``); None means "cannot be computed for this run" and the
section is left out of ``eval.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from torch import Tensor

from vlmask.config import Recipe, RecipeError, load_recipe
from vlmask.data_loading import collate_of
from vlmask.paths import cache_dir
from vlmask.registry import Registry
from vlmask.schema import INJECTED, build, check_plugin_node, factory_parameters
from vlmask_plugins.evaluation.features import (
    POOLINGS,
    EvalFeatures,
    Evaluator,
    FeatureCache,
    SplitFeatures,
    extract_features,
    finite_rows,
)

__all__ = [
    "DEFAULT_EVALUATORS",
    "EvalFeatures",
    "Evaluator",
    "SplitFeatures",
    "compare",
    "embed_manifest",
    "evaluate_run",
]

#: eval.json section -> evaluator plugin node, used unless the recipe's ``evaluation.evaluators`` changes it.
DEFAULT_EVALUATORS: dict[str, dict[str, Any]] = {
    "linear_probe": {"name": "linear_probe"},
    "linear_probe_temporal": {"name": "linear_probe", "pooling": "temporal"},
    "knn": {"name": "knn"},
    "retrieval": {"name": "retrieval"},
    "zero_shot": {"name": "zero_shot"},
}

EVALUATION_KEYS = ("batch_size", "num_workers", "evaluators")

console = Console(stderr=True, soft_wrap=True)


# --------------------------------------------------------------------------- settings


@dataclass
class EvaluationSettings:
    batch_size: int
    num_workers: int
    evaluators: dict[str, dict[str, Any]]


def evaluation_settings(recipe: Recipe, registry: Registry) -> EvaluationSettings:
    """The recipe's ``evaluation`` section with defaults filled in; every problem is a RecipeError
    naming the file and key."""
    section = recipe.get("evaluation") or {}
    problems: list[str] = []
    if not isinstance(section, dict):
        raise RecipeError([f"{recipe.where('evaluation')}: key evaluation: expected a mapping, got {section!r}"])
    for key in section:
        if key not in EVALUATION_KEYS:
            problems.append(f"{recipe.where('evaluation.' + str(key))}: unknown key evaluation.{key}; "
                            f"known: {', '.join(EVALUATION_KEYS)}")
    batch_size = section.get("batch_size")
    batch_size = (recipe.get("train.batch_size") or 8) if batch_size is None else batch_size
    workers = section.get("num_workers")
    workers = recipe.get("data.num_workers", 2) if workers is None else workers
    for key, value in (("batch_size", batch_size), ("num_workers", workers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "batch_size" else 0):
            problems.append(f"{recipe.where('evaluation.' + key)}: key evaluation.{key}: {value!r} is not "
                            f"an integer >= {1 if key == 'batch_size' else 0}")
    evaluators = copy.deepcopy(DEFAULT_EVALUATORS)
    overrides = section.get("evaluators") or {}
    if not isinstance(overrides, dict):
        problems.append(f"{recipe.where('evaluation.evaluators')}: key evaluation.evaluators: expected a mapping "
                        f"of section -> evaluator node, got {overrides!r}")
        overrides = {}
    for name, node in overrides.items():
        key = f"evaluation.evaluators.{name}"
        if node is None:
            evaluators.pop(name, None)
            continue
        if not isinstance(node, dict):
            problems.append(f"{recipe.where(key)}: key {key}: expected an evaluator node {{name: ..., ...}} or null, got {node!r}")
            continue
        base = evaluators.get(name, {})
        evaluators[name] = dict(node) if "name" in node and node["name"] != base.get("name") else {**base, **node}
    for name, node in evaluators.items():
        problems += check_plugin_node(registry, f"evaluation.evaluators.{name}", "evaluator", node, recipe.where)
    if problems:
        raise RecipeError(problems)
    return EvaluationSettings(int(batch_size), int(workers), evaluators)


def build_evaluators(settings: EvaluationSettings, recipe: Recipe, registry: Registry,
                     sections: Sequence[str] | None = None) -> dict[str, Evaluator]:
    """Evaluator objects by eval.json section; ``sections`` picks some (unknown names are an error)."""
    if sections is not None:
        unknown = [s for s in sections if s not in settings.evaluators]
        if unknown:
            raise ValueError(f"unknown evaluation section(s) {', '.join(unknown)}; this run has: "
                             f"{', '.join(settings.evaluators) or 'none'}")
    built: dict[str, Evaluator] = {}
    for name, node in settings.evaluators.items():
        if sections is not None and name not in sections:
            continue
        key = f"evaluation.evaluators.{name}"
        entry = registry.get("evaluator", node["name"])
        kwargs = {k: v for k, v in node.items() if k != "name"}
        unknown_injected = [p for p in factory_parameters(entry.factory) if p in INJECTED and p not in kwargs]
        if unknown_injected:
            raise RecipeError([f"{recipe.where(key)}: key {key}: evaluators get no injected arguments "
                               f"({', '.join(unknown_injected)}); set them in the recipe"])
        try:
            evaluator = entry.factory(**kwargs)
        except (ValueError, TypeError) as exc:
            raise RecipeError([f"{recipe.where(key)}: key {key} (evaluator {node['name']!r}): {exc}"]) from exc
        if not callable(getattr(evaluator, "evaluate", None)):
            raise RecipeError([f"{recipe.where(key)}: evaluator {node['name']!r} ({entry.provider}) has no evaluate(features) method"])
        built[name] = evaluator
    return built


# --------------------------------------------------------------------------- features of a run


def val_manifest(trainer: Any) -> Path | None:
    """``data.val``, or the built-in synthetic set's val split when training used the built-in set."""
    recipe: Recipe = trainer.recipe
    val = recipe.get("data.val")
    if val:
        return Path(val)
    if recipe.get("data.train"):
        return None
    from vlmask_plugins.data import synthetic

    return Path(synthetic.ensure_builtin(cache_dir(), **(recipe.get("data.synthetic") or {}))[1])


def eval_dataset(trainer: Any, manifest: Path) -> Any:
    """The recipe's dataset plugin on ``manifest`` with evaluation transforms (train=False) and
    the training set's class list (so labels index the same classes)."""
    registry: Registry = trainer.plugins.registry
    recipe: Recipe = trainer.recipe
    entry = registry.get("dataset", recipe.get("data.dataset.name"))
    extra: dict[str, Any] = {"manifest": str(manifest), "train": False}
    classes = getattr(trainer.train_set, "classes", None)
    if classes is not None and "classes" in factory_parameters(entry.factory):
        extra["classes"] = list(classes)
    return build(registry, recipe, "data.dataset", "dataset", **extra)


def run_features(trainer: Any, dataset: Any, manifest: Path, settings: EvaluationSettings, progress: bool,
                 description: str) -> dict[str, Tensor]:
    """Pooled features (rows = the dataset's clips, NaN for clips that did not load) of the
    run's loaded checkpoint, from ``RUN_DIR/features/`` or extracted and stored there."""
    checkpoint: Path = trainer.resumed_from
    cache = FeatureCache(Path(trainer.run_dir) / "features")
    key = FeatureCache.key(checkpoint, manifest, {
        "dataset": trainer.recipe.get("data.dataset"),
        "precision": trainer.precision,
        "device": trainer.device.type,
        "clips": len(dataset),
    })
    found = {p: cache.load(key, p) for p in POOLINGS}
    if all(v is not None and v.shape[0] == len(dataset) for v in found.values()):
        return {p: v for p, v in found.items() if v is not None}
    extracted = extract_features(
        trainer.student.encoder, dataset, collate_of(dataset),
        batch_size=settings.batch_size, num_workers=settings.num_workers, device=trainer.device,
        autocast=trainer.autocast, progress=progress, description=description,
    )
    for pooling, value in extracted.items():
        cache.save(key, pooling, value)
    return extracted


def split_features(dataset: Any, pooled: dict[str, Tensor]) -> tuple[SplitFeatures, int]:
    """The clips that loaded, with their annotations; returns the split and how many rows were dropped."""
    n = len(dataset)
    keep = finite_rows(pooled)
    rows = keep.nonzero().flatten().tolist()
    label_ids = list(getattr(dataset, "label_ids", [-1] * n))
    names = list(getattr(dataset, "labels", [None] * n))
    captions = [c or "" for c in getattr(dataset, "captions", [""] * n)]
    verbs = list(getattr(dataset, "verbs", [None] * n))
    nouns = list(getattr(dataset, "nouns", [None] * n))
    split = SplitFeatures(
        pooled={p: v[keep] for p, v in pooled.items()},
        labels=torch.tensor([label_ids[i] for i in rows], dtype=torch.long),
        labelled=torch.tensor([names[i] is not None for i in rows], dtype=torch.bool),
        captions=[captions[i] for i in rows],
        verbs=[verbs[i] for i in rows],
        nouns=[nouns[i] for i in rows],
    )
    return split, n - len(rows)


def class_parts(dataset: Any, classes: list[str]) -> tuple[list[str | None], list[str | None]]:
    """The verb and noun of each class, read from the dataset rows that carry both."""
    verbs: list[str | None] = [None] * len(classes)
    nouns: list[str | None] = [None] * len(classes)
    index = {c: i for i, c in enumerate(classes)}
    for label, verb, noun in zip(getattr(dataset, "labels", []), getattr(dataset, "verbs", []), getattr(dataset, "nouns", [])):
        c = index.get(label) if label is not None else None
        if c is not None and verb is not None and noun is not None and verbs[c] is None:
            verbs[c], nouns[c] = verb, noun
    return verbs, nouns


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (as recorded in a run's JSON files)."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return os.path.relpath(path, root)


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(temporary, path)


# --------------------------------------------------------------------------- vlmask eval


def evaluate_run(run_dir: Path | str, overrides: Sequence[str] = (), evaluators: list[str] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate the latest checkpoint of ``run_dir`` and write ``RUN_DIR/eval.json``; returns it.

    ``overrides`` are KEY=VALUE applied to the run's ``config.yaml`` (e.g. ``data.val=...``,
    ``device=cpu``, ``evaluation.evaluators.knn.k=10``); ``evaluators`` limits the run to these
    sections (default: every configured one), keeping the other sections of an ``eval.json`` of
    the same checkpoint. Sections that cannot be computed are absent.
    """
    from vlmask.runs import load_run

    run_dir = Path(run_dir)
    trainer = load_run(run_dir, list(overrides))
    try:
        recipe: Recipe = trainer.recipe
        registry: Registry = trainer.plugins.registry
        settings = evaluation_settings(recipe, registry)
        built = build_evaluators(settings, recipe, registry, evaluators)
        checkpoint = Path(trainer.resumed_from)
        classes = list(getattr(trainer.train_set, "classes", []) or [])
        result: dict[str, Any] = {"checkpoint": relative_path(checkpoint, run_dir), "num_classes": len(classes)}
        if classes:
            result["chance_top1"] = 1.0 / len(classes)
        val_path = val_manifest(trainer)
        data: dict[str, Any] = {"train": str(trainer.train_manifest), "val": str(val_path) if val_path else None}
        if val_path is None:
            console.print(f"{run_dir}: no validation manifest (set data.val=...): no evaluation section can be computed", style="yellow", markup=False)
        elif built:
            train_set = eval_dataset(trainer, trainer.train_manifest)
            val_set = eval_dataset(trainer, val_path)
            train_split, train_dropped = split_features(
                train_set, run_features(trainer, train_set, trainer.train_manifest, settings, progress, "features: train"))
            val_split, val_dropped = split_features(
                val_set, run_features(trainer, val_set, val_path, settings, progress, "features: val"))
            verbs, nouns = class_parts(train_set, classes)
            features = EvalFeatures(
                train=train_split, val=val_split, classes=classes, class_verbs=verbs, class_nouns=nouns,
                project=_projector(trainer), encode_text=_text_encoder(trainer),
            )
            for name, evaluator in built.items():
                section = evaluator.evaluate(features)
                if section is not None:
                    result[name] = {k: float(v) for k, v in section.items()}
            data.update({
                "train_clips": len(train_split), "val_clips": len(val_split),
                "skipped_lines": {"train": len(getattr(train_set, "skipped", [])), "val": len(getattr(val_set, "skipped", []))},
                "unloadable_clips": {"train": train_dropped, "val": val_dropped},
            })
        used = {name: settings.evaluators[name] for name in built if name in result}
        if evaluators is not None:  # a partial evaluation keeps the other sections of this checkpoint's eval.json
            previous = _reusable_eval(run_dir, checkpoint) or {}
            for name, section in previous.items():
                if name not in result and name not in built and name not in ("data", "evaluators"):
                    result[name] = section
                    if name in (previous.get("evaluators") or {}):
                        used[name] = previous["evaluators"][name]
        result["data"] = data
        result["evaluators"] = used
        write_json(run_dir / "eval.json", result)
        return result
    finally:
        trainer.close()


def _projector(trainer: Any) -> Callable[[Tensor], Tensor] | None:
    projection = getattr(trainer.student, "projection", None)
    if projection is None:
        return None
    device = next(projection.parameters()).device

    def project(features: Tensor) -> Tensor:
        with torch.no_grad():
            return projection(features.to(device, torch.float32)).float().cpu()

    return project


def _text_encoder(trainer: Any) -> Callable[[list[str]], Tensor] | None:
    encoder = getattr(trainer, "text_encoder", None)
    if encoder is None:
        return None
    from vlmask_plugins.text.cache import CaptionEmbeddingCache

    cache = CaptionEmbeddingCache(cache_dir() / "text")
    return lambda texts: cache.embed(encoder, list(texts), progress=False)


# --------------------------------------------------------------------------- vlmask embed


def embed_manifest(run_dir: Path | str, manifest: Path | str, out: Path | str, overrides: Sequence[str] = (),
                   pooling: str = "mean", progress: bool = True) -> Path:
    """Write one pooled encoder feature per manifest line (float32 ``.npy``, rows in line order).

    Row ``i`` is line ``i + 1`` of the manifest (trailing blank lines excluded). Lines that were
    skipped (bad JSON, missing ``video``, a file that does not exist or decode) and blank lines
    are rows of NaN; they are listed on stderr and in ``OUT.json`` beside the array, with the
    run, checkpoint and pooling. Features come from (and go to) the run's feature cache.
    Returns the ``.npy`` path (``.npy`` is appended when ``out`` lacks it; an existing folder
    ``out`` gets ``out/embeddings.npy`` and ``out/embeddings.json``).
    """
    from vlmask.runs import load_run
    from vlmask_plugins.evaluation.features import check_pooling

    check_pooling(pooling)
    run_dir, manifest, out = Path(run_dir), Path(manifest), Path(out)
    if out.is_dir():  # --out DIR: the array goes inside it, not beside it as DIR.npy
        out = out / "embeddings.npy"
    if not out.name.endswith(".npy"):
        out = out.with_name(out.name + ".npy")
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    trainer = load_run(run_dir, list(overrides))
    try:
        settings = evaluation_settings(trainer.recipe, trainer.plugins.registry)
        dataset = eval_dataset(trainer, manifest)
        pooled = run_features(trainer, dataset, manifest, settings, progress, f"embed {manifest.name}")
        if pooling not in pooled:
            raise ValueError(f"the encoder's tokens do not form its grid: {pooling} pooling is not available")
        features = pooled[pooling].numpy().astype(np.float32)
        checkpoint = relative_path(Path(trainer.resumed_from), run_dir)
    finally:
        trainer.close()
    with manifest.open("r", encoding="utf-8", errors="replace") as handle:
        lines = [text for text in handle]
    while lines and not lines[-1].strip():
        lines.pop()
    clips = getattr(dataset, "clips", None)
    if clips is not None:
        line_numbers = [int(clip.line) for clip in clips]
    elif len(dataset) == len(lines):
        line_numbers = list(range(1, len(lines) + 1))
    else:
        raise ValueError(f"dataset {type(dataset).__name__} keeps no line numbers (.clips[i].line) and skipped lines")
    rows = np.full((len(lines), features.shape[1]), np.nan, dtype=np.float32)
    for row, line in enumerate(line_numbers):
        rows[line - 1] = features[row]
    reasons = {s.line: s.reason for s in getattr(dataset, "skipped", [])}
    nan_lines = [
        {"line": i + 1, "reason": reasons.get(i + 1) or ("blank line" if not lines[i].strip() else "did not load")}
        for i in range(len(lines)) if not np.isfinite(rows[i]).all()
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, rows)
    write_json(out.with_name(out.name[: -len(".npy")] + ".json"), {
        "run_dir": str(run_dir), "checkpoint": checkpoint, "manifest": str(manifest), "pooling": pooling,
        "rows": len(lines), "dim": int(features.shape[1]), "nan_rows": nan_lines,
    })
    message = f"wrote {out}: {len(lines)} rows x {features.shape[1]} ({pooling} pooling)"
    if nan_lines:
        shown = "; ".join(f"line {x['line']}: {x['reason']}" for x in nan_lines[:5])
        message += f"; {len(nan_lines)} row(s) are NaN (skipped lines): {shown}" + ("; ..." if len(nan_lines) > 5 else "")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    return out


# --------------------------------------------------------------------------- vlmask compare


def _run_name(recipe: str, taken: set[str], seed: int) -> str:
    stem = Path(recipe).stem
    name, n = f"{stem}-seed{seed}", 2
    while name in taken:
        name, n = f"{stem}-{n}-seed{seed}", n + 1
    taken.add(name)
    return name


def _without_run_dir(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("run.dir=")]


def _recorded_overrides(run_dir: Path) -> list[str] | None:
    from omegaconf import OmegaConf

    try:
        record = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")).get("record") or {}  # type: ignore[union-attr]
    except Exception:
        return None
    value = record.get("overrides")
    return list(value) if isinstance(value, list) else None


def compare(recipes: Sequence[str], overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
            out_dir: Path | str | None = None, progress: bool = True) -> Path:
    """Train every recipe for every seed with the same overrides, evaluate each, and write
    ``comparison.json``, ``comparison.md`` and ``comparison.png`` into ``out_dir``; returns it.

    Runs live in ``OUT_DIR/<recipe stem>-seed<S>/``. Running again with the same ``out_dir``
    reuses what is done: a run with ``summary.json`` is not retrained (an interrupted one
    resumes from its last checkpoint), and an ``eval.json`` of its latest checkpoint is reused.
    ``seeds=None`` runs each recipe once with the seed it sets (after ``overrides``).
    ``out_dir=None``: a new folder ``runs/compare-<time>``.
    """
    from vlmask.checkpoint import latest_checkpoint
    from vlmask.engine import Trainer, is_finished

    if not recipes:
        raise ValueError("compare needs at least one recipe")
    overrides = list(overrides)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    for recipe_path in recipes:
        run_seeds = list(seeds) if seeds is not None else [int(load_recipe(recipe_path, overrides).get("seed", 0))]
        for seed in run_seeds:
            run_dir = out / _run_name(recipe_path, taken, seed)
            run_overrides = [*overrides, f"seed={seed}", f"run.dir={run_dir}"]
            if is_finished(run_dir):
                recorded = _recorded_overrides(run_dir)
                if recorded is not None and _without_run_dir(recorded) != _without_run_dir(run_overrides):
                    raise ValueError(
                        f"{run_dir} was trained with other overrides ({' '.join(recorded)}); "
                        f"compare into another folder, or remove it"
                    )
                console.print(f"{recipe_path} seed {seed}: finished run {run_dir} reused", highlight=False, markup=False)
            else:
                console.print(f"{recipe_path} seed {seed}: training into {run_dir}", highlight=False, markup=False)
                trainer = Trainer(load_recipe(recipe_path, run_overrides))
                try:
                    trainer.train()
                finally:
                    trainer.close()
            evaluation = _reusable_eval(run_dir, latest_checkpoint(run_dir / "checkpoints"))
            if evaluation is None:
                evaluation = evaluate_run(run_dir, progress=progress)
            summary = json.loads((run_dir / "summary.json").read_text())
            entries.append({"recipe": str(recipe_path), "name": Path(recipe_path).stem, "seed": seed,
                            "run_dir": str(run_dir), "summary": summary, "eval": evaluation})
    write_json(out / "comparison.json", {"overrides": overrides, "seeds": list(seeds) if seeds is not None else None,
                                          "runs": entries})
    (out / "comparison.md").write_text(comparison_table(entries, overrides))
    comparison_plot(entries, out / "comparison.png")
    console.print(f"comparison written to {out}", highlight=False, markup=False)
    return out


def _reusable_eval(run_dir: Path, checkpoint: Path | None) -> dict[str, Any] | None:
    path = run_dir / "eval.json"
    if checkpoint is None or not path.is_file():
        return None
    try:
        evaluation = json.loads(path.read_text())
    except ValueError:
        return None
    return evaluation if evaluation.get("checkpoint") == relative_path(checkpoint, run_dir) else None


def eval_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval.json as ``section.metric`` (plus ``chance_top1``), in file order."""
    metrics: dict[str, float] = {}
    for section, value in evaluation.items():
        if section in ("data", "evaluators"):
            continue
        if isinstance(value, dict):
            for metric, number in value.items():
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    metrics[f"{section}.{metric}"] = float(number)
        elif section == "chance_top1" and isinstance(value, (int, float)):
            metrics[section] = float(value)
    return metrics


@dataclass
class _Group:
    recipe: str
    name: str
    runs: list[dict[str, Any]]


def _groups(entries: list[dict[str, Any]]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for entry in entries:
        groups.setdefault(entry["recipe"], _Group(entry["recipe"], entry["name"], [])).runs.append(entry)
    return list(groups.values())


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


def comparison_table(entries: list[dict[str, Any]], overrides: Sequence[str] = ()) -> str:
    """Markdown: one row per recipe; each metric as mean ± sample std over seeds (just the mean
    for one seed; "-" where a run lacks it), then training wall time and clips/s."""
    metrics: list[str] = []
    for entry in entries:
        for name in eval_metrics(entry["eval"]):
            if name not in metrics:
                metrics.append(name)
    header = ["recipe", "seeds", *metrics, "wall s", "clips/s"]
    lines = [
        "# vlmask compare",
        "",
        f"overrides: `{' '.join(overrides)}`" if overrides else "overrides: none",
        "",
        "Metrics are mean ± sample standard deviation over seeds (one seed: the value).",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + " |",
    ]
    for group in _groups(entries):
        row = [group.name, str(len(group.runs))]
        for metric in metrics:
            values = [eval_metrics(r["eval"]).get(metric) for r in group.runs]
            row.append(_cell([v for v in values if v is not None], 3))
        row.append(_cell([float(r["summary"].get("wall_s") or math.nan) for r in group.runs], 1))
        row.append(_cell([float(r["summary"].get("clips_per_s") or math.nan) for r in group.runs], 1))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Runs:", ""]
    lines += [f"- {e['name']} seed {e['seed']}: `{e['run_dir']}`" for e in entries]
    return "\n".join(lines) + "\n"


def _loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps: list[int] = []
    losses: list[float] = []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return steps, losses
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps, losses


def comparison_plot(entries: list[dict[str, Any]], path: Path) -> Path:
    """Training loss curves (left) and metric bars with ± std error bars (right), Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _groups(entries)
    metrics: list[str] = []
    for entry in entries:
        for name in eval_metrics(entry["eval"]):
            if name not in metrics and name != "chance_top1":
                metrics.append(name)
    figure = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    curves, bars = figure.subplots(1, 2, width_ratios=[1, 1.4])
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for colour, group in zip(colours, groups):
        for i, run in enumerate(group.runs):
            steps, losses = _loss_curve(Path(run["run_dir"]))
            if steps:
                curves.plot(steps, losses, color=colour, alpha=0.9 if i == 0 else 0.5,
                            label=group.name if i == 0 else None)
    curves.set(xlabel="step", ylabel="training loss", title="loss")
    curves.grid(alpha=0.3)
    if groups:
        curves.legend(fontsize="small")
    if metrics:
        width = 0.8 / max(1, len(groups))
        positions = np.arange(len(metrics))
        for g, (colour, group) in enumerate(zip(colours, groups)):
            stats = [_mean_std([eval_metrics(r["eval"]).get(m, math.nan) for r in group.runs]) for m in metrics]
            shown = [i for i, (mean, _) in enumerate(stats) if not math.isnan(mean)]  # a missing metric: no bar
            bars.bar(positions[shown] + (g - (len(groups) - 1) / 2) * width, [stats[i][0] for i in shown], width,
                     yerr=[stats[i][1] or 0.0 for i in shown], capsize=3, color=colour, label=group.name)
        chance = [eval_metrics(e["eval"]).get("chance_top1") for e in entries]
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
