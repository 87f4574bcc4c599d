"""Stages (vlmask.stages): validated keys, what a stage changes, and a run killed (SIGKILL) in
the middle of stage 2 that resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmask.checkpoint import latest_checkpoint, load_tensors
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.plugins import default_plugins
from vlmask.schema import validate

RECIPES = Path(__file__).parents[2] / "recipes"

STAGED = f"""base: [{RECIPES / 'mae.yaml'}]
train: {{max_steps: null}}
stages:
  - {{name: warm, steps: 3, freeze: [encoder], overrides: {{loss_weights.pixels: 2.0}}}}
  - {{name: all, steps: 4}}
"""


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED)
    return path


@pytest.fixture
def overrides(tiny_synth, tiny_scale):
    def make(run_dir: Path) -> list[str]:
        return [*tiny_scale, f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", "train.log_every=1",
                "train.ckpt_every=5"]

    return make


def problems(path: Path, *extra: str) -> list[str]:
    return validate(load_recipe(path, list(extra)), default_plugins().registry)


def test_validate_checks_every_stage_key(staged):
    assert problems(staged) == []
    assert any("stages.1.steps: must be an integer >= 1, got 0" in p for p in problems(staged, "stages.1.steps=0"))
    assert any("stages.0.overrides.loss_weights.pxiels: no loss term 'pxiels'" in p
               for p in problems(staged, "stages.0.overrides.loss_weights.pxiels=1.0"))
    [p] = problems(staged, "stages.0.overrides.masker.ratio=0.5")
    assert "masker 'tube' cannot change 'ratio' between steps" in p
    [p] = problems(staged, "stages.0.overrides.model.encoder.depth=3")
    assert "anything else needs a rebuild" in p
    [p] = problems(staged, "train.max_steps=9")
    assert "key train.max_steps: 9 is more than the stages" in p and "(7 steps)" in p
    assert problems(staged, "train.max_steps=2") == []  # a short run stops inside the stages
    assert any("stages.0.colour: unknown" in p for p in problems(staged, "stages.0.colour=red"))


def test_a_stage_freezes_and_reweights_then_hands_over(staged, overrides, tmp_path):
    with Trainer(load_recipe(staged, overrides(tmp_path / "run"))) as trainer:
        assert trainer.total_steps == 7
        train_step = trainer.train_step
        encoder0 = {k: v.clone() for k, v in train_step.student.encoder.state_dict().items()}
        predictor0 = {k: v.clone() for k, v in train_step.student.predictor.state_dict().items()}
        batches = iter(trainer.data.loader)
        for step in range(3):
            train_step.step(trainer.prepare(next(batches)), step)
            assert train_step.loss_weights == {"pixels": 2.0}
        assert all(torch.equal(v, train_step.student.encoder.state_dict()[k]) for k, v in encoder0.items())
        assert not torch.equal(predictor0["head.weight"], train_step.student.predictor.state_dict()["head.weight"])
        train_step.step(trainer.prepare(next(batches)), 3)
        assert train_step.loss_weights == {"pixels": 1.0}
        qkv = "blocks.0.attn.qkv.weight"
        assert not torch.equal(encoder0[qkv], train_step.student.encoder.state_dict()[qkv])




def final_student(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_00000007"
    return load_tensors(checkpoint / "student.safetensors")


def killed_and_resumed(script: str, recipe: Path, overrides: list[str], run_dir: Path, kill_at: int) -> None:
    """Run ``recipe`` in a subprocess SIGKILLed right after the checkpoint of ``kill_at``, then resume it."""
    env = {**os.environ, "KILL_AT": str(kill_at)}
    killed = subprocess.run([sys.executable, "-c", script, str(recipe), *overrides], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run_dir / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "vlmask", "run", str(recipe), *overrides], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 5" in resumed.stdout + resumed.stderr


def test_a_run_killed_mid_stage_two_resumes_exactly(kill_at_checkpoint, staged, overrides, tmp_path):
    with Trainer(load_recipe(staged, overrides(tmp_path / "a"))) as trainer:
        trainer.train()
    killed_and_resumed(kill_at_checkpoint, staged, overrides(tmp_path / "b"), tmp_path / "b", kill_at=5)  # stage 2 is steps 3..6
    uninterrupted, resumed = final_student(tmp_path / "a"), final_student(tmp_path / "b")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
