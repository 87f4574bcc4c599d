"""Linear probes on the same frozen features: the Adam probe (``LinearProbe``) against L-BFGS
logistic regression with C chosen on held-out clips (``LogisticRegressionProbe``).

Features: ``--dim`` x ``--train`` training and ``--val`` validation vectors of ``--classes``
Gaussian classes (class means drawn N(0, 1), per-clip noise N(0, ``--noise``^2) on every
dimension plus a shared random low-rank nuisance), i.e. the shape of the built-in set's
features (900 x 384, 31 classes) with an accuracy well below 100% so that the probes can
differ. Each seed draws new features; both probes see the same ones. Prints and writes one JSON.

    python benchmarks/linear_probe.py --seeds 0,1,2 --threads 1 --out benchmarks/results/linear-probe-DATE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vlmask_plugins.evaluation import EvalFeatures, LinearProbe, SplitFeatures
from vlmask_plugins.evaluation.classification import LogisticRegressionProbe


def features(seed: int, train: int, val: int, dim: int, classes: int, noise: float) -> EvalFeatures:
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=generator)
    nuisance = torch.randn(8, dim, generator=generator) * 3.0

    def draw(n: int) -> SplitFeatures:
        labels = torch.arange(n) % classes
        x = means[labels] + noise * torch.randn(n, dim, generator=generator)
        x = x + torch.randn(n, 8, generator=generator) @ nuisance
        return SplitFeatures(pooled={"mean": x}, labels=labels, labelled=torch.ones(n, dtype=torch.bool),
                             captions=[""] * n, verbs=[None] * n, nouns=[None] * n)

    return EvalFeatures(train=draw(train), val=draw(val), classes=[f"c{i}" for i in range(classes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=900)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=31)
    parser.add_argument("--noise", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probes = {
        "adam (LinearProbe, defaults)": lambda: LinearProbe(device="cpu"),
        "lbfgs (LogisticRegressionProbe, defaults)": lambda: LogisticRegressionProbe(),
    }
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        data = features(seed, args.train, args.val, args.dim, args.classes, args.noise)
        for name, make in probes.items():
            probe = make()
            start = time.perf_counter()
            result = probe.evaluate(data)
            seconds = time.perf_counter() - start
            row = {"probe": name, "seed": seed, "seconds": round(seconds, 3), "top1": result["top1"]}
            if getattr(probe, "chosen_c", None) is not None:
                row["chosen_c"] = probe.chosen_c
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for name in probes:
        mine = [r for r in rows if r["probe"] == name]
        summary[name] = {"seconds_median": statistics.median(r["seconds"] for r in mine),
                         "top1_mean": statistics.fmean(r["top1"] for r in mine)}
    report = {"settings": vars(args), "machine": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "rows": rows, "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
