"""Score action-area detectors against the synthetic set's true boxes.

``python -m vlmask_plugins.action_area.measure --clips 60`` generates a synthetic set
(:func:`vlmask_plugins.data.synthetic.generate`: real H.264 clips whose ``action_box`` is the
union over frames of the acting object's bounding box, ``camera_pan`` true in about 30% of
them), runs each method of :class:`~vlmask_plugins.action_area.flow.FlowActionArea` (MoFo's
action area, Ahmadian, Guerin & Gilbert 2023) through ``detect_file`` (decoding included) and prints one JSON
object: per method, the mean IoU with the true box on clips without and with a camera pan, the
share of clips at IoU >= 0.5, fallbacks, the mean signed error of each box edge in pixels
(negative x0/y0 or positive x1/y1: the box is too large on that side) and seconds per clip on
one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmask_plugins.action_area.flow import FlowActionArea

#: (row name, constructor arguments) of the methods compared; the default comes first.
METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dominant+intensity (default)", {}),
    ("none+intensity", {"camera": "none"}),
    ("dominant+flow", {"evidence": "flow"}),
    ("none+flow", {"camera": "none", "evidence": "flow"}),
    ("boundaries+flow", {"camera": "boundaries", "evidence": "flow"}),
    ("dominant+flow, no intensity gate", {"evidence": "flow", "min_intensity": 0.0}),
    ("none+flow, no intensity gate (plain flow magnitude)", {"camera": "none", "evidence": "flow", "min_intensity": 0.0}),
)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes.

    >>> box_iou([0, 0, 0.5, 1], [0.25, 0, 0.75, 1])
    0.3333333333333333
    """
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def read_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``train.jsonl`` and ``val.jsonl`` of a synthetic set, ``video`` made absolute."""
    rows = []
    for name in ("train.jsonl", "val.jsonl"):
        for text in (data_dir / name).read_text(encoding="utf-8").splitlines():
            if text.strip():
                row = json.loads(text)
                row["video"] = str(data_dir / row["video"])
                rows.append(row)
    return rows


def score(detector: FlowActionArea, rows: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """The scores of one detector over rows with true ``action_box`` and ``camera_pan``."""
    ious: dict[bool, list[float]] = {False: [], True: []}
    errors, fallbacks = [], 0
    started = time.perf_counter()
    for row in rows:
        area = detector.detect_file_area(row["video"])
        fallbacks += area.fallback
        ious[bool(row["camera_pan"])].append(box_iou(area.box, row["action_box"]))
        errors.append(np.subtract(area.box, row["action_box"]) * size)
    seconds = (time.perf_counter() - started) / max(1, len(rows))
    every = ious[False] + ious[True]

    def mean(values: list[float]) -> float | None:
        return round(float(np.mean(values)), 3) if values else None

    return {
        "iou_no_pan": mean(ious[False]), "iou_pan": mean(ious[True]), "iou_all": mean(every),
        "share_iou_at_least_0.5": mean([float(v >= 0.5) for v in every]),
        "clips_no_pan": len(ious[False]), "clips_pan": len(ious[True]), "fallbacks": fallbacks,
        "edge_error_px_x0_y0_x1_y1": [round(float(v), 2) for v in np.mean(errors, axis=0)],
        "seconds_per_clip": round(seconds, 4),
    }


def measure(clips: int = 60, seed: int = 0, frames: int = 16, size: int = 64, data_dir: Path | None = None,
            methods: Sequence[tuple[str, dict[str, Any]]] = METHODS) -> dict[str, Any]:
    """Generate the set (unless ``data_dir`` holds one), score every method, return the table."""
    import cv2

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="vlmask-action-area-") as scratch:
        root = Path(data_dir) if data_dir is not None else Path(scratch)
        if not (root / "train.jsonl").is_file():
            from vlmask_plugins.data.synthetic import generate

            generate(root, clips=clips, seed=seed, frames=frames, size=size, progress=False)
        rows = read_rows(root)
        table = {name: score(FlowActionArea(**kwargs), rows, size) for name, kwargs in methods}
    return {
        "data": {"clips": len(rows), "pan_clips": sum(bool(r["camera_pan"]) for r in rows), "seed": seed,
                 "frames": frames, "size": size},
        "defaults": FlowActionArea().params(),
        "methods": table,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=None,
                        help="a synthetic set folder to use (or write into) instead of a temporary one")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.clips, args.seed, args.frames, args.size, args.data), indent=2))


if __name__ == "__main__":
    main()
