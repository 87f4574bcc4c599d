"""Every shipped recipe trains a few steps at tiny scale, with every loss term finite and logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlmask.config import load_recipe
from vlmask.engine import Trainer

RECIPES = Path(__file__).parents[2] / "recipes"
SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml") if "base" not in p.relative_to(RECIPES).parts and "paper" not in p.relative_to(RECIPES).parts)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from vlmask_plugins.data.synthetic import generate

    train, _ = generate(tmp_path_factory.mktemp("synth"), clips=16, seed=3, frames=8, size=32, progress=False)
    return train


def tiny(recipe_path: Path, data: Path, run_dir: Path, steps: int = 2) -> list[str]:
    """Overrides that shrink any shipped recipe to seconds on a CPU."""
    base = load_recipe(recipe_path)
    overrides = [
        f"data.train={data}", f"run.dir={run_dir}", f"train.max_steps={steps}", "train.batch_size=4",
        "train.log_every=1", f"train.ckpt_every={steps}", "data.num_workers=0", "data.dataset.num_frames=8",
        "data.dataset.size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
        "optim.warmup_steps=1", "device=cpu",
    ]
    if base.get("model.predictor"):
        overrides += ["model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.num_heads=2"]
    return overrides


@pytest.mark.parametrize("recipe_path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_trains_at_tiny_scale(recipe_path, tiny_data, tmp_path, isolated_cache):
    recipe = load_recipe(recipe_path, tiny(recipe_path, tiny_data, tmp_path / "run"))
    with Trainer(recipe) as trainer:
        trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {k for k, v in recipe.get("loss_weights").items() if v is not None}
    assert len(metrics) == 2
    for row in metrics:
        assert terms <= set(row), f"every loss term is logged: {sorted(terms - set(row))} missing"
        assert all(math.isfinite(row[t]) for t in terms | {"loss"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe_path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_train_step_waits_for_the_gpu_nowhere(recipe_path, tiny_data, tmp_path, isolated_cache):
    """No host-device synchronisation inside a training step (``.item()``, ``nonzero``, a
    Python ``if`` on a tensor ...): CUDA's sync debug mode turns any into an error."""
    overrides = [o for o in tiny(recipe_path, tiny_data, tmp_path / "run") if o != "device=cpu"] + ["device=cuda"]
    with Trainer(load_recipe(recipe_path, overrides)) as trainer:
        batch = trainer.prepare(next(iter(trainer.data.loader)))
        trainer.train_step.step(batch, 0)  # lazy initialisation (cuBLAS handles, optimizer state) may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step.step(batch, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
