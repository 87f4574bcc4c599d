"""Evaluating trained runs: ``vlmask eval``, ``vlmask embed`` and ``vlmask compare``.

* :func:`evaluate_run` extracts frozen features of the run's latest checkpoint on the train and
  val manifests (cached in ``RUN_DIR/features/``), runs the recipe's evaluators (plugin kind
  ``evaluator``) and writes ``RUN_DIR/eval.json`` (docs/contract.md, "eval.json").
* :func:`embed_manifest` writes one pooled feature per manifest line to a ``.npy`` file.
* :func:`compare` trains several recipes (and seeds) with the same overrides, evaluates each and
  writes ``comparison.json``, ``comparison.md`` and ``comparison.png`` (docs/contract.md, "comparison.json").

Evaluators come from the recipe's optional ``evaluation`` section; every key is optional::

    evaluation:
      batch_size: 32          # clips per feature-extraction batch (default: train.batch_size)
      num_workers: 2          # default: data.num_workers
      evaluators:             # section of eval.json -> evaluator plugin node (merged over the defaults)
        knn: {name: knn, k: 10}
        linear_probe_temporal: null   # null drops a default section
        attentive_probe: {name: attentive_probe, queries: 1, heads: 4, epochs: 20, lr: 1.0e-3,
                          weight_decay: 0.01, batch_size: 64, token_budget: 64}
        linear_probe_adam: {name: linear_probe_adam}   # the mini-batch Adam probe, beside L-BFGS

The default sections are :data:`DEFAULT_EVALUATORS`. An evaluator is any object with
``evaluate(features: EvalFeatures) -> dict[str, float] | None`` (see
``vlmask.features``); None means "cannot be computed for this run" and the
section is left out of ``eval.json``. An evaluator with a ``token_budget`` attribute (the
attentive probe) also gets the token features (``SplitFeatures.tokens``, float16, at most that
many tokens per clip), extracted and cached once for the largest budget asked.

``compare`` adds seed statistics (vlmask.statistics) to ``comparison.json`` (``stats``, and with a
baseline ``paired``) and ``comparison.md``; see :func:`compare`.
"""

from __future__ import annotations

import hashlib
import inspect
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
from rich.markup import escape
from torch import Tensor

from vlmask.caches import CaptionEmbeddingCache, FeatureCache, extract_features, file_digest
from vlmask.config import Recipe, RecipeError, load_recipe
from vlmask.data_loading import collate_of
from vlmask.features import POOLINGS, TOKENS, EvalFeatures, Evaluator, SplitFeatures, check_pooling, finite_rows
from vlmask.kinds import DATASET_VIEWS, TRAINING_AUGMENTATIONS
from vlmask.paths import cache_dir
from vlmask.plugins import Plugins, default_plugins
from vlmask.registry import Registry
from vlmask.rundir import ABSENT, flatten_keys
from vlmask.runs import OpenRun, open_run, run_recipe
from vlmask.schema import INJECTED, build, evaluation_settings, factory_parameters
from vlmask.sections import DEFAULT_EVALUATORS, EvaluationSettings

__all__ = [
    "DEFAULT_EVALUATORS",
    "EvalFeatures",
    "Evaluator",
    "SplitFeatures",
    "compare",
    "embed_manifest",
    "evaluate_run",
]

console = Console(stderr=True, soft_wrap=True)


# --------------------------------------------------------------------------- settings


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


# --------------------------------------------------------------------------- what eval.json was made with


def evaluator_node(registry: Registry, node: dict[str, Any]) -> dict[str, Any]:
    """An evaluator node with every argument of its factory: the recipe's values, the factory's
    defaults for the others (so that ``{name: attentive_probe}`` and ``{name: attentive_probe,
    epochs: 20}`` are one setting, and a changed default is a changed setting); JSON values."""
    full: dict[str, Any] = {"name": node["name"]}
    factory = registry.get("evaluator", node["name"]).factory
    for name, parameter in inspect.signature(factory).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in node:
            full[name] = node[name]
        elif parameter.default is not parameter.empty:
            full[name] = parameter.default
    full.update({k: v for k, v in node.items() if k not in full})  # arguments taken by **kwargs
    return json.loads(json.dumps(full, default=str))


def evaluation_record(recipe: Recipe, plugins: Plugins, settings: EvaluationSettings, device: torch.device,
                      precision: str, train: Path | None, val: Path | None,
                      sections: Sequence[str] | None = None) -> dict[str, Any]:
    """eval.json's ``settings`` (docs/contract.md, "eval.json"): what determines its numbers
    besides the checkpoint. The evaluators asked for (``sections``, default every configured
    one, each with all its arguments: :func:`evaluator_node`), the manifests the features come
    from (resolved path and sha256 of the bytes), the dataset node that decodes them, and the
    device and precision of the extraction: the same settings the feature cache keys on
    (:func:`run_features`). Left out, as from that key: ``evaluation.batch_size`` and
    ``num_workers`` (how many clips are extracted at once, not which features come out)."""

    def manifest(path: Path | None) -> tuple[str | None, str | None]:
        if path is None:
            return None, None
        path = Path(path).resolve()
        return str(path), file_digest(path) if path.is_file() else None

    train_path, train_digest = manifest(train)
    val_path, val_digest = manifest(val)
    return {
        "evaluation": {"evaluators": {name: evaluator_node(plugins.registry, node) for name, node in settings.evaluators.items()
                                      if sections is None or name in sections}},
        "data": {"train": train_path, "train_sha256": train_digest, "val": val_path, "val_sha256": val_digest,
                 "dataset": json.loads(json.dumps(recipe.get("data.dataset"), default=str))},
        "device": device.type,
        "precision": precision,
    }


