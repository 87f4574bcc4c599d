"""Measure the table of benchmarks/README.md in one process: throughput of the demo recipes
and FLOPs per clip of the paper recipes.

    python benchmarks/cpu_table.py [--steps 10] [--warmup 3] [--threads N] [--out FILE.json] [KEY=VALUE ...]

Overrides (e.g. ``device=cuda``) apply to the demo recipes only. Prints a Markdown table on
stdout and writes every raw result to ``--out`` (default
``benchmarks/results/<device>-<date>.json``). The demo recipes run one after the other in this
process, so their ratios come from one run on the same, equally loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from vlmask.bench import benchmark, count_flops

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPES = ("recipes/mae.yaml", "recipes/mae_clip.yaml", "recipes/fils.yaml")
PAPER_RECIPES = ("recipes/paper/mae.yaml", "recipes/paper/fils.yaml")


def markdown(demo: list[dict[str, Any]], paper: list[dict[str, Any]]) -> str:
    base = demo[0]["clips_per_s"] if demo else None
    lines = [
        "| recipe | scale | clips/s | step ms (median) | relative clips/s | GFLOP/clip (step) "
        "| split ms: fwd / teacher / bwd / optim / EMA |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    phases = ("student_forward", "teacher", "student_backward", "optimizer", "teacher_update")
    for r in demo:
        split = " / ".join(f"{r['split_ms'][k]:.0f}" for k in phases)
        rel = f"{r['clips_per_s'] / base:.2f}" if base else "-"
        cells = [f"`{r['recipe']}`", "demo", f"{r['clips_per_s']:.1f}", f"{r['step_ms']:.0f}", rel,
                 f"{r['gflops_per_clip']:.2f}", split]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for r in paper:
        lines.append(f"| `{r['recipe']}` | paper (ViT-B, 16x224) | - | - | - | {r['gflops_per_clip']:.1f} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # recipe paths are relative to the repository
    started = time.time()
    with redirect_stdout(sys.stderr):  # model loading chatter stays off the table
        demo = [
            benchmark(recipe, args.overrides, steps=args.steps, warmup=args.warmup, threads=args.threads)
            for recipe in DEMO_RECIPES
        ]
        paper = [count_flops(r) for r in PAPER_RECIPES]
    record = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "torch": str(torch.__version__),
        "wall_s": round(time.time() - started, 1),
        "demo": demo,
        "paper": paper,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"{demo[0]['device']}-{datetime.now():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(demo, paper))
    print(f"\nraw results: {out} (load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
