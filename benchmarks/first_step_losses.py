"""The first training steps of every shipped recipe, to the last digit: a refactoring of the
engine must not change a number.

    python benchmarks/first_step_losses.py [--steps 2] [--out FILE.json] [--compare BEFORE.json] [RECIPE ...]

For every recipe under ``recipes/`` (recursively, ``base/`` excluded) it trains ``--steps``
steps at tiny scale on the CPU with the recipe's fixed seed (``vlmask.engine.Trainer``, the
path ``vlmask run`` takes: data loader, placement, optimizer, stages, after-step work,
checkpoint) on a tiny synthetic set made with a fixed seed, and records:

- ``steps``: every value the run logged at each step (``metrics.jsonl`` with ``log_every=1``:
  the loss, every term and its statistics, ``grad_norm``, ``lr``, the feature diagnostics),
  floats as ``repr`` (all 17 significant digits); ``clips_per_s`` (a timing) is left out;
- ``checkpoint``: the sha256 of each file of the last checkpoint (the weights after the
  after-step work, e.g. the EMA teacher); for ``state.pt`` that of its content without the
  run's clock (``wall_s``, ``clips_per_s``): the optimizer and RNG state, the last loss;
- ``gflops_per_clip`` and ``flops_breakdown``: ``vlmask.bench.count_flops`` at the same scale;
- ``rehearsal``: the problems ``vlmask.rehearsal.rehearse`` finds (an empty list).

The paper recipes (ViT-B) run with their encoder swapped for the same ``video_vit`` at tiny
width (``model.encoder.name=video_vit``), everything else as written (bf16 autocast, no
gradient clipping, epochs). ``--compare BEFORE.json`` exits 1 naming every value that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def shipped() -> list[Path]:
    return sorted(p for p in RECIPES.rglob("*.yaml") if "base" not in p.relative_to(RECIPES).parts)


def tiny(recipe_path: Path, data: Path, run_dir: Path, steps: int) -> list[str]:
    """Overrides that shrink any shipped recipe to seconds on a CPU (those of tests/recipes)."""
    from vlmask.config import load_recipe

    base = load_recipe(recipe_path)
    overrides = [
        f"data.train={data}", f"run.dir={run_dir}", f"train.max_steps={steps}", "train.batch_size=4",
        "train.log_every=1", f"train.ckpt_every={steps}", "data.num_workers=0", "data.dataset.num_frames=8",
        "data.dataset.size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
        "optim.warmup_steps=1", "device=cpu",
    ]
    if base.get("model.encoder.name") != "video_vit":
        overrides += ["model.encoder.name=video_vit", "model.encoder.patch=8"]
    if base.get("model.predictor"):
        overrides += ["model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.num_heads=2"]
    return overrides


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: ``state.pt`` entries that are timings (the run's clock, kept for a resume): never compared.
TIMINGS = ("wall_s", "clips_per_s")


def state_digest(path: Path) -> str:
    """sha256 of ``state.pt``'s content without its timings: every tensor's bytes and every
    other value's repr, by key (the file's own bytes hold the wall clock, different every run)."""
    import torch

    digest = hashlib.sha256()

    def feed(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                if not (key == "" and k in TIMINGS):
                    feed(value[k], f"{key}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(v, f"{key}[{i}]")
        elif isinstance(value, torch.Tensor):
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}:".encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{key}={value!r};".encode())

    feed(torch.load(path, map_location="cpu", weights_only=True), "")
    return digest.hexdigest()


def exact(value: Any) -> Any:
    """Floats as their repr (every digit), the rest as it is."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact(v) for v in value]
    return value


def one_recipe(recipe_path: Path, data: Path, work: Path, steps: int) -> dict[str, Any]:
    import torch

    from vlmask.bench import count_flops
    from vlmask.config import load_recipe
    from vlmask.engine import Trainer
    from vlmask.plugins import default_plugins
    from vlmask.rehearsal import rehearse

    run_dir = work / recipe_path.relative_to(RECIPES).with_suffix("").as_posix().replace("/", "-")
    overrides = tiny(recipe_path, data, run_dir, steps)
    record: dict[str, Any] = {"overrides": overrides[2:]}  # data.train and run.dir are temporary paths
    recipe = load_recipe(recipe_path, overrides)
    with Trainer(recipe) as trainer:
        trainer.train()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record["steps"] = [exact({k: v for k, v in row.items() if k != "clips_per_s"}) for row in rows]
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    record["checkpoint"] = {p.name: sha256(p) for p in sorted(last.iterdir()) if p.is_file() and p.name != "state.pt"}
    record["checkpoint"]["state.pt"] = state_digest(last / "state.pt")
    with torch.random.fork_rng(devices=[]):
        flops = count_flops(recipe_path, [o for o in overrides if not o.startswith("run.dir=")])
    record["gflops_per_clip"] = exact(flops["flops_per_clip"] / 1e9)
    record["flops_breakdown"] = exact(flops["breakdown"])
    record["rehearsal"] = rehearse(load_recipe(recipe_path, overrides), default_plugins())
    return record


def differences(before: Any, after: Any, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out = [f"{where}.{k}: only before" for k in before if k not in after]
        out += [f"{where}.{k}: only after" for k in after if k not in before]
        for k in before:
            if k in after:
                out += differences(before[k], after[k], f"{where}.{k}")
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{where}[{i}]")]
    return [] if before == after else [f"{where}: {before!r} -> {after!r}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="default: every shipped recipe")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compare", type=Path, default=None, help="a JSON file written before: every value must match")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the same reductions every time
    recipes = [p.resolve() for p in args.recipes] or shipped()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        os.environ["VLMASK_CACHE"] = str(work / "cache")
        from vlmask_plugins.data.synthetic import generate

        data, _ = generate(work / "synth", clips=16, seed=3, frames=8, size=32, progress=False)
        record: dict[str, Any] = {"torch": torch.__version__, "steps": args.steps, "recipes": {}}
        for path in recipes:
            name = str(path.relative_to(RECIPES))
            print(f"{name} ...", file=sys.stderr, flush=True)
            record["recipes"][name] = one_recipe(path, data, work / "runs", args.steps)
    text = json.dumps(record, indent=1) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    if args.compare is not None:
        before = json.loads(args.compare.read_text())
        if args.recipes:  # a subset: compare those recipes only
            before["recipes"] = {k: v for k, v in before["recipes"].items() if k in record["recipes"]}
        diffs = differences(before, record)
        for line in diffs:
            print(f"differs: {line}", file=sys.stderr)
        print(f"{len(record['recipes'])} recipes, {len(diffs)} differences from {args.compare}", file=sys.stderr)
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
