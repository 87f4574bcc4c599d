"""What fine-tuning and the frozen evaluations cost, as ratios to one training step (issue 18).

Everything is measured in ONE process, on the recipe's device with the same torch threads, so
the ratios hold on a loaded machine where absolute times do not:

(a) ``train_step``: one ``TrainStep.step`` of the recipe (``vlmask.step.build_step`` and
    ``vlmask.bench.synthetic_batch``, as ``vlmask bench`` builds and feeds it): ``--steps``
    timed steps after ``--warmup`` untimed ones, alternating with (b)'s steps, then again after
    (b) and after (e); the reference is the median of all of them, and the ratios with the
    slowest and the fastest round's median are kept beside
    (``ratios_with_the_slowest_and_fastest_round``: how much the load moved);
(b) ``finetune_step``: one optimizer step of ``vlmask finetune`` on a batch of the same size
    (``finetune.batch_size``, default ``train.batch_size``): ``vlmask.finetune.VideoClassifier``
    on a freshly built encoder with the finetune ``drop_path`` (as ``vlmask finetune`` opens the
    run), AdamW over the layer-decay groups (``finetune_optimizer``), the per-step lr and the
    smoothed (or mixed) targets, then ``finetune_step``, the very function ``_finetune`` calls;
    median after the same warm-up (``finetune_step_paired``: the median ratio of the
    alternating pairs, the figure least moved by the load). ``finetune_val_forward_per_clip``: the classifier's forward
    per clip in eval mode, what the final validation costs per validation clip;
(c) ``features_per_clip``: ``vlmask.caches.extract_features`` (what ``vlmask eval``'s
    ``run_features`` calls) with the student encoder, ``evaluation.batch_size`` and the token
    budget the default attentive probe asks for (pooled and token features), over as many
    clips as the built-in set's train and val splits, divided by that count;
(d) ``attentive_probe``: the recipe's ``attentive_probe`` evaluator (defaults: 20 epochs) fit
    on those train clips' token features and evaluated on the val clips, per epoch (fit / epochs)
    and at 100 epochs-equivalent (100 x per epoch);
(e) every other default evaluator of ``vlmask eval`` (L-BFGS linear probes on mean and temporal
    pooling, k-NN, and retrieval / zero-shot where the recipe has a text space, with the caption
    embedding cache empty as at a first evaluation) on the same features, one fit each.

Synthetic tensors stand in for decoded clips (noise pixels; uint8 for extraction, as the loader
gives them): decoding and augmentation are left out of every side, training included, since
they would only add the machine's I/O noise. Labels cycle through the built-in set's classes
(31 for the default set), captions are distinct per clip (the uncached worst case). What a
long-lived process pays once (scikit-learn's import, the text encoder's first call) is paid
before timing. Then:

* ``vlmask finetune`` at its defaults = ``round(epochs x batches per epoch)`` finetune steps
  (the built-in train split, incomplete batches dropped) + the val clips' forward, in training
  steps and as a share of the recipe's pretraining (``train.max_steps``);
* the default ``vlmask eval`` = feature extraction of train + val clips + every default
  evaluator, in training steps and as a share of pretraining.

    python benchmarks/eval_costs.py recipes/fils.yaml --threads 1
    python benchmarks/eval_costs.py recipes/mae.yaml data.dataset.size=32 --threads 1 --out FILE.json

Writes benchmarks/results/eval-costs-<recipe>-<YYYYMMDD>.json unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlmask.bench import SYNTHETIC_CLASSES, clip_shape, device_name, synthetic_batch
from vlmask.build import build_components
from vlmask.caches import CaptionEmbeddingCache, extract_features
from vlmask.config import load_recipe
from vlmask.data_loading import EpochBatches
from vlmask.evaluate import build_evaluators
from vlmask.features import TOKENS, EvalFeatures, SplitFeatures
from vlmask.finetune import (MixupCutmix, VideoClassifier, finetune_optimizer, finetune_step, set_group_lrs,
                             smoothed_targets)
from vlmask.kinds import SwitchesAttention, TokenEvaluator
from vlmask.plugins import Plugins, default_plugins, run_manager
from vlmask.schedules import lr_at
from vlmask.schema import evaluation_settings, finetune_settings, top_settings
from vlmask.step import TrainStep, build_step, steps_without_data
from vlmask.types import Batch
from vlmask_plugins.data import synthetic

RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------------------------------- timing
def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def seconds(device: torch.device, fn: Callable[[], Any]) -> float:
    start = _now(device)
    fn()
    return _now(device) - start


def timings(device: torch.device, fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [seconds(device, fn) for _ in range(repeats)]


def median_seconds(device: torch.device, fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    return statistics.median(timings(device, fn, repeats, warmup))


# ---------------------------------------------------------------------------------------- the built-in set
def builtin_sizes(recipe: Any) -> dict[str, Any]:
    """Train / val clip counts and class names of the built-in set the recipe's
    ``data.synthetic`` describes (vlmask_plugins.data.synthetic.generate's split rule)."""
    options = dict(recipe.get("data.synthetic") or {})
    clips = int(options.get("clips", 400))
    val = min(max(1, round(clips * float(options.get("val_fraction", 0.25)))), clips - 1)
    return {"train": clips - val, "val": val, "classes": synthetic.classes(options.get("verbs"))}


class NoiseClips(Dataset):
    """``size`` uint8 noise clips of one shape, seeded by index (decoding left out)."""

    def __init__(self, size: int, shape: tuple[int, ...]) -> None:
        self.size, self.shape = size, shape

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        return {"video": torch.randint(0, 256, self.shape, dtype=torch.uint8, generator=generator), "index": index}


def collate(items: list[dict[str, Any]]) -> Batch:
    return Batch(video=torch.stack([i["video"] for i in items]), index=torch.tensor([i["index"] for i in items]))


def split_of(extracted: dict[str, Tensor], rows: slice, classes: list[str]) -> SplitFeatures:
    """A split of the extracted features: labels cycling through the classes, distinct captions."""
    pooled = {name: value[rows] for name, value in extracted.items() if name != TOKENS}
    n = next(iter(pooled.values())).shape[0]
    labels = torch.arange(n) % len(classes)
    names = [classes[int(c)] for c in labels]
    return SplitFeatures(
        pooled=pooled, tokens=extracted[TOKENS][rows] if TOKENS in extracted else None, labels=labels,
        labelled=torch.ones(n, dtype=torch.bool), captions=[f"a video of {name}, clip {i}" for i, name in enumerate(names)],
        verbs=[name.split(" ", 1)[0] for name in names], nouns=[name.split(" ", 1)[1] for name in names],
    )


# ---------------------------------------------------------------------------------------- (b) fine-tuning
def finetune_costs(recipe_path: str, overrides: list[str], train_step: TrainStep, plugins: Plugins,
                   sizes: dict[str, Any], train_once: Callable[[], None], repeats: int, warmup: int) -> dict[str, Any]:
    """Seconds per ``vlmask finetune`` step and per validation clip, and its default step count.
    Finetune steps alternate with training steps (``train_once``), so that each pair sees the
    same load: ``train_s`` are those training steps, ``paired_ratio`` the median of the pairs'
    ratios."""
    ft = finetune_settings(train_step.recipe)
    extra = [f"model.encoder.drop_path={ft.drop_path}"] if ft.drop_path is not None else []
    recipe = load_recipe(recipe_path, [*overrides, *extra])
    device = train_step.device
    parts = build_components(recipe, plugins, total_steps=steps_without_data(recipe), init=False)
    encoder = parts.encoder
    for module in encoder.modules():  # vlmask.build.set_attention_backends, as vlmask.runs.open_run does
        if isinstance(module, SwitchesAttention):
            module.set_attention_backend(device=device)
    batch_size = ft.batch_size or int(train_step.train_cfg.batch_size)
    seed = int(top_settings(recipe).seed) if ft.seed is None else ft.seed
    classes = sizes["classes"]
    torch.manual_seed(seed)
    model = VideoClassifier(encoder, len(classes), ft.head_init_scale, ft.keep_encoder_norm).to(device)
    optimizer = finetune_optimizer(model, ft, device)
    scaler = torch.amp.GradScaler("cuda", enabled=train_step.precision == "fp16")
    mixing = MixupCutmix(ft.mixup, ft.cutmix, ft.mixup_prob, ft.mixup_switch_prob, ft.label_smoothing, len(classes))
    batch = synthetic_batch(train_step, batch_size, device, seed=1)
    labels = (torch.arange(batch_size) % len(classes)).to(device)
    batches = EpochBatches(sizes["train"], batch_size, seed)
    total = ft.max_steps or max(1, round(ft.epochs * batches.batches_per_epoch))
    warmup_steps = ft.warmup_steps if ft.warmup_steps is not None else round(ft.warmup_epochs * batches.batches_per_epoch)
    step = [0]

    def one_step() -> None:  # the body of vlmask.finetune._finetune's loop, the batch already on the device
        set_group_lrs(optimizer, lr_at(step[0], total, warmup_steps, ft.lr, ft.min_lr, ft.warmup_lr))
        video = batch.video
        if mixing.active:
            video, targets, _ = mixing(video, labels, torch.Generator().manual_seed(seed * 1_000_003 + step[0]))
        else:
            targets = smoothed_targets(labels, len(classes), ft.label_smoothing)
        finetune_step(model, optimizer, scaler, video, targets, train_step.autocast, ft.grad_clip)
        step[0] += 1

    model.train()
    for _ in range(warmup):
        train_once()
        one_step()
    pairs = [(seconds(device, train_once), seconds(device, one_step)) for _ in range(repeats)]
    model.eval()

    @torch.no_grad()
    def validate() -> None:  # vlmask.finetune.evaluate_classifier's forward
        with train_step.autocast():
            model(batch.video)

    val_s = median_seconds(device, validate, repeats, 1) / batch_size
    return {"step_s": statistics.median(f for _, f in pairs), "val_forward_per_clip_s": val_s,
            "train_s": [t for t, _ in pairs], "paired_ratio": statistics.median(f / t for t, f in pairs),
            "batch_size": batch_size, "default_steps": total, "epochs": ft.epochs,
            "batches_per_epoch": batches.batches_per_epoch}


# ---------------------------------------------------------------------------------------- (c)-(e) evaluation
def eval_costs(train_step: TrainStep, plugins: Plugins, sizes: dict[str, Any]) -> dict[str, Any]:
    """Seconds of feature extraction (per clip) and of each default evaluator's fit."""
    recipe, registry = train_step.recipe, plugins.registry
    evaluation = evaluation_settings(recipe, registry)
    evaluators = build_evaluators(evaluation, recipe, registry)
    budgets = [int(e.token_budget) for e in evaluators.values() if isinstance(e, TokenEvaluator)]
    budget = max(budgets) if budgets else None
    device = train_step.device
    clips = sizes["train"] + sizes["val"]
    shape = clip_shape(train_step.grid)

    def extract(n: int) -> dict[str, Tensor]:  # as vlmask.evaluate.run_features calls it, on noise clips
        return extract_features(train_step.student.encoder, NoiseClips(n, shape), collate,
                                batch_size=evaluation.batch_size, num_workers=0, device=device,
                                autocast=train_step.autocast, progress=False, token_budget=budget)

    extract(evaluation.batch_size)  # warm-up
    extracted: dict[str, Tensor] = {}
    features_s = seconds(device, lambda: extracted.update(extract(clips)))
    classes = sizes["classes"]
    text_encoder = train_step.parts.text_encoder
    projection = train_step.student.projection
    with tempfile.TemporaryDirectory() as scratch:
        cache = CaptionEmbeddingCache(Path(scratch))
        _warm_up(text_encoder, cache)

        def project(x: Tensor) -> Tensor:
            with torch.no_grad():
                return projection(x.to(device, torch.float32)).float().cpu()

        features = EvalFeatures(
            train=split_of(extracted, slice(0, sizes["train"]), classes), val=split_of(extracted, slice(sizes["train"], None), classes),
            classes=classes, class_verbs=[c.split(" ", 1)[0] for c in classes], class_nouns=[c.split(" ", 1)[1] for c in classes],
            project=project if projection is not None else None,
            encode_text=(lambda texts: cache.embed(text_encoder, list(texts), progress=False)) if text_encoder is not None else None,
        )
        fits: dict[str, dict[str, Any]] = {}
        for name, evaluator in evaluators.items():
            result: dict[str, Any] = {}
            fit_s = seconds(torch.device("cpu"), lambda: result.update(evaluator.evaluate(features) or {"absent": True}))
            fits[name] = {"evaluator": evaluation.evaluators[name]["name"], "s": fit_s, "computed": "absent" not in result}
            epochs = getattr(evaluator, "epochs", None)
            if isinstance(evaluator, TokenEvaluator) and epochs:
                fits[name].update({"epochs": int(epochs), "per_epoch_s": fit_s / int(epochs)})
    return {"features_s": features_s, "clips": clips, "features_per_clip_s": features_s / clips, "token_budget": budget,
            "evaluation_batch_size": evaluation.batch_size,
            "token_features": list(extracted[TOKENS].shape[1:]) if TOKENS in extracted else None,
            "pooled_dims": {k: int(v.shape[1]) for k, v in extracted.items() if k != TOKENS}, "evaluators": fits}


def _warm_up(text_encoder: Any, cache: CaptionEmbeddingCache) -> None:
    """One-time costs a long-lived process pays once, not per evaluation: the L-BFGS probe's
    first scikit-learn import (seconds) and the text encoder's first call."""
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import threadpoolctl  # noqa: F401

    if text_encoder is not None:
        cache.embed(text_encoder, ["warm-up caption"], progress=False)


# ---------------------------------------------------------------------------------------- report
def ratios(train_s: float, finetune: dict[str, Any], evaluation: dict[str, Any], sizes: dict[str, Any],
           pretraining_steps: int) -> dict[str, Any]:
    """Every cost in training steps (cost / one training step)."""

    def r(value: float) -> float:
        return round(value / train_s, 4)

    evaluators = evaluation["evaluators"]
    table: dict[str, Any] = {
        "finetune_step": r(finetune["step_s"]),
        "finetune_step_paired": round(finetune["paired_ratio"], 4),  # median over alternating pairs
        "finetune_val_forward_per_clip": r(finetune["val_forward_per_clip_s"]),
        "features_per_clip": r(evaluation["features_per_clip_s"]),
    }
    for name, fit in evaluators.items():
        if not fit["computed"]:
            continue
        table[f"{name}_fit"] = r(fit["s"])
        if "per_epoch_s" in fit:
            table[f"{name}_per_epoch"] = r(fit["per_epoch_s"])
            table[f"{name}_100_epochs"] = r(100 * fit["per_epoch_s"])
    finetune_total = finetune["default_steps"] * finetune["step_s"] + sizes["val"] * finetune["val_forward_per_clip_s"]
    eval_fits = sum(fit["s"] for fit in evaluators.values())
    eval_total = evaluation["features_s"] + eval_fits
    totals = {
        "finetune_default": {"training_steps": r(finetune_total), "share_of_pretraining": round(finetune_total / train_s / pretraining_steps, 4),
                             "finetune_steps": finetune["default_steps"], "val_clips": sizes["val"]},
        "eval_default": {"training_steps": r(eval_total), "share_of_pretraining": round(eval_total / train_s / pretraining_steps, 4),
                         "features_training_steps": r(evaluation["features_s"]), "evaluators_training_steps": r(eval_fits),
                         "clips": evaluation["clips"]},
        "pretraining_steps": pretraining_steps,
    }
    return {"per_item": table, "totals": totals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="recipes/fils.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=5, help="timed training / finetune steps (median; default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="The number of unique classes is greater")  # tiny test sets
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    plugins = default_plugins()
    recipe = load_recipe(args.recipe, list(args.overrides))
    sizes = builtin_sizes(recipe)
    started = time.perf_counter()
    with build_step(recipe, plugins, num_classes=SYNTHETIC_CLASSES, manager=run_manager(plugins)) as train_step:
        device = train_step.device
        batch = synthetic_batch(train_step, int(train_step.train_cfg.batch_size), device, seed=train_step.seed)
        step = [0]

        def train_once() -> None:
            train_step.step(batch, step[0])
            step[0] += 1

        train_step.student.train()
        # training steps timed before, between and after the other measurements: the reference is
        # the median of all of them, and the rounds' medians bound it (the load changes meanwhile)
        finetune = finetune_costs(args.recipe, list(args.overrides), train_step, plugins, sizes, train_once,
                                  args.steps, args.warmup)
        rounds = [finetune.pop("train_s")]  # alternating with the finetune steps
        train_step.student.train()
        rounds.append(timings(device, train_once, args.steps, 0))
        evaluation = eval_costs(train_step, plugins, sizes)
        rounds.append(timings(device, train_once, args.steps, 0))
        train_s = statistics.median(t for samples in rounds for t in samples)
        round_medians = [statistics.median(samples) for samples in rounds]
        pretraining = steps_without_data(recipe)
        bounds = [ratios(t, finetune, evaluation, sizes, pretraining) for t in (max(round_medians), min(round_medians))]
        report = {
            "recipe": args.recipe, "overrides": args.overrides, "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "precision": train_step.precision, "torch": str(torch.__version__),
            "data": "synthetic tensors (decoding and augmentation left out of every side)",
            "builtin_set": {"train": sizes["train"], "val": sizes["val"], "classes": len(sizes["classes"])},
            "train_batch_size": int(train_step.train_cfg.batch_size),
            "train_step_s": {"reference": train_s, "round_medians": round_medians, "rounds": rounds},
            "ratios_to_one_training_step": ratios(train_s, finetune, evaluation, sizes, pretraining),
            "ratios_with_the_slowest_and_fastest_round": {"slowest": bounds[0], "fastest": bounds[1]},
            "finetune": finetune, "evaluation": evaluation,
            "note": "absolute seconds on a shared, loaded machine: compare the ratios, not the times",
            "wall_s": round(time.perf_counter() - started, 1),
        }
    out = args.out or RESULTS / f"eval-costs-{Path(args.recipe).stem}-{datetime.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios_to_one_training_step"], indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
