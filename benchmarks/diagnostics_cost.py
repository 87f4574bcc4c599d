"""Cost of the training diagnostics (vlmask.diagnostics) per call against one training step.

Builds the recipe at its own scale (no data: synthetic tensors, as ``vlmask bench``), times
``TrainStep.step`` (median of ``--steps`` after 2 warm-up steps), then times
``training_diagnostics`` on the tensors a log step would pass: the student encoder's output on
the visible tokens of the step's mask (B, Nv, D) and the EMA teacher's on all tokens (B, N, D)
(both computed once, outside the timing). Prints and writes one JSON.

    python benchmarks/diagnostics_cost.py recipes/fils.yaml --threads 1 --out benchmarks/results/diagnostics-cost-DATE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vlmask.bench import synthetic_batch
from vlmask.config import load_recipe
from vlmask.diagnostics import training_diagnostics
from vlmask.plugins import default_plugins
from vlmask.step import build_step


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_step = build_step(load_recipe(args.recipe, [*args.overrides, "device=cpu"]), default_plugins())
    try:
        batch = synthetic_batch(train_step, train_step.train_cfg.batch_size, train_step.device)
        for step in range(2):
            train_step.step(batch, step)
        step_ms = median_ms(lambda: train_step.step(batch, 2), args.steps)
        with torch.no_grad():
            mask = train_step.masker(batch, train_step.grid, train_step.mask_generator(0))
            student = train_step.student.encoder(batch.video, mask.visible)  # (B, Nv, D): what the step encodes
            teacher = train_step.teacher(batch.video) if train_step.teacher is not None else None  # (B, N, D)
        training_diagnostics(student, teacher)
        diag_ms = median_ms(lambda: training_diagnostics(student, teacher), args.calls)
        student_only_ms = median_ms(lambda: training_diagnostics(student), args.calls)
        log_every = train_step.train_cfg.log_every
        report = {
            "recipe": args.recipe, "overrides": args.overrides, "threads": torch.get_num_threads(),
            "batch_size": train_step.train_cfg.batch_size, "student_tokens": list(student.shape),
            "teacher_tokens": list(teacher.shape) if teacher is not None else None,
            "train_step_ms": round(step_ms, 2), "diagnostics_ms": round(diag_ms, 3),
            "diagnostics_student_only_ms": round(student_only_ms, 3),
            "fraction_of_a_step": round(diag_ms / step_ms, 5), "log_every": log_every,
            "overhead_at_log_every": round(diag_ms / (step_ms * log_every), 5),
        }
    finally:
        train_step.close()
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
