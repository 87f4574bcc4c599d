"""``open_run`` reopens a run strictly and reads only; ``Trainer`` keeps its components to
its own plugin manager; ``build_components`` builds the parts without a device or a hook."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmask.build import Components, build_components
from vlmask.checkpoint import CheckpointError
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.evaluate import evaluate_run
from vlmask.plugins import default_plugins
from vlmask.runs import open_run

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def interrupted_run(tiny_synth, tiny_scale, tmp_path_factory) -> Path:
    """A 3-step MAE run whose last checkpoint was lost: metrics.jsonl has a line (step 3)
    after the latest checkpoint (step 2), as after a crash."""
    run_dir = tmp_path_factory.mktemp("runs") / "mae"
    overrides = [*tiny_scale, f"data.train={tiny_synth[0]}", f"data.val={tiny_synth[1]}", f"run.dir={run_dir}",
                 "train.max_steps=3", "train.log_every=1", "train.ckpt_every=2", "train.keep_checkpoints=3"]
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        trainer.train()
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    (run_dir / "checkpoints" / "latest").write_text(json.dumps({"step": 2, "path": "step_00000002"}))
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_leaves_every_file_of_the_run_byte_identical(interrupted_run):
    before = snapshot(interrupted_run)
    assert [json.loads(line)["step"] for line in (interrupted_run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    evaluate_run(interrupted_run, ["evaluation.evaluators={knn: {name: knn, k: 3}}"], progress=False)
    after = snapshot(interrupted_run)
    assert {k: v for k, v in after.items() if k in before} == before  # metrics.jsonl keeps its step-3 line
    added = set(after) - set(before)
    assert "eval.json" in added and all(k == "eval.json" or k.startswith("features/") for k in added), sorted(added)


def test_open_run_loads_the_latest_checkpoint_strictly_and_registers_nothing(interrupted_run, tmp_path):
    manager = default_plugins().manager
    plugins_before = set(manager.get_plugins())
    run = open_run(interrupted_run, ["device=cpu"])
    assert manager.get_plugins() == plugins_before
    assert run.checkpoint.name == "step_00000002"
    saved = load_file(str(run.checkpoint / "student.safetensors"))
    for name, value in run.student.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert not run.student.training

    broken = tmp_path / "broken"
    shutil.copytree(interrupted_run, broken)
    weights = broken / "checkpoints" / "step_00000002" / "student.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "encoder.extra": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match="unexpected: encoder.extra"):
        open_run(broken, ["device=cpu"])


def test_a_trainer_keeps_its_components_to_its_own_plugin_manager(tiny_synth, tiny_scale, tmp_path):
    process_wide = default_plugins().manager
    before = set(process_wide.get_plugins())
    recipe = load_recipe(RECIPES / "fils.yaml", [*tiny_scale, f"data.train={tiny_synth[0]}", f"run.dir={tmp_path / 'r'}",
                                                 "train.max_steps=1"])
    with Trainer(recipe) as trainer:
        step = trainer.train_step
        own = step.manager.get_plugins()
        assert step.masker in own and step.teacher in own and all(o in own for o in step.student.objectives.values())
        assert set(before) <= set(own)  # the process's loaded plugins answer this run's hooks too
        assert process_wide.get_plugins() == before  # nothing of the run leaks into the process-wide manager
    assert not any(step.manager.is_registered(p) for p in step.parts.hook_parts().values())


def test_build_components_builds_every_part_on_the_cpu_without_touching_the_callers_random_state(tiny_scale):
    recipe = load_recipe(RECIPES / "fils.yaml", list(tiny_scale))
    state = torch.random.get_rng_state()
    parts = build_components(recipe, default_plugins(), total_steps=10)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(parts, Components)
    with pytest.raises(AttributeError):
        parts.teacher = None  # frozen
    assert set(parts.objectives) == set(parts.loss_weights)
    assert parts.teacher is not None and parts.projection is not None and parts.text_encoder is not None
    assert all(p.device.type == "cpu" for p in parts.student.parameters())
    again = build_components(recipe, default_plugins(), total_steps=10)
    for (name, a), b in zip(parts.student.state_dict().items(), again.student.state_dict().values()):
        assert torch.equal(a, b), f"{name}: the recipe's seed makes the same initial model"