def _show(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value[:12] if key.endswith("_sha256") else value
    return json.dumps(value, default=str)


@dataclass(frozen=True)
class EvalMismatch:
    """Why an existing eval.json is not the evaluation asked for: the first key that differs
    (``checkpoint``, ``settings`` when the file records none, else a dotted key of ``settings``
    such as ``evaluation.evaluators.attentive_probe.epochs``), its two values and how many other
    keys differ."""

    key: str
    before: Any
    after: Any
    others: int = 0

    def describe(self, asks: str) -> str:
        """One line after the file's name; ``asks``: who wants ``after`` ("the compare asks")."""
        if self.key == "checkpoint":
            return f"was made for checkpoint {self.before}, {asks} {self.after}"
        if self.key == "settings":
            return "does not record its evaluation settings (an older vlmask wrote it)"
        if self.before is ABSENT:
            text = f"was made without {self.key}, {asks} {self.key}={_show(self.key, self.after)}"
        elif self.after is ABSENT:
            text = f"was made with {self.key}={_show(self.key, self.before)}, {asks} none"
        else:
            text = f"was made with {self.key}={_show(self.key, self.before)}, {asks} {_show(self.key, self.after)}"
        return text + (f" (and {self.others} other setting{'s' * (self.others > 1)})" if self.others else "")


def eval_mismatch(evaluation: dict[str, Any], checkpoint: str, settings: dict[str, Any]) -> EvalMismatch | None:
    """None when ``evaluation`` (an eval.json) was made of ``checkpoint`` (relative to the run)
    with exactly ``settings`` (:func:`evaluation_record`), else the first difference."""
    if evaluation.get("checkpoint") != checkpoint:
        return EvalMismatch("checkpoint", evaluation.get("checkpoint"), checkpoint)
    recorded = evaluation.get("settings")
    if not isinstance(recorded, dict):
        return EvalMismatch("settings", ABSENT, settings)
    before, after = flatten_keys(recorded), flatten_keys(settings)
    keys = [*after, *(k for k in before if k not in after)]
    differing = [k for k in keys if before.get(k, ABSENT) != after.get(k, ABSENT)]
    if not differing:
        return None
    first = differing[0]
    return EvalMismatch(first, before.get(first, ABSENT), after.get(first, ABSENT), len(differing) - 1)


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """``RUN_DIR/eval.json``, or None when there is none (or it is not a JSON object)."""
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        return None
    try:
        evaluation = json.loads(path.read_text())
    except ValueError:
        return None
    return evaluation if isinstance(evaluation, dict) else None


def keep_previous_eval(run_dir: Path, checkpoint: str, settings: dict[str, Any]) -> Path | None:
    """Before an eval.json is written: an existing one of another checkpoint or other settings
    (:func:`eval_mismatch`; also a damaged one) is copied to ``eval-<first 12 hex digits of the
    sha256 of its bytes>.json`` beside it, so that no measurement is lost to a later evaluation
    (the same content always gets the same name, so a second copy is not made). Returns that
    path, or None when the file is missing or is the same evaluation (which is then replaced)."""
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        return None
    previous = read_eval(run_dir)
    mismatch = eval_mismatch(previous, checkpoint, settings) if previous is not None else None
    if previous is not None and mismatch is None:
        return None
    content = path.read_bytes()
    kept = path.with_name(f"eval-{hashlib.sha256(content).hexdigest()[:12]}.json")
    if not kept.is_file():
        temporary = kept.with_name(f".{kept.name}.tmp")
        temporary.write_bytes(content)
        os.replace(temporary, kept)
    why = mismatch.describe("now") if mismatch is not None else "cannot be read as a JSON object"
    console.print(f"{path} {why}: kept as {kept}", markup=False, highlight=False)
    return kept


# --------------------------------------------------------------------------- features of a run


def val_manifest(run: OpenRun) -> Path | None:
    """``data.val``, or the default data's val split (a plugin's, ``vlmask_default_manifests``)
    when training used the default data."""
    return val_manifest_of(run.recipe, run.plugins)


def val_manifest_of(recipe: Recipe, plugins: Plugins) -> Path | None:
    """:func:`val_manifest` of a run's recipe, without opening the run."""
    val = recipe.get("data.val")
    if val:
        return Path(val)
    if recipe.get("data.train"):
        return None
    manifests = plugins.manager.hook.vlmask_default_manifests(recipe=recipe, cache_dir=cache_dir(), progress=False)
    return Path(manifests[1]) if manifests is not None else None


#: Dataset arguments that add views only training reads (:data:`vlmask.kinds.DATASET_VIEWS`,
#: CoCLR's flow and second clip): evaluation, ``embed`` and finetuning read ``video`` alone, so
#: their datasets are built with these off; on, every clip would be decoded twice and given
#: optical flow twice, and the unused views moved to the device.
TRAINING_VIEWS = tuple(DATASET_VIEWS.values())


def without_training_views(factory: Any) -> dict[str, bool | None]:
    """``{argument: False}`` for each of :data:`TRAINING_VIEWS` that the dataset factory takes,
    ``{argument: None}`` for each pretraining augmentation (:data:`vlmask.kinds.TRAINING_AUGMENTATIONS`)."""
    parameters = factory_parameters(factory)
    return ({name: False for name in TRAINING_VIEWS if name in parameters}
            | {name: None for name in TRAINING_AUGMENTATIONS if name in parameters})


def eval_dataset(run: OpenRun, manifest: Path) -> Any:
    """The recipe's dataset plugin on ``manifest`` with evaluation transforms (train=False),
    the training set's class list (so labels index the same classes) and no training-only
    views (:data:`TRAINING_VIEWS`)."""
    registry: Registry = run.plugins.registry
    recipe: Recipe = run.recipe
    entry = registry.get("dataset", recipe.get("data.dataset.name"))
    extra: dict[str, Any] = {"manifest": str(manifest), "train": False, **without_training_views(entry.factory)}
    classes = getattr(run.train_set, "classes", None)
    if classes is not None and "classes" in factory_parameters(entry.factory):
        extra["classes"] = list(classes)
    return build(registry, recipe, "data.dataset", "dataset", **extra)


def run_features(run: OpenRun, dataset: Any, manifest: Path, settings: EvaluationSettings, progress: bool,
                 description: str, token_budget: int | None = None) -> dict[str, Tensor]:
    """Pooled features (rows = the dataset's clips, NaN for clips that did not load) of the
    run's loaded checkpoint, from ``RUN_DIR/features/`` or extracted and stored there; with
    ``token_budget`` also ``tokens`` (float16, cached under a key that includes the budget)."""
    checkpoint: Path = run.checkpoint
    cache = FeatureCache(Path(run.run_dir) / "features")
    data_settings = {
        "dataset": run.recipe.get("data.dataset"),
        "precision": run.precision,
        "device": run.device.type,
        "clips": len(dataset),
    }
    key = FeatureCache.key(checkpoint, manifest, data_settings)
    keys = {p: key for p in POOLINGS}
    if token_budget is not None:
        keys[TOKENS] = FeatureCache.key(checkpoint, manifest, {**data_settings, "token_budget": token_budget})
    found = {p: cache.load(k, p) for p, k in keys.items()}
    if all(v is not None and v.shape[0] == len(dataset) for v in found.values()):
        return {p: v for p, v in found.items() if v is not None}
    extracted = extract_features(
        run.student.encoder, dataset, collate_of(dataset),
        batch_size=settings.batch_size, num_workers=settings.num_workers, device=run.device,
        autocast=run.autocast, progress=progress, description=description, token_budget=token_budget,
    )
    for pooling, value in extracted.items():
        cache.save(keys[pooling], pooling, value)
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
        pooled={p: v[keep] for p, v in pooled.items() if p != TOKENS},
        tokens=pooled[TOKENS][keep] if TOKENS in pooled else None,
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
                 progress: bool = True, evaluation: Recipe | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of ``run_dir`` and write ``RUN_DIR/eval.json``; returns it.

    ``overrides`` are KEY=VALUE applied to the run's ``config.yaml`` (e.g. ``data.val=...``,
    ``device=cpu``, ``evaluation.evaluators.knn.k=10``); ``evaluators`` limits the run to these
    sections (default: every configured one), keeping the other sections of an ``eval.json`` of
    the same checkpoint, data, device and precision. Sections that cannot be computed are absent.
    ``evaluation``: a recipe whose ``evaluation`` section is used instead of the run's
    (``vlmask compare`` passes the compared recipe with its overrides).

    ``settings`` in eval.json records what the numbers were made with (:func:`evaluation_record`).
    An existing eval.json of another checkpoint or other settings is kept beside it as
    ``eval-<hash>.json`` (:func:`keep_previous_eval`); one of the same is replaced.
    """
    run_dir = Path(run_dir)
    run = open_run(run_dir, list(overrides))
    recipe: Recipe = run.recipe
    registry: Registry = run.plugins.registry
    evaluation_recipe = evaluation if evaluation is not None else recipe
    settings = evaluation_settings(evaluation_recipe, registry)
    built = build_evaluators(settings, evaluation_recipe, registry, evaluators)
    checkpoint = Path(run.checkpoint)
    classes = list(getattr(run.train_set, "classes", []) or [])
    result: dict[str, Any] = {"checkpoint": relative_path(checkpoint, run_dir), "num_classes": len(classes)}
    if classes:
        result["chance_top1"] = 1.0 / len(classes)
    val_path = val_manifest(run)
    record = evaluation_record(recipe, run.plugins, settings, run.device, run.precision, run.train_manifest, val_path,
                               list(built))
    data: dict[str, Any] = {"train": str(run.train_manifest), "val": str(val_path) if val_path else None}
    if val_path is None:
        console.print(f"{run_dir}: no validation manifest (set data.val=...): no evaluation section can be computed", style="yellow", markup=False)
    elif built:
        train_set = eval_dataset(run, run.train_manifest)
        val_set = eval_dataset(run, val_path)
        budgets = [int(b) for b in (getattr(e, "token_budget", None) for e in built.values()) if b is not None]
        budget = max(budgets) if budgets else None  # evaluators asking for fewer tokens pool further
        train_split, train_dropped = split_features(train_set, run_features(
            run, train_set, run.train_manifest, settings, progress, "features: train", budget))
        val_split, val_dropped = split_features(
            val_set, run_features(run, val_set, val_path, settings, progress, "features: val", budget))
        verbs, nouns = class_parts(train_set, classes)
        features = EvalFeatures(
            train=train_split, val=val_split, classes=classes, class_verbs=verbs, class_nouns=nouns,
            project=_projector(run), encode_text=_text_encoder(run),
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
        previous = _mergeable_eval(run_dir, result["checkpoint"], record)
        kept_sections = previous["settings"]["evaluation"]["evaluators"] if previous else {}
        for name, node in kept_sections.items():
            if name in built:
                continue
            record["evaluation"]["evaluators"][name] = node
            if isinstance(previous.get(name), dict):
                result[name] = previous[name]
                if name in (previous.get("evaluators") or {}):
                    used[name] = previous["evaluators"][name]
    result["data"] = data
    result["evaluators"] = used
    result["settings"] = record
    keep_previous_eval(run_dir, result["checkpoint"], record)
    write_json(run_dir / "eval.json", result)
    return result


def _projector(run: OpenRun) -> Callable[[Tensor], Tensor] | None:
    projection = getattr(run.student, "projection", None)
    if projection is None:
        return None
    device = next(projection.parameters()).device

    def project(features: Tensor) -> Tensor:
        with torch.no_grad():
            return projection(features.to(device, torch.float32)).float().cpu()

    return project


def _text_encoder(run: OpenRun) -> Callable[[list[str]], Tensor] | None:
    encoder = getattr(run, "text_encoder", None)
    if encoder is None:
        return None
    cache = CaptionEmbeddingCache(cache_dir() / "text")
    return lambda texts: cache.embed(encoder, list(texts), progress=False)


# --------------------------------------------------------------------------- vlmask embed

#: The key and value that mark ``OUT.json`` beside ``OUT.npy`` as written by ``vlmask embed``
#: (docs/contract.md, "vlmask embed"); only such a file is ever replaced.
EMBED_MARK = ("written_by", "vlmask embed")
#: The keys of a sidecar written before the mark existed (an older vlmask): replaced as well.
_UNMARKED_SIDECAR_KEYS = frozenset({"run_dir", "checkpoint", "manifest", "pooling", "rows", "dim", "nan_rows"})


def embed_sidecar(out: Path) -> Path:
    """``FILE.json`` beside ``FILE.npy``: the run, checkpoint, pooling and NaN rows of the array."""
    return out.with_name(out.name[: -len(".npy")] + ".json")


def check_sidecar_free(sidecar: Path, array: Path) -> None:
    """Raise ``FileExistsError`` (one line naming the file) when ``sidecar`` exists and was not
    written by ``vlmask embed``: a user's ``features.json`` beside ``--out features.npy`` is
    never overwritten. Recognised as vlmask's by its content: the :data:`EMBED_MARK` key, or
    exactly the keys an older vlmask wrote."""
    if not sidecar.exists() and not sidecar.is_symlink():
        return
    record: Any = None
    if sidecar.is_file() and not sidecar.is_symlink():
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
    key, value = EMBED_MARK
    if isinstance(record, dict) and (record.get(key) == value or set(record) == _UNMARKED_SIDECAR_KEYS):
        return
    raise FileExistsError(f"{sidecar} exists and was not written by vlmask embed (no \"{key}\": \"{value}\"); "
                          f"vlmask embed writes the record of {array.name} there and will not overwrite it: move it "
                          f"or choose another --out (nothing was written)")


def embed_manifest(run_dir: Path | str, manifest: Path | str, out: Path | str, overrides: Sequence[str] = (),
                   pooling: str = "mean", progress: bool = True) -> Path:
    """Write one pooled encoder feature per manifest line (float32 ``.npy``, rows in line order).

    Row ``i`` is line ``i + 1`` of the manifest (trailing blank lines excluded). Lines that were
    skipped (bad JSON, missing ``video``, a file that does not exist or decode) and blank lines
    are rows of NaN; they are listed on stderr and in ``OUT.json`` beside the array, with the
    run, checkpoint and pooling (marked ``"written_by": "vlmask embed"``; an ``OUT.json`` that
    vlmask did not write is never overwritten: :func:`check_sidecar_free` refuses first).
    Features come from (and go to) the run's feature cache.
    Returns the ``.npy`` path (``.npy`` is appended when ``out`` lacks it; an existing folder
    ``out`` gets ``out/embeddings.npy`` and ``out/embeddings.json``).
    """
    check_pooling(pooling)
    run_dir, manifest, out = Path(run_dir), Path(manifest), Path(out)
    if out.is_dir():  # --out DIR: the array goes inside it, not beside it as DIR.npy
        out = out / "embeddings.npy"
    if not out.name.endswith(".npy"):
        out = out.with_name(out.name + ".npy")
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    sidecar = embed_sidecar(out)
    check_sidecar_free(sidecar, out)  # before any work: nothing is written when it would be refused
    run = open_run(run_dir, list(overrides))
    settings = evaluation_settings(run.recipe, run.plugins.registry)
    dataset = eval_dataset(run, manifest)
    pooled = run_features(run, dataset, manifest, settings, progress, f"embed {manifest.name}")
    if pooling not in pooled:
        raise ValueError(f"the encoder's tokens do not form its grid: {pooling} pooling is not available")
    features = pooled[pooling].numpy().astype(np.float32)
    checkpoint = relative_path(Path(run.checkpoint), run_dir)
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
    check_sidecar_free(sidecar, out)  # again: a file may have appeared while the features were computed
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, rows)
    write_json(sidecar, {
        EMBED_MARK[0]: EMBED_MARK[1], "run_dir": str(run_dir), "checkpoint": checkpoint, "manifest": str(manifest),
        "pooling": pooling, "rows": len(lines), "dim": int(features.shape[1]), "nan_rows": nan_lines,
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


def _other_recipe(run_dir: Path, recipe_path: str, run_overrides: list[str]) -> str | None:
    """Why the run already in ``run_dir`` cannot be this compare's run, or None: the training
    settings differ (vlmask.rundir.check_same_recipe, as ``vlmask run`` checks a re-run: keys
    that do not change training, ``evaluation.*`` among them, may differ), or the run is finished
    and a larger ``train.max_steps`` would continue it (a compare does not continue finished runs)."""
    from omegaconf import OmegaConf

    from vlmask.rundir import RunDirMismatch, check_same_recipe

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


@dataclass
class _Planned:
    recipe: str
    seed: int
    run_dir: Path
    overrides: list[str]


def plan_compare(recipes: Sequence[str], overrides: Sequence[str], seeds: Sequence[int] | None, out: Path,
                 plugins: Plugins | None = None) -> list[_Planned]:
    """Every (recipe, seed) run of a comparison, each recipe validated first with the overrides
    (``vlmask.schema.validate``, the ``data.train`` / ``data.val`` manifests exist, the data
    carries what the recipe needs or a plugin fills it (``vlmask.data_requirements.check_data``),
    a run already in ``out`` was trained with these settings (:func:`_other_recipe`), the run
    builds and takes the first step of every stage, :func:`vlmask.rehearsal.rehearse`). Raises one
    RecipeError listing every problem of every recipe, so that nothing trains when any recipe
    would fail at start."""
    from vlmask.data_requirements import check_data
    from vlmask.rehearsal import rehearse
    from vlmask.schema import validate

    plugins = plugins if plugins is not None else default_plugins()
    registry = plugins.registry
    planned: list[_Planned] = []
    problems: list[str] = []
    taken: set[str] = set()
    for recipe_path in recipes:
        try:
            recipe = load_recipe(recipe_path, list(overrides))
        except RecipeError as exc:
            problems += exc.problems
            continue
        found = validate(recipe, registry)
        for key in ("data.train", "data.val"):
            manifest = recipe.get(key)
            if manifest and not Path(str(manifest)).is_file():
                found.append(f"{recipe.where(key)}: key {key}: manifest {manifest} does not exist")
        if not found:  # the data must carry what the recipe needs, or a plugin must fill it (action boxes)
            data_errors, _ = check_data(recipe, registry, plugins.manager.hook, cache_dir())
            found += [f"{recipe_path}: {error}" for error in data_errors]
        if not found:  # build it and take each stage's first step on meta (vlmask.rehearsal)
            found += rehearse(recipe, plugins)
        problems += found
        run_seeds = list(seeds) if seeds is not None else [int(recipe.get("seed", 0))]
        for seed in run_seeds:
            run_dir = out / _run_name(recipe_path, taken, seed)
            run_overrides = [*overrides, f"seed={seed}", f"run.dir={run_dir}"]
            problem = _other_recipe(run_dir, recipe_path, run_overrides) if not found else None
            if problem:
                problems.append(problem)
            planned.append(_Planned(str(recipe_path), seed, run_dir, run_overrides))
    if problems:
        raise RecipeError(problems)
    refuse_busy_runs([run.run_dir for run in planned])
    return planned


def refuse_busy_runs(run_dirs: Sequence[Path]) -> None:
    """Raise ``RunDirBusy`` naming every run directory of the comparison that a live process
    trains in now (``vlmask run``, another compare), before anything trains: the compare would
    otherwise record it as a failed run and go on (vlmask.rundir.busy_holder takes no lock)."""
    from vlmask.rundir import RunDirBusy, busy_holder

    busy = [f"{run_dir} is in use by {holder}" for run_dir in run_dirs if (holder := busy_holder(run_dir))]
    if busy:
        raise RunDirBusy("; ".join(busy) + "; wait for it to finish, stop it, or compare into another --out")


def compare(recipes: Sequence[str], overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
            out_dir: Path | str | None = None, progress: bool = True, baseline: str | None = None) -> Path:
    """Train every recipe for every seed with the same overrides, evaluate each, and write
    ``comparison.json``, ``comparison.md`` and ``comparison.png`` into ``out_dir``; returns it.

    Every recipe is validated first (:func:`plan_compare`): with any problem nothing trains.
    Runs live in ``OUT_DIR/<recipe stem>-seed<S>/``. Running again with the same ``out_dir``
    reuses what is done: a run with ``summary.json`` is not retrained (an interrupted one
    resumes from its last checkpoint), and its ``eval.json`` is reused when it was made of the
    latest checkpoint with the evaluation settings this compare asks (the recipe's ``evaluation``
    section with the overrides, on the run's data, device and precision: eval.json's
    ``settings``); otherwise the run is evaluated again, one line saying which setting differs,
    and the old file is kept as ``eval-<hash>.json`` (:func:`evaluate_run`). ``evaluation.*``
    overrides do not change training, so a finished run is reused with other ones (the long
    probe in one command: ``evaluation.evaluators.attentive_probe.epochs=100``).
    A run that fails (training or evaluation) is reported in ``comparison.json``'s ``failed``
    list and on stderr; the others still run and are tabulated (``vlmask compare`` then exits 1).
    A run directory another process trains in raises ``RunDirBusy`` (exit 2): before anything
    trains when it is busy at the start (:func:`refuse_busy_runs`), at once when it becomes so.
    ``seeds=None`` runs each recipe once with the seed it sets (after ``overrides``).
    ``out_dir=None``: a new folder ``runs/compare-<time>``. ``baseline`` (a recipe path or stem
    given in ``recipes``) adds the paired differences to it (``paired``; see vlmask.statistics).
    """
    from vlmask.checkpoint import latest_checkpoint
    from vlmask.engine import is_finished, train_recipe
    from vlmask.flops import record_train_flops
    from vlmask.rundir import RunDirBusy

    if not recipes:
        raise ValueError("compare needs at least one recipe")
    overrides = list(overrides)
    if baseline is not None and baseline not in {str(r) for r in recipes} | {Path(r).stem for r in recipes}:
        raise ValueError(f"--baseline {baseline!r} is not one of the compared recipes "
                         f"({', '.join(Path(r).stem for r in recipes)})")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    planned = plan_compare(recipes, overrides, seeds, out)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for run in planned:
        recipe_path, seed, run_dir = run.recipe, run.seed, run.run_dir
        try:
            if is_finished(run_dir):
                console.print(f"{recipe_path} seed {seed}: finished run {run_dir} reused", highlight=False, markup=False)
            else:
                console.print(f"{recipe_path} seed {seed}: training into {run_dir}", highlight=False, markup=False)
                trained, train_step = train_recipe(load_recipe(recipe_path, run.overrides))
                record_train_flops(run_dir, train_step, trained)
            asked = load_recipe(recipe_path, run.overrides)  # its evaluation section: what this compare asks
            evaluation = _reusable_for_compare(run_dir, latest_checkpoint(run_dir / "checkpoints"), asked)
            if evaluation is None:
                evaluation = evaluate_run(run_dir, progress=progress, evaluation=asked)
            summary = json.loads((run_dir / "summary.json").read_text())
            if "train_flops" not in summary:
                summary["train_flops"] = _train_flops_of(recipe_path, run.overrides, summary)
        except (KeyboardInterrupt, SystemExit, RunDirBusy):  # a writer that started meanwhile: stop, as vlmask run does
            raise
        except Exception as exc:  # one failed recipe must not lose the others
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            console.print(f"[red]{escape(str(recipe_path))} seed {seed} failed:[/] {escape(reason)}", highlight=False)
            failed.append({"recipe": str(recipe_path), "name": Path(recipe_path).stem, "seed": seed,
                           "run_dir": str(run_dir), "error": reason})
            continue
        entries.append({"recipe": str(recipe_path), "name": Path(recipe_path).stem, "seed": seed,
                        "run_dir": str(run_dir), "summary": summary, "eval": evaluation,
                        "loss": training_loss(run_dir, summary)})
    stats = comparison_stats(entries)
    result: dict[str, Any] = {"overrides": overrides, "seeds": list(seeds) if seeds is not None else None,
                              "runs": entries, "stats": [row.as_json() for row in stats]}
    paired = None
    if baseline is not None:
        paired = paired_to_baseline(entries, baseline)
        result["baseline"] = baseline
        result["paired"] = [row.as_json() for row in paired]
    if failed:
        result["failed"] = failed
    write_json(out / "comparison.json", result)
    (out / "comparison.md").write_text(comparison_table(entries, overrides, stats=stats, paired=paired, failed=failed))
    comparison_plot(entries, out / "comparison.png")
    console.print(f"comparison written to {out}", highlight=False, markup=False)
    return out


def _train_flops_of(recipe_path: str, run_overrides: list[str], summary: dict[str, Any]) -> float | None:
    """``train_flops`` for a summary.json that lacks it (runs of an engine that does not write
    it): counted at the run's own scale by vlmask.flops; None when it cannot be counted."""
    from vlmask.flops import train_flops

    try:
        recipe = load_recipe(recipe_path, run_overrides)
        return train_flops(recipe_path, _without_run_dir(run_overrides), trained_clips(recipe, summary))
    except Exception as exc:  # FLOPs are an annotation: a counter failure must not fail the run
        console.print(f"[yellow]{escape(str(recipe_path))}: training FLOPs not counted: {escape(str(exc))}[/]", highlight=False)
        return None


