"""The engine end to end at tiny scale: run directory contract, hooks, resume, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmask import hookimpl
from vlmask.checkpoint import CheckpointError, latest_checkpoint
from vlmask.config import RecipeError, load_recipe
from vlmask.engine import Trainer, lr_at, weighted_sum
from vlmask.plugins import load_plugins

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture
def tiny_overrides(tiny_synth, tiny_scale):
    def overrides(run_dir: Path, steps: int = 6, workers: int = 0) -> list[str]:
        return [*tiny_scale, f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", f"train.max_steps={steps}",
                "train.log_every=2", "train.ckpt_every=3", f"data.num_workers={workers}"]

    return overrides


def test_run_writes_the_contract_run_directory(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    with Trainer(load_recipe(RECIPES / "mae.yaml", tiny_overrides(run_dir))) as trainer:
        summary = trainer.train()
    config = (run_dir / "config.yaml").read_text()
    assert "versions:" in config and "torch:" in config and "vlmask" in config
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6]
    assert {"step", "loss", "pixels", "lr", "clips_per_s"} <= set(lines[0])
    saved = json.loads((run_dir / "summary.json").read_text())
    assert {"steps", "wall_s", "final_loss", "clips_per_s", "peak_mem_mb", "skipped_clips"} <= set(saved)
    assert saved["steps"] == 6 and saved == json.loads(json.dumps(summary, default=str))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000006"
    assert {p.name for p in ckpt.iterdir()} == {"student.safetensors", "state.pt"}




def test_resume_continues_to_the_same_final_loss(tiny_overrides, tmp_path, stop_after_checkpoint):
    def final_loss(run_dir: Path, stop_at: int | None = None) -> float:
        extra = [("stopper", stop_after_checkpoint(stop_at))] if stop_at else []
        with Trainer(load_recipe(RECIPES / "mae.yaml", tiny_overrides(run_dir, steps=6, workers=2)), load_plugins(extra)) as trainer:
            return trainer.train()["final_loss"]

    uninterrupted = final_loss(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        final_loss(tmp_path / "b", stop_at=3)
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = final_loss(tmp_path / "b")
    assert resumed == uninterrupted
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [2, 4, 6]
    # logged values are means over the log window (2 steps); step 4's window was cut by the
    # resume at step 3, so steps 2 and 6 must match exactly, every value but the timing
    def values(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "clips_per_s"} for m in rows if m["step"] in (2, 6)]

    assert values(a) == values(b)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []

    @hookimpl
    def vlmask_train_start(self, run):
        self.calls.append(("train_start", run.start_step))

    @hookimpl
    def vlmask_after_optimizer_step(self, step):
        self.calls.append(("after_optimizer_step", step))

    @hookimpl
    def vlmask_step_end(self, step, metrics):
        assert metrics["step"] == step
        self.calls.append(("step_end", step))

    @hookimpl
    def vlmask_checkpoint_saved(self, step, path):
        assert (path / "state.pt").is_file()
        self.calls.append(("checkpoint_saved", step))

    @hookimpl
    def vlmask_train_end(self, summary):
        self.calls.append(("train_end", summary["steps"]))


def test_lifecycle_hooks_fire_in_order(tiny_overrides, tmp_path):
    recorder = Recorder()
    with Trainer(load_recipe(RECIPES / "mae.yaml", tiny_overrides(tmp_path / "r", steps=4)), load_plugins([("recorder", recorder)])) as trainer:
        trainer.train()
    assert recorder.calls == [
        ("train_start", 0),
        ("after_optimizer_step", 1), ("after_optimizer_step", 2), ("step_end", 2),
        ("after_optimizer_step", 3), ("checkpoint_saved", 3),
        ("after_optimizer_step", 4), ("step_end", 4), ("checkpoint_saved", 4),
        ("train_end", 4),
    ]


def interrupted_mae_run(tiny_overrides, tmp_path: Path) -> tuple[Path, list[str]]:
    """A 3-step MAE run with its summary removed, so the next Trainer resumes it."""
    run_dir = tmp_path / "r"
    overrides = tiny_overrides(run_dir, steps=3)
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        trainer.train()
    (run_dir / "summary.json").unlink()
    return run_dir, overrides


def test_truncated_checkpoint_is_refused_naming_the_file(tiny_overrides, tmp_path):
    run_dir, overrides = interrupted_mae_run(tiny_overrides, tmp_path)
    weights = latest_checkpoint(run_dir / "checkpoints") / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"student.safetensors: cannot read weights"):
        Trainer(load_recipe(RECIPES / "mae.yaml", overrides))


def test_an_optimizer_state_that_does_not_match_is_refused_naming_the_file(tiny_overrides, tmp_path):
    run_dir, overrides = interrupted_mae_run(tiny_overrides, tmp_path)
    state_file = latest_checkpoint(run_dir / "checkpoints") / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["state"] = {f"renamed.{k}": v for k, v in state["optimizer"]["state"].items()}
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"state.pt: the optimizer state does not match"):
        Trainer(load_recipe(RECIPES / "mae.yaml", overrides))


def test_weighted_sum_requires_a_weight_for_every_term_and_a_term_for_every_weight():
    one = torch.tensor(1.0)
    total, logged = weighted_sum({"a": one, "b": (2 * one, {"rate": one})}, {"a": 0.5, "b": 2.0})
    assert total.item() == 4.5 and set(logged) == {"a", "b", "b/rate"}
    with pytest.raises(RecipeError, match=r"without a weight: \['b'\]"):
        weighted_sum({"a": one, "b": one}, {"a": 1.0})
    with pytest.raises(RecipeError, match=r"weights without a loss term: \['c'\]"):
        weighted_sum({"a": one}, {"a": 1.0, "c": 1.0})


def test_lr_schedule_warmup_then_cosine():
    kw = dict(total=110, warmup=10, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, **kw) == pytest.approx(1e-5)


class VarianceHead(torch.nn.Module):
    """A third-party head: VICReg's variance term (Bardes et al., ICLR 2022) on the visible features."""

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, out):
        std = out.visible_features.flatten(0, 1).float().std(dim=0)
        return torch.relu(self.gamma - std).mean(), {"mean_std": std.mean().detach()}


