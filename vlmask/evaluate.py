"""Evaluating a trained run: ``vlmask eval`` and ``vlmask embed``.

* :func:`evaluate_run` extracts frozen features of the run's latest checkpoint on the train and
  val manifests (cached in ``RUN_DIR/features/``), runs the recipe's evaluators (plugin kind
  ``evaluator``) and writes ``RUN_DIR/eval.json`` (docs/contract.md, "eval.json"); what an
  eval.json was made with (:func:`evaluation_record`) and whether an existing one is that
  evaluation (:func:`eval_mismatch`) are here too, for ``vlmask compare``'s reuse.
* :func:`embed_manifest` writes one pooled feature per manifest line to a ``.npy`` file.

``vlmask compare`` (training several recipes, statistics) is :mod:`vlmask.compare`, its table
and plot :mod:`vlmask.report`.

Evaluators come from the recipe's optional ``evaluation`` section; every key is optional::

    evaluation:
      batch_size: 32          # clips per feature-extraction batch (default: train.batch_size)
      num_workers: 2          # default: data.num_workers
      features: encoder       # encoder (default): the encoder's tokens; context: the predictor's
                              # aggregated context c_t (DPC, MemDPC: vlmask.kinds.ContextFeatures)
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
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from torch import Tensor

from vlmask.caches import CaptionEmbeddingCache, FeatureCache, extract_features, file_digest
from vlmask.config import Recipe, RecipeError
from vlmask.data_loading import collate_of
from vlmask.io import relative_path, write_json
from vlmask.features import POOLINGS, TOKENS, EvalFeatures, Evaluator, SplitFeatures, check_pooling, finite_rows
from vlmask.kinds import (DATASET_VIEWS, WITHOUT_TRAINING_VIEWS, ContextFeatures, LabelledDataset, ManifestLinesDataset,
                          TokenEvaluator, VerbNounDataset)
from vlmask.paths import cache_dir
from vlmask.plugins import Plugins
from vlmask.registry import Registry
from vlmask.rundir import ABSENT, flatten_keys
from vlmask.runs import OpenRun, open_run
from vlmask.schema import INJECTED, build, evaluation_settings, factory_parameters
from vlmask.schema import settings as section_settings
from vlmask.sections import DEFAULT_EVALUATORS, EvaluationSettings

__all__ = [
    "DEFAULT_EVALUATORS",
    "EvalFeatures",
    "Evaluator",
    "SplitFeatures",
    "embed_manifest",
    "evaluate_run",
    "relative_path",  # moved to vlmask.io
    "write_json",  # moved to vlmask.io
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
        unknown_injected = [p for p in factory_parameters(entry.factory) if p in INJECTED and p not in node]
        if unknown_injected:
            raise RecipeError([f"{recipe.where(key)}: key {key}: evaluators get no injected arguments "
                               f"({', '.join(unknown_injected)}); set them in the recipe"])
        built[name] = build(registry, recipe, key, "evaluator", node=node)  # the one construction path
    return built


# --------------------------------------------------------------------------- what eval.json was made with


def evaluator_node(registry: Registry, node: dict[str, Any]) -> dict[str, Any]:
    """An evaluator node with every argument of its factory: the recipe's values, the factory's
    defaults for the others (so that ``{name: attentive_probe}`` and ``{name: attentive_probe,
    epochs: 20}`` are one setting, and a changed default is a changed setting); JSON values."""
    defaults = registry.get("evaluator", node["name"]).defaults  # vlmask.registry.factory_defaults
    full: dict[str, Any] = {"name": node["name"], **defaults, **{k: v for k, v in node.items() if k != "name"}}
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
    ``num_workers`` (how many clips are extracted at once, not which features come out).
    ``evaluation.features`` is recorded when it is not the default ``encoder`` (what every
    eval.json written before the setting existed measured, so those stay reusable)."""

    evaluation: dict[str, Any] = {"evaluators": {name: evaluator_node(plugins.registry, node)
                                                 for name, node in settings.evaluators.items()
                                                 if sections is None or name in sections}}
    if settings.features != "encoder":
        evaluation["features"] = settings.features
    return {
        "evaluation": evaluation,
        "data": data_record(recipe, train, val),
        "device": device.type,
        "precision": precision,
    }