def trained_clips(recipe: Recipe, summary: dict[str, Any]) -> int:
    """Clips trained: steps x batch size x world size x accumulation (from the run's summary)."""
    steps = int(summary.get("steps") or 0)
    batch = int(recipe.get("train.batch_size") or 1)
    accumulate = int(recipe.get("train.accumulate") or 1)
    return steps * batch * int(summary.get("world_size") or 1) * accumulate


def _recipe_names(entries: list[dict[str, Any]]) -> dict[str, str]:
    return {e["recipe"]: e["name"] for e in entries}


def comparison_stats(entries: list[dict[str, Any]]) -> list[Any]:
    """vlmask.statistics.SeedStats per recipe (its stem) and metric, metrics in first-seen order."""
    from vlmask.statistics import seed_stats

    rows = []
    for group in _groups(entries):
        metrics: list[str] = []
        for run in group.runs:
            metrics += [m for m in eval_metrics(run["eval"]) if m not in metrics and m != "chance_top1"]
        for metric in metrics:
            row = seed_stats(group.name, metric, [eval_metrics(r["eval"]).get(metric) for r in group.runs])
            if row is not None:
                rows.append(row)
    return rows


def paired_to_baseline(entries: list[dict[str, Any]], baseline: str) -> list[Any]:
    """vlmask.statistics.PairedDifference of every other recipe to ``baseline`` (path or stem)
    per metric both have, paired by seed."""
    from vlmask.statistics import paired_difference

    groups = _groups(entries)
    base = next((g for g in groups if baseline in (g.recipe, g.name)), None)
    if base is None:
        return []
    base_values: dict[str, dict[int, float]] = {}
    for run in base.runs:
        for metric, value in eval_metrics(run["eval"]).items():
            base_values.setdefault(metric, {})[int(run["seed"])] = value
    rows = []
    for group in groups:
        if group is base:
            continue
        values: dict[str, dict[int, float]] = {}
        for run in group.runs:
            for metric, value in eval_metrics(run["eval"]).items():
                values.setdefault(metric, {})[int(run["seed"])] = value
        for metric, by_seed in values.items():
            if metric == "chance_top1" or metric not in base_values:
                continue
            row = paired_difference(group.name, base.name, metric, by_seed, base_values[metric])
            if row is not None:
                rows.append(row)
    return rows


