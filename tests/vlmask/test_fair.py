"""Fair by construction: at equal seed, two recipes see the same clips in the same order with the
same crops, and recipes with the same masker draw the same masks (captured step by step from
``Trainer.train_step`` and the masker it calls)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmask.config import load_recipe
from vlmask.engine import Trainer

RECIPES = Path(__file__).parents[2] / "recipes"
STEPS = 4


def record(recipe: Path, run_dir: Path, data: tuple[Path, Path], scale: list[str], seed: int = 0,
           extra: tuple[str, ...] = ()) -> list[dict[str, torch.Tensor]]:
    """Train ``STEPS`` steps; return, per step, the batch (clip indices, pixels) the step got and
    the mask the masker drew for it."""
    overrides = [*scale, f"data.train={data[0]}", f"train.max_steps={STEPS}", "train.log_every=1",
                 f"train.ckpt_every={STEPS}", f"seed={seed}", f"run.dir={run_dir}", *extra]
    if load_recipe(recipe, []).get("model.predictor") is None:
        overrides = [o for o in overrides if not o.startswith("model.predictor.")]
    trainer = Trainer(load_recipe(recipe, overrides))
    steps: list[dict[str, torch.Tensor]] = []
    train_step, masker = trainer.train_step.step, trainer.train_step.masker

    def recording_masker(batch, grid, generator=None):
        mask = masker(batch, grid, generator)
        steps[-1]["visible"], steps[-1]["predict"] = mask.visible.clone(), mask.predict.clone()
        return mask

    def recording_step(batch, step):
        steps.append({"index": batch.index.clone(), "video": batch.video.clone()})
        return train_step(batch, step)

    trainer.train_step.step, trainer.train_step.masker = recording_step, recording_masker  # shadow the method
    try:
        trainer.train()
    finally:
        trainer.close()
    assert len(steps) == STEPS
    return steps


def test_two_recipes_at_equal_seed_see_the_same_clips_crops_and_masks(tiny_synth, tiny_scale, tmp_path, isolated_cache):
    mae = record(RECIPES / "mae.yaml", tmp_path / "mae", tiny_synth, tiny_scale)
    fils = record(RECIPES / "fils.yaml", tmp_path / "fils", tiny_synth, tiny_scale)  # EMA teacher, text encoder, heads
    for step, (a, b) in enumerate(zip(mae, fils)):
        assert torch.equal(a["index"], b["index"]), f"step {step}: other clips"
        assert torch.equal(a["video"], b["video"]), f"step {step}: other pixels (crops, frames)"
        assert torch.equal(a["visible"], b["visible"]) and torch.equal(a["predict"], b["predict"]), f"step {step}: other masks"
    # the recording can see a difference: another seed changes the clips, another masker the masks
    other_seed = record(RECIPES / "mae.yaml", tmp_path / "mae-seed1", tiny_synth, tiny_scale, seed=1)
    assert not all(torch.equal(a["index"], b["index"]) for a, b in zip(mae, other_seed))
    other_masker = record(RECIPES / "mae.yaml", tmp_path / "mae-random", tiny_synth, tiny_scale,
                          extra=("masker.ratio=0.5",))
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(mae, other_masker))
    assert not any(torch.equal(a["visible"], b["visible"]) for a, b in zip(mae, other_masker))
