"""How often a run's text-similarity map (``vlmask show similarity``, FILS Figure 4) peaks
inside the clip's action box, against a shuffled-box control.

For every clip of the run's validation manifest (the built-in synthetic set gives the true box
of the moving shape) and every temporal slot: the token whose student feature, projected into
the text space, has the highest cosine with the clip's text (its label, as FILS Figure 4, or
its caption) is inside when its patch centre lies in the clip's box (after the same centre
crop). The control asks the same of another clip's box (a fixed derangement), and ``chance`` is
the mean fraction of token cells inside the boxes. Prints and writes one JSON.

    python benchmarks/similarity_peaks.py RUN_DIR [--text label|caption] \
        --out benchmarks/results/similarity-peaks-DATE.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmask.data_loading import collate_of
from vlmask.evaluate import val_manifest
from vlmask.runs import open_run
from vlmask.show import show_dataset, token_text_cosine
from vlmask_plugins.maskers.geometry import token_centres_inside_box


def derangement(count: int, seed: int = 0) -> torch.Tensor:
    """A fixed permutation of ``count`` items that moves every item."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)
        if count < 2 or not (order == torch.arange(count)).any():
            return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--text", choices=["label", "caption"], default="label")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out")
    args = parser.parse_args()
    run = open_run(args.run_dir)
    manifest = val_manifest(run)
    dataset = show_dataset(run, manifest)
    texts = list(dataset.labels if args.text == "label" else dataset.captions)
    grid = run.parts.grid
    peaks, boxes = [], []
    for start in range(0, len(dataset), args.batch):
        rows = range(start, min(start + args.batch, len(dataset)))
        batch = collate_of(dataset)([dataset[r] for r in rows]).to(run.device)
        cosine = token_text_cosine(run, batch.video, [texts[r] for r in rows])  # (B, N)
        peaks.append(cosine.view(len(rows), grid.t, grid.spatial).argmax(dim=-1).cpu())  # (B, t)
        boxes.append(batch.action_box.cpu())
    peak, box = torch.cat(peaks), torch.cat(boxes)
    keep = ~torch.isnan(box).any(dim=1)
    peak, box = peak[keep], box[keep]
    inside = token_centres_inside_box(grid, box)  # (C, h*w): ActCLIP's own inside test
    control = inside[derangement(len(box))]
    result = {
        "run_dir": str(args.run_dir), "checkpoint": str(run.checkpoint.relative_to(run.run_dir)),
        "recipe": run.recipe.get("record.recipe"), "overrides": list(run.recipe.get("record.overrides") or []),
        "git_commit": run.recipe.get("record.git_commit"),
        "manifest": str(manifest), "clips": int(keep.sum()), "slots_per_clip": grid.t, "text": args.text,
        "grid": f"{grid.t}x{grid.h}x{grid.w}",
        "peak_inside_box": float(torch.gather(inside, 1, peak).float().mean()),
        "peak_inside_shuffled_box": float(torch.gather(control, 1, peak).float().mean()),
        "chance_cells_inside_box": float(inside.float().mean()),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