def _reusable_for_compare(run_dir: Path, checkpoint: Path | None, asked: Recipe) -> dict[str, Any] | None:
    """``RUN_DIR/eval.json`` when it was made of ``checkpoint`` with the evaluation settings the
    compare asks (``asked``'s evaluation section on the run's data, device and precision:
    :func:`evaluation_record`), else None, saying in one line why it is not reused."""
    previous = read_eval(run_dir)
    if previous is None or checkpoint is None:
        return None
    plugins = default_plugins()
    recipe, device, precision, train = run_recipe(run_dir, (), plugins)
    record = evaluation_record(recipe, plugins, evaluation_settings(asked, plugins.registry), device, precision,
                               train, val_manifest_of(recipe, plugins))
    mismatch = eval_mismatch(previous, relative_path(checkpoint, run_dir), record)
    if mismatch is None:
        console.print(f"{run_dir / 'eval.json'} reused: made of {previous['checkpoint']} with the evaluation settings "
                      f"this compare asks", highlight=False, markup=False)
        return previous
    console.print(f"{run_dir / 'eval.json'} {mismatch.describe('the compare asks')}: evaluating again",
                  highlight=False, markup=False)
    return None


def _mergeable_eval(run_dir: Path, checkpoint: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The eval.json whose sections a partial evaluation keeps: same checkpoint, same settings
    apart from the evaluators (same data, dataset, device, precision); None otherwise."""
    previous = read_eval(run_dir)
    if previous is None:
        return None
    recorded = previous.get("settings")
    if not isinstance(recorded, dict) or not isinstance((recorded.get("evaluation") or {}).get("evaluators"), dict):
        return None
    shared = {**record, "evaluation": {"evaluators": recorded["evaluation"]["evaluators"]}}
    return previous if eval_mismatch(previous, checkpoint, shared) is None else None


def training_loss(run_dir: Path, summary: dict[str, Any]) -> dict[str, float | int | None]:
    """The run's training loss at its first logged step and at its last step (``summary.json``'s
    ``final_loss``): whether the objective fell. Losses of different recipes are on different
    scales; only a recipe's own two numbers compare."""
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
    return {"first_step": first_step, "first": first,
            "final": float(final) if isinstance(final, (int, float)) else None, "final_step": summary.get("steps")}