def data_record(recipe: Recipe, train: Path | None, val: Path | None) -> dict[str, Any]:
    """The data a run's numbers come from: each manifest's resolved path and the sha256 of its
    bytes, and the dataset node that decodes them (eval.json's and finetune.json's records)."""

    def manifest(path: Path | None) -> tuple[str | None, str | None]:
        if path is None:
            return None, None
        path = Path(path).resolve()
        return str(path), file_digest(path) if path.is_file() else None

    train_path, train_digest = manifest(train)
    val_path, val_digest = manifest(val)
    return {"train": train_path, "train_sha256": train_digest, "val": val_path, "val_sha256": val_digest,
            "dataset": json.loads(json.dumps(section_settings(recipe, "data").dataset, default=str))}


def _show(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value[:12] if key.endswith("_sha256") else value
    return json.dumps(value, default=str)


@dataclass(frozen=True)
class EvalMismatch:
    """Why an existing eval.json is not the evaluation asked for: the first key that differs
    (``checkpoint``, ``settings`` when the file records none, else a dotted key of ``settings``
    such as ``evaluation.evaluators.attentive_probe.epochs``), its two values and how many other
    keys differ. The same test serves finetune.json (``record="requested"``, ``what="finetuning"``:
    vlmask.finetune.finetune_record), so both files are reused and kept by one rule."""

    key: str
    before: Any
    after: Any
    others: int = 0
    record: str = "settings"  # the file's key that holds what it was made with
    what: str = "evaluation"

    def describe(self, asks: str) -> str:
        """One line after the file's name; ``asks``: who wants ``after`` ("the compare asks")."""
        if self.key == "checkpoint":
            return f"was made for checkpoint {self.before}, {asks} {self.after}"
        if self.key == self.record:
            return f"does not record its {self.what} settings (an older vlmask wrote it)"
        if self.before is ABSENT:
            text = f"was made without {self.key}, {asks} {self.key}={_show(self.key, self.after)}"
        elif self.after is ABSENT:
            text = f"was made with {self.key}={_show(self.key, self.before)}, {asks} none"
        else:
            text = f"was made with {self.key}={_show(self.key, self.before)}, {asks} {_show(self.key, self.after)}"
        return text + (f" (and {self.others} other setting{'s' * (self.others > 1)})" if self.others else "")


def eval_mismatch(evaluation: dict[str, Any], checkpoint: str, settings: dict[str, Any], record: str = "settings",
                  what: str = "evaluation") -> EvalMismatch | None:
    """None when ``evaluation`` (an eval.json; a finetune.json with ``record="requested"``) was
    made of ``checkpoint`` (relative to the run) with exactly ``settings`` (:func:`evaluation_record`),
    else the first difference."""
    if evaluation.get("checkpoint") != checkpoint:
        return EvalMismatch("checkpoint", evaluation.get("checkpoint"), checkpoint, record=record, what=what)
    recorded = evaluation.get(record)
    if not isinstance(recorded, dict):
        return EvalMismatch(record, ABSENT, settings, record=record, what=what)
    before, after = flatten_keys(recorded), flatten_keys(settings)
    keys = [*after, *(k for k in before if k not in after)]
    differing = [k for k in keys if before.get(k, ABSENT) != after.get(k, ABSENT)]
    if not differing:
        return None
    first = differing[0]
    return EvalMismatch(first, before.get(first, ABSENT), after.get(first, ABSENT), len(differing) - 1,
                        record=record, what=what)


def read_eval(run_dir: Path, name: str = "eval.json") -> dict[str, Any] | None:
    """``RUN_DIR/eval.json`` (or ``name``: finetune.json), or None when there is none (or it is
    not a JSON object)."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    try:
        evaluation = json.loads(path.read_text())
    except ValueError:
        return None
    return evaluation if isinstance(evaluation, dict) else None


def keep_previous_eval(run_dir: Path, checkpoint: str, settings: dict[str, Any], name: str = "eval.json",
                       record: str = "settings", what: str = "evaluation") -> Path | None:
    """Before an eval.json is written: an existing one of another checkpoint or other settings
    (:func:`eval_mismatch`; also a damaged one) is copied to ``eval-<first 12 hex digits of the
    sha256 of its bytes>.json`` beside it, so that no measurement is lost to a later evaluation
    (the same content always gets the same name, so a second copy is not made). Returns that
    path, or None when the file is missing or is the same evaluation (which is then replaced).
    ``name``, ``record``, ``what``: the same for finetune.json (``finetune-<hash>.json``)."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    previous = read_eval(run_dir, name)
    mismatch = eval_mismatch(previous, checkpoint, settings, record, what) if previous is not None else None
    if previous is not None and mismatch is None:
        return None
    content = path.read_bytes()
    kept = path.with_name(f"{path.stem}-{hashlib.sha256(content).hexdigest()[:12]}.json")
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
    data = section_settings(recipe, "data")
    if data.val:
        return Path(data.val)
    if data.train:
        return None
    manifests = plugins.manager.hook.vlmask_default_manifests(recipe=recipe, cache_dir=cache_dir(), progress=False)
    return Path(manifests[1]) if manifests is not None else None


#: Dataset arguments that add views only training reads (:data:`vlmask.kinds.DATASET_VIEWS`,
#: CoCLR's flow and second clip): evaluation, ``embed`` and finetuning read ``video`` alone, so
#: their datasets are built with these off; on, every clip would be decoded twice and given
#: optical flow twice, and the unused views moved to the device.
TRAINING_VIEWS = tuple(DATASET_VIEWS.values())


def without_training_views(factory: Any) -> dict[str, bool | None]:
    """The entries of :data:`vlmask.kinds.WITHOUT_TRAINING_VIEWS` that the dataset factory takes
    (views off, pretraining augmentations None); :func:`vlmask.schema.build`'s ``if_taken`` does
    this selection itself."""
    parameters = factory_parameters(factory)
    return {name: value for name, value in WITHOUT_TRAINING_VIEWS.items() if name in parameters}


def eval_dataset(run: OpenRun, manifest: Path) -> Any:
    """The recipe's dataset plugin on ``manifest`` with evaluation transforms (train=False),
    the training set's class list (so labels index the same classes) and no training-only
    views (:data:`TRAINING_VIEWS`)."""
    registry: Registry = run.plugins.registry
    recipe: Recipe = run.recipe
    classes = run.train_set.classes  # vlmask.kinds.Dataset declares it
    if_taken = {**WITHOUT_TRAINING_VIEWS, **({"classes": list(classes)} if classes is not None else {})}
    return build(registry, recipe, "data.dataset", "dataset", manifest=str(manifest), train=False, if_taken=if_taken)


def run_features(run: OpenRun, dataset: Any, manifest: Path, settings: EvaluationSettings, progress: bool,
                 description: str, token_budget: int | None = None) -> dict[str, Tensor]:
    """Pooled features (rows = the dataset's clips, NaN for clips that did not load) of the
    run's loaded checkpoint, from ``RUN_DIR/features/`` or extracted and stored there; with
    ``token_budget`` also ``tokens`` (float16, cached under a key that includes the budget).
    ``settings.features`` picks the encoder's tokens or the predictor's context
    (:func:`context_of`); the cache key holds the choice, so the two never meet in the cache."""
    checkpoint: Path = run.checkpoint
    cache = FeatureCache(Path(run.run_dir) / "features")
    context = context_of(run, settings)
    data_settings = {
        "dataset": section_settings(run.recipe, "data").dataset,
        "precision": run.precision,
        "device": run.device.type,
        "clips": len(dataset),
        "features": settings.features,
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
        context=context,
    )
    for pooling, value in extracted.items():
        cache.save(keys[pooling], pooling, value)
    return extracted


def context_of(run: OpenRun, settings: EvaluationSettings) -> ContextFeatures | None:
    """The run's predictor when ``evaluation.features`` is ``context`` (None for ``encoder``).
    ``vlmask validate`` refuses ``context`` for a predictor class without
    :class:`vlmask.kinds.ContextFeatures`; a predictor made by a factory function is checked
    here, once built: a RecipeError naming the file and key."""
    if settings.features != "context":
        return None
    predictor = run.student.predictor
    if not isinstance(predictor, ContextFeatures):  # optional member: vlmask.kinds.OPTIONAL
        recipe: Recipe = run.recipe
        raise RecipeError([f"{recipe.where('evaluation.features')}: key evaluation.features: 'context' probes the "
                           f"predictor's aggregated context c_t, and this run's predictor "
                           f"({type(predictor).__name__ if predictor is not None else 'none'}) offers none "
                           f"(vlmask.kinds.ContextFeatures)"])
    return predictor


def split_features(dataset: Any, pooled: dict[str, Tensor]) -> tuple[SplitFeatures, int]:
    """The clips that loaded, with their annotations; returns the split and how many rows were dropped."""
    n = len(dataset)
    keep = finite_rows(pooled)
    rows = keep.nonzero().flatten().tolist()
    labelled = isinstance(dataset, LabelledDataset)  # optional members: vlmask.kinds.OPTIONAL
    label_ids = list(dataset.label_ids) if labelled else [-1] * n
    names = list(dataset.labels) if labelled else [None] * n
    captions = [c or "" for c in dataset.captions]  # vlmask.kinds.Dataset declares them
    with_parts = isinstance(dataset, VerbNounDataset)
    verbs = list(dataset.verbs) if with_parts else [None] * n
    nouns = list(dataset.nouns) if with_parts else [None] * n
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
    if not (isinstance(dataset, LabelledDataset) and isinstance(dataset, VerbNounDataset)):
        return verbs, nouns
    for label, verb, noun in zip(dataset.labels, dataset.verbs, dataset.nouns):
        c = index.get(label) if label is not None else None
        if c is not None and verb is not None and noun is not None and verbs[c] is None:
            verbs[c], nouns[c] = verb, noun
    return verbs, nouns


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
    classes = list(run.train_set.classes or [])
    result: dict[str, Any] = {"checkpoint": relative_path(checkpoint, run_dir), "features": settings.features,
                              "num_classes": len(classes)}
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
        budgets = [int(e.token_budget) for e in built.values() if isinstance(e, TokenEvaluator)]
        budget = max(budgets) if budgets else None  # evaluators asking for fewer tokens pool further
        train_split, train_dropped = split_features(train_set, run_features(
            run, train_set, run.train_manifest, settings, progress, "features: train", budget))
        val_split, val_dropped = split_features(
            val_set, run_features(run, val_set, val_path, settings, progress, "features: val", budget))
        verbs, nouns = class_parts(train_set, classes)
        features = EvalFeatures(
            train=train_split, val=val_split, classes=classes, class_verbs=verbs, class_nouns=nouns,
            project=_projector(run) if settings.features == "encoder" else None,  # it maps encoder features
            encode_text=_text_encoder(run),
        )
        for name, evaluator in built.items():
            section = evaluator.evaluate(features)
            if section is not None:
                result[name] = {k: float(v) for k, v in section.items()}
        data.update({
            "train_clips": len(train_split), "val_clips": len(val_split),
            "skipped_lines": {"train": len(train_set.skipped), "val": len(val_set.skipped)},
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
    projection = run.student.projection  # None without a text space
    if projection is None:
        return None
    device = next(projection.parameters()).device

    def project(features: Tensor) -> Tensor:
        with torch.no_grad():
            return projection(features.to(device, torch.float32)).float().cpu()

    return project


def _text_encoder(run: OpenRun) -> Callable[[list[str]], Tensor] | None:
    encoder = run.text_encoder
    if encoder is None:
        return None
    cache = CaptionEmbeddingCache(cache_dir() / "text")
    return lambda texts: cache.embed(encoder, list(texts), progress=False)


def _mergeable_eval(run_dir: Path, checkpoint: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The eval.json whose sections a partial evaluation keeps: same checkpoint, same settings
    apart from the evaluators (same features, data, dataset, device, precision); None otherwise."""
    previous = read_eval(run_dir)
    if previous is None:
        return None
    recorded = previous.get("settings")
    if not isinstance(recorded, dict) or not isinstance((recorded.get("evaluation") or {}).get("evaluators"), dict):
        return None
    shared = {**record, "evaluation": {**record["evaluation"], "evaluators": recorded["evaluation"]["evaluators"]}}
    return previous if eval_mismatch(previous, checkpoint, shared) is None else None



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
    """Write one pooled feature per manifest line (float32 ``.npy``, rows in line order): the
    encoder's, or the predictor's context with the override ``evaluation.features=context``.

    Row ``i`` is line ``i + 1`` of the manifest (trailing blank lines excluded). Lines that were
    skipped (bad JSON, missing ``video``, a file that does not exist or decode) and blank lines
    are rows of NaN; they are listed on stderr and in ``OUT.json`` beside the array, with the
    run, checkpoint, features and pooling (marked ``"written_by": "vlmask embed"``; an ``OUT.json`` that
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
        raise ValueError(f"the {settings.features}'s tokens do not form its grid: {pooling} pooling is not available")
    features = pooled[pooling].numpy().astype(np.float32)
    checkpoint = relative_path(Path(run.checkpoint), run_dir)
    with manifest.open("r", encoding="utf-8", errors="replace") as handle:
        lines = [text for text in handle]
    while lines and not lines[-1].strip():
        lines.pop()
    if isinstance(dataset, ManifestLinesDataset):
        line_numbers = [int(clip.line) for clip in dataset.clips]
    elif len(dataset) == len(lines):
        line_numbers = list(range(1, len(lines) + 1))
    else:
        raise ValueError(f"dataset {type(dataset).__name__} keeps no line numbers (.clips[i].line) and skipped lines")
    rows = np.full((len(lines), features.shape[1]), np.nan, dtype=np.float32)
    for row, line in enumerate(line_numbers):
        rows[line - 1] = features[row]
    reasons = {s.line: s.reason for s in dataset.skipped}
    nan_lines = [
        {"line": i + 1, "reason": reasons.get(i + 1) or ("blank line" if not lines[i].strip() else "did not load")}
        for i in range(len(lines)) if not np.isfinite(rows[i]).all()
    ]
    check_sidecar_free(sidecar, out)  # again: a file may have appeared while the features were computed
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, rows)
    write_json(sidecar, {
        EMBED_MARK[0]: EMBED_MARK[1], "run_dir": str(run_dir), "checkpoint": checkpoint, "manifest": str(manifest),
        "features": settings.features, "pooling": pooling, "rows": len(lines), "dim": int(features.shape[1]),
        "nan_rows": nan_lines,
    })
    message = f"wrote {out}: {len(lines)} rows x {features.shape[1]} ({settings.features} features, {pooling} pooling)"
    if nan_lines:
        shown = "; ".join(f"line {x['line']}: {x['reason']}" for x in nan_lines[:5])
        message += f"; {len(nan_lines)} row(s) are NaN (skipped lines): {shown}" + ("; ..." if len(nan_lines) > 5 else "")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    return out