class VarianceHeadPlugin:
    """What a third-party distribution's entry-point module would contain."""

    @staticmethod
    @hookimpl
    def vlmask_register_plugins(register):
        register("head", "variance", VarianceHead)


def test_a_third_party_head_joins_a_recipe_without_editing_vlmask(tiny_overrides, tmp_path):
    from vlmask.schema import validate

    plugins = load_plugins([("vlmask-variance", VarianceHeadPlugin())])
    extra = ["heads={var: {name: variance, gamma: 1.0}}", "loss_weights.var=0.5"]
    recipe = load_recipe(RECIPES / "mae.yaml", [*tiny_overrides(tmp_path / "r", steps=2), *extra])
    assert validate(recipe, plugins.registry) == []
    assert validate(recipe, load_plugins().registry) != [], "without the plugin the name is unknown"
    with Trainer(recipe, plugins) as trainer:
        trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert {"pixels", "var", "var/mean_std"} <= set(rows[-1])
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["pixels"] + 0.5 * rows[-1]["var"], rel=1e-5)


def test_a_manifest_with_bad_lines_trains_and_reports_exactly_those(tiny_synth, tiny_scale, tmp_path):
    train = tiny_synth[0]
    good = [json.loads(line) for line in train.read_text().splitlines()]
    for row in good:
        row["video"] = str(train.parent / row["video"])
    first = Path(good[0]["video"])
    (tmp_path / "truncated.mp4").write_bytes(first.read_bytes()[: first.stat().st_size // 3])
    (tmp_path / "notes.mp4").write_text("this is not a video\n")
    lines = [json.dumps(r) for r in good[:6]]
    lines.insert(2, json.dumps({"video": str(tmp_path / "truncated.mp4"), "caption": "x"}))
    lines.insert(4, json.dumps({"video": str(tmp_path / "missing.mp4")}))
    lines.insert(5, json.dumps({"video": str(tmp_path / "notes.mp4")}))
    lines.insert(7, "{not json")
    lines += [json.dumps(r) for r in good[6:]]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    with Trainer(load_recipe(RECIPES / "mae.yaml", [*tiny_scale, f"data.train={manifest}", f"run.dir={run_dir}", "train.max_steps=2"])) as trainer:
        trainer.train()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_clips"] == 4
    assert [s["line"] for s in summary["skipped"]] == [3, 5, 6, 8]


def test_gradient_accumulation_steps_over_micro_batches(tiny_overrides, tmp_path):
    run_dir = tmp_path / "acc"
    overrides = [*tiny_overrides(run_dir, steps=2), "train.batch_size=2", "train.accumulate=2", "train.log_every=1"]
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        assert trainer.train_step.effective["batch_size"] == 4
        batches = [trainer.prepare(b) for b, _ in zip(trainer.data.loader, range(2))]
        before = [p.detach().clone() for p in trainer.train_step.student.parameters()]
        logged = trainer.train_step.step(batches, 0)
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.train_step.student.parameters()))
        assert set(logged) >= {"loss", "pixels", "grad_norm"}
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        summary = trainer.train()
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "batch_size: 4" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(tiny_overrides, tmp_path):
    def run(extra: list[str]) -> float:
        with Trainer(load_recipe(RECIPES / "mae.yaml", [*tiny_overrides(tmp_path / str(len(extra)), steps=2), *extra])) as trainer:
            return trainer.train()["final_loss"]

    assert run(["train.compile=true"]) == pytest.approx(run([]), rel=1e-4)