def eval_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval.json as ``section.metric`` (plus ``chance_top1``), in file order."""
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


def _interval_cell(row: Any, digits: int) -> str:
    if row is None:
        return "-"
    text = f"{row.mean:.{digits}f}"
    if row.std is not None:
        text += f" ± {row.std:.{digits}f} [{row.ci95[0]:.{digits}f}, {row.ci95[1]:.{digits}f}]"
    return text


def comparison_table(entries: list[dict[str, Any]], overrides: Sequence[str] = (), stats: list[Any] | None = None,
                     paired: list[Any] | None = None, failed: list[dict[str, Any]] | None = None) -> str:
    """Markdown: one row per recipe; each metric as mean ± sample std [95% interval] over seeds
    (just the mean for one seed; "-" where a run lacks it), then training wall time, clips/s,
    training FLOPs and the training loss at the first logged and the last step; then, with ``paired`` (vlmask.statistics.PairedDifference rows), one
    sentence per recipe and metric saying whether it differs from the baseline beyond seed
    noise; then the failed runs."""
    from vlmask.statistics import describe_difference

    stats = comparison_stats(entries) if stats is None else stats
    by_key = {(row.recipe, row.metric): row for row in stats}
    metrics: list[str] = []
    for entry in entries:
        for name in eval_metrics(entry["eval"]):
            if name not in metrics:
                metrics.append(name)
    header = ["recipe", "seeds", *metrics, "wall s", "clips/s", "train PFLOP", "loss first → final"]
    evaluators = evaluators_line(entries)
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
    for group in _groups(entries):
        row = [group.name, str(len(group.runs))]
        for metric in metrics:
            if metric == "chance_top1":
                values = [eval_metrics(r["eval"]).get(metric) for r in group.runs]
                row.append(_cell([v for v in values if v is not None], 3))
            else:
                row.append(_interval_cell(by_key.get((group.name, metric)), 3))
        row.append(_cell([float(r["summary"].get("wall_s") or math.nan) for r in group.runs], 1))
        row.append(_cell([float(r["summary"].get("clips_per_s") or math.nan) for r in group.runs], 1))
        row.append(_cell([float(r["summary"].get("train_flops") or math.nan) / 1e15 for r in group.runs], 4))
        losses = [r.get("loss") or {} for r in group.runs]
        first = _cell([v for v in (loss.get("first") for loss in losses) if v is not None], 3)
        final = _cell([v for v in (loss.get("final") for loss in losses) if v is not None], 3)
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
        lines += [f"- {f['name']} seed {f['seed']} (`{f['run_dir']}`): {f['error']}" for f in failed]
    lines += ["", "Runs:", ""]
    lines += [f"- {e['name']} seed {e['seed']}: `{e['run_dir']}`" for e in entries]
    return "\n".join(lines) + "\n"


def _node_text(section: str, node: dict[str, Any]) -> str:
    arguments = [f"{k}={json.dumps(v, default=str)}" for k, v in node.items() if k != "name"]
    name = [] if node.get("name") == section else [str(node.get("name"))]
    return f"{section} ({', '.join(name + arguments)})" if name or arguments else section


def evaluators_line(entries: list[dict[str, Any]]) -> str | None:
    """One line for comparison.md: each evaluation section with the arguments set by the recipe
    or the overrides (eval.json ``evaluators``; the others are the evaluator's defaults, all of
    them in eval.json ``settings``), the recipes after a variant when the runs differ."""
    variants: dict[str, dict[str, list[str]]] = {}
    for entry in entries:
        for section, node in (entry["eval"].get("evaluators") or {}).items():
            if isinstance(node, dict):
                names = variants.setdefault(section, {}).setdefault(_node_text(section, node), [])
                names += [] if entry["name"] in names else [entry["name"]]
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


def _loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    return _curves(run_dir)["loss"]


def _flops_per_step(summary: dict[str, Any]) -> float | None:
    flops, steps = summary.get("train_flops"), summary.get("steps")
    if isinstance(flops, (int, float)) and flops > 0 and isinstance(steps, int) and steps > 0:
        return float(flops) / steps
    return None


def comparison_plot(entries: list[dict[str, Any]], path: Path) -> Path:
    """Training loss against steps and against training FLOPs (``summary.train_flops`` spread
    evenly over the steps), metric bars with ± std error bars, and, when ``metrics.jsonl`` has
    them, the diagnostics curves (:data:`DIAGNOSTICS`) against steps; Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _groups(entries)
    metrics: list[str] = []
    for entry in entries:
        for name in eval_metrics(entry["eval"]):
            if name not in metrics and name != "chance_top1":
                metrics.append(name)
    curves_of = {run["run_dir"]: _curves(Path(run["run_dir"]), ("loss", *DIAGNOSTICS)) for run in entries}
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
            steps, losses = curves_of[run["run_dir"]]["loss"]
            label = group.name if i == 0 else None
            if steps:
                curves.plot(steps, losses, color=colour, alpha=0.9 if i == 0 else 0.5, label=label)
                per_step = _flops_per_step(run["summary"])
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
                steps, values = curves_of[run["run_dir"]][key]
                if steps:
                    axis.plot(steps, values, color=colour, alpha=0.9 if i == 0 else 0.5, label=group.name if i == 0 else None)
        axis.set(xlabel="step", ylabel=key, title=f"diagnostics: {key}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
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
