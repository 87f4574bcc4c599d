"""Does fine-tuning fit its own training clips? (issue 18: at demo scale every fine-tuning setting
tried so far ends near chance on the validation clips; this tells under-fitting from a label or
data defect.)

For each run and setting: fine-tune a copy of the run (``vlmask.finetune.finetune_run``, the run
directory itself is not written), then classify the TRAINING clips and the validation clips with
evaluation transforms (centre crop) and report top-1 on both, how many distinct classes the
model predicts, and the training loss at the start and at the end. A model that predicts its own
training clips near chance under-fits (the optimisation, not the data, is what fails); a label
mismatch would show train top-1 near chance too, so it also checks that every training batch's
labels are the dataset's labels of the clips it holds (``labels_aligned``).

    python benchmarks/finetune_fit.py RUN_DIR [RUN_DIR ...] --set "finetune.lr=1e-4" --set "" \
        --out benchmarks/results/finetune-fit-DATE.json

``--set`` takes space-separated ``finetune.*`` overrides ("" = the defaults); results are appended
to ``--out`` after every fine-tuning, and a (run, setting) already there is skipped.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vlmask.data_loading import collate_of
from vlmask.evaluate import eval_dataset, val_manifest
from vlmask.data_loading import EpochBatches, SeededItems, infinite
from vlmask.finetune import _load_pretrained, _Rows, finetune_dataset, finetune_run, load_finetuned
from vlmask.runs import open_run
from vlmask.sections import FinetuneSettings


@torch.no_grad()
def top1_and_predictions(model: torch.nn.Module, dataset, batch_size: int = 32) -> tuple[float, int]:
    """Top-1 over the labelled clips of ``dataset`` and the number of distinct predicted classes."""
    model.eval()
    hits, total, predicted = 0, 0, collections.Counter()
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_of(dataset)):
        guesses = model(batch.to("cpu").video).argmax(-1)
        labelled = batch.label >= 0
        hits += int((guesses[labelled] == batch.label[labelled]).sum())
        total += int(labelled.sum())
        predicted.update(guesses.tolist())
    return hits / max(total, 1), len(predicted)


def labels_aligned(run: Path, batches: int = 5) -> bool:
    """The first ``batches`` batches of fine-tuning's own training loader (as vlmask.finetune
    builds it: labelled rows, seeded order, augmentation) carry, for every clip, the dataset's
    label of that clip (``batch.index`` is the dataset row)."""
    opened = _load_pretrained(run, [], None)
    dataset = finetune_dataset(opened, FinetuneSettings(), list(opened.train_set.classes))
    rows = [i for i, label in enumerate(dataset.label_ids) if label >= 0]
    order = EpochBatches(len(rows), 16, 0)
    loader = DataLoader(SeededItems(_Rows(dataset, rows)), batch_sampler=order, collate_fn=collate_of(dataset))
    stream = infinite(loader, order, 0, 0)
    for _ in range(batches):
        batch = next(stream)
        if [dataset.label_ids[i] for i in batch.index.tolist()] != batch.label.tolist():
            return False
    return True


def fit(run: Path, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("finetune*", "features", "eval*.json"))
        start = time.perf_counter()
        result = finetune_run(copy, overrides, progress=False)
        seconds = time.perf_counter() - start
        model, _ = load_finetuned(copy)
        opened = open_run(copy)
        train_top1, train_classes = top1_and_predictions(model, eval_dataset(opened, opened.train_manifest))
        val_top1, val_classes = top1_and_predictions(model, eval_dataset(opened, val_manifest(opened)))
    losses = [row["loss"] for row in result["history"]]
    return {"run": str(run), "overrides": overrides, "seconds": round(seconds, 1), "steps": result["steps"],
            "labels_aligned": labels_aligned(run),
            "chance_top1": result["chance_top1"], "train_top1": train_top1, "val_top1": val_top1,
            "finetune_json_top1": result.get("top1"), "verb_top1": result.get("verb_top1"),
            "noun_top1": result.get("noun_top1"), "train_predicted_classes": train_classes,
            "val_predicted_classes": val_classes, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--set", dest="settings", action="append", default=None,
                        help='space-separated finetune.* overrides; "" = defaults (repeatable)')
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    done = {(row["run"], tuple(row["overrides"])) for row in results["rows"]}
    for text in args.settings or [""]:
        overrides = shlex.split(text)
        for run in args.runs:
            if (str(run), tuple(overrides)) in done:
                continue
            row = fit(run, overrides)
            results["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
