"""What a tiny real run records beyond the loss: training diagnostics in ``metrics.jsonl`` at log
steps (vlmask.diagnostics), ``final_loss`` in ``summary.json`` and ``train_flops`` there through
``vlmask run``, and the reads of the non-finite guard and the feature hooks at log and
checkpoint steps only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmask import rundir
from vlmask.bench import count_flops
from vlmask.cli import main
from vlmask.config import load_recipe
from vlmask.engine import FeatureTap, Trainer

RECIPES = Path(__file__).parents[2] / "recipes"
TEACHER_KEYS = {"teacher_std", "student_teacher_cos"}


def tiny(tiny_synth, tiny_scale, run_dir: Path, *extra: str) -> list[str]:
    return [*tiny_scale, f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", "train.max_steps=4", "train.log_every=2",
            "train.ckpt_every=4", *extra]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fils_logs_the_four_diagnostics_and_mae_the_student_ones_at_log_steps(tiny_synth, tiny_scale, tmp_path):
    batch = 4
    with Trainer(load_recipe(RECIPES / "fils.yaml", tiny(tiny_synth, tiny_scale, tmp_path / "fils"))) as trainer:
        trainer.train()
    fils = rows(tmp_path / "fils")
    assert [r["step"] for r in fils] == [2, 4]
    for row in fils:
        assert 1.0 <= row["rankme"] <= batch + 1e-4  # pooled (B, D) features: rank at most B
        assert 0.0 < row["student_std"] < 1.0 and 0.0 < row["teacher_std"] < 1.0
        assert -1.0 <= row["student_teacher_cos"] <= 1.0 + 1e-6
    # an EMA teacher starts as the student's copy: at step 2 the two agree far more than chance
    assert fils[0]["student_teacher_cos"] > 0.5

    with Trainer(load_recipe(RECIPES / "mae.yaml", tiny(tiny_synth, tiny_scale, tmp_path / "mae"))) as trainer:
        trainer.train()
    mae = rows(tmp_path / "mae")
    assert [r["step"] for r in mae] == [2, 4]
    for row in mae:
        assert {"rankme", "student_std"} <= set(row) and not TEACHER_KEYS & set(row)
        assert all(math.isfinite(row[k]) for k in ("rankme", "student_std"))


def test_final_loss_is_the_last_steps_loss_not_the_log_window_mean(tiny_synth, tiny_scale, tmp_path):
    overrides = tiny(tiny_synth, tiny_scale, tmp_path / "run", "train.log_every=4")
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        losses: list[float] = []
        step = trainer.train_step.step

        def recording_step(batch, at):
            logged = step(batch, at)
            losses.append(float(logged["loss"]))
            return logged

        trainer.train_step.step = recording_step  # an instance attribute shadows the method
        trainer.train()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    # final_loss is step 4's loss, not the mean of the log window (steps 1-4) that metrics.jsonl holds
    assert len(losses) == 4 and saved["final_loss"] == pytest.approx(losses[-1], rel=1e-6)
    assert rows(tmp_path / "run")[-1]["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert saved["final_loss"] != pytest.approx(sum(losses) / 4, rel=1e-6)


def test_vlmask_run_builds_the_model_once_and_writes_train_flops_per_clip_times_clips(tiny_synth, tiny_scale, tmp_path,
                                                                                    isolated_cache, monkeypatch):
    import vlmask.build

    built: list[str] = []
    real_build = vlmask.build.build

    def counted(registry, recipe, key, kind, *args, **kwargs):
        built.append(key)
        return real_build(registry, recipe, key, kind, *args, **kwargs)

    monkeypatch.setattr(vlmask.build, "build", counted)  # what build_components builds every part with
    overrides = tiny(tiny_synth, tiny_scale, tmp_path / "run")
    assert main(["run", str(RECIPES / "mae.yaml"), *overrides]) == 0
    assert built.count("model.encoder") == 1, "the FLOP count copies the run's own parts onto meta: no second build"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    counted = count_flops(RECIPES / "mae.yaml", [o for o in overrides if not o.startswith("run.dir=")])
    per_clip = counted["flops_per_clip"]
    assert per_clip > 0 and saved["train_flops"] == pytest.approx(per_clip * 4 * 4, rel=1e-9)  # 4 steps x 4 clips
    assert saved["wall_s"] > 0 and saved["steps"] == 4


def test_a_flop_counting_failure_is_a_warning_not_a_failed_run(tiny_synth, tiny_scale, tmp_path, monkeypatch, capfd,
                                                                isolated_cache):
    import vlmask.bench

    def broken(*args, **kwargs):
        raise RuntimeError("counter broke")

    monkeypatch.setattr(vlmask.bench, "count_step_flops", broken)
    assert main(["run", str(RECIPES / "mae.yaml"), *tiny(tiny_synth, tiny_scale, tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["steps"] == 4 and saved["train_flops"] is None and saved["final_loss"] is not None
    assert "training FLOPs not counted (RuntimeError: counter broke)" in capfd.readouterr().err


def test_the_guard_and_the_feature_hooks_are_read_at_log_and_checkpoint_steps_only(tiny_synth, tiny_scale, tmp_path,
                                                                                    monkeypatch):
    reads: list[int] = []
    real = rundir.NonFiniteGuard.first_bad_step

    def counted(self):
        reads.append(int(self._step))  # the guard's own device counter: the step it has seen up to
        return real(self)

    monkeypatch.setattr(rundir.NonFiniteGuard, "first_bad_step", counted)
    overrides = tiny(tiny_synth, tiny_scale, tmp_path / "run", "train.max_steps=6", "train.log_every=3",
                     "train.ckpt_every=5")
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        kept: list[int] = []
        features = trainer.train_step.features
        diagnostics = features.diagnostics

        def recorded():
            kept.append(features.student is not None)
            return diagnostics()

        features.diagnostics = recorded
        trainer.train()
    assert reads == [3, 5, 6, 6]  # log step 3, checkpoint 5, step 6 logs and saves
    assert kept == [True, True]  # features kept at the two log steps, 3 and 6


def test_the_feature_tap_keeps_the_first_call_of_an_armed_step_only():
    encoder, teacher = nn.Linear(3, 3), nn.Linear(3, 5)
    tap = FeatureTap(encoder, teacher)
    x = torch.randn(4, 2, 3)
    encoder(x), teacher(x)
    assert tap.student is None and tap.teacher is None, "idle hooks keep nothing"
    with tap.arm():
        first = encoder(x)
        encoder(torch.randn(4, 2, 3))  # a second call in the step (faithful DPC's online future)
        teacher(x)
    assert torch.equal(tap.student, first.detach()) and tap.teacher.shape == (4, 2, 5)
    assert not tap.student.requires_grad
    diagnostics = tap.diagnostics()
    assert {"rankme", "student_std", "teacher_std"} <= set(diagnostics)
    assert "student_teacher_cos" not in diagnostics  # widths differ: no cosine
    tap.remove()
    with tap.arm():
        encoder(x)
    assert tap.student is None, "removed hooks keep nothing"


class VisibleTokens(nn.Module):
    """An encoder called as the student's is, ``encoder(video, visible)``: the rows at ``visible``."""

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return torch.gather(tokens, 1, visible.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])) * 2.0


def test_the_teacher_is_compared_at_the_students_visible_tokens():
    encoder, teacher = VisibleTokens(), nn.Identity()
    tap = FeatureTap(encoder, teacher)
    tokens = torch.randn(6, 5, 4)
    visible = torch.tensor([[0, 3]] * 6)
    with tap.arm():
        encoder(tokens, visible)
        teacher(tokens)
    assert torch.equal(tap.visible, visible)
    # the student's features are twice the teacher's at the same tokens: cosine 1 there, not over all tokens
    assert tap.diagnostics()["student_teacher_cos"] == pytest.approx(1.0, abs=1e-5)
    assert tap.diagnostics()["teacher_std"] == pytest.approx(tap.diagnostics()["student_std"], abs=1e-6)


def test_a_resume_at_the_final_checkpoint_reports_the_trainings_wall_time_and_throughput(
        tiny_synth, tiny_scale, tmp_path, stop_after_checkpoint, isolated_cache):
    """Issue 22.3: killed after its final checkpoint and resumed, a run trained no step in the
    resuming process and summary.json said wall_s 0.0 and clips_per_s 0.0. The figures of the
    training are kept in each checkpoint (state.pt) and summed over the processes that trained."""
    from vlmask import checkpoint as ckpt
    from vlmask.plugins import load_plugins

    run_dir = tmp_path / "run"
    overrides = tiny(tiny_synth, tiny_scale, run_dir, "train.log_every=1", "train.ckpt_every=2")
    for stop_at in (2, 4):  # killed after step 2's checkpoint, resumed, killed again after the final one
        with pytest.raises(KeyboardInterrupt):
            with Trainer(load_recipe(RECIPES / "mae.yaml", overrides),
                         load_plugins([("stop", stop_after_checkpoint(stop_at))])) as trainer:
                trainer.train()
    assert not (run_dir / "summary.json").exists()
    at_2 = ckpt.load_state(run_dir / "checkpoints" / "step_00000002" / "state.pt")
    at_4 = ckpt.load_state(run_dir / "checkpoints" / "step_00000004" / "state.pt")
    assert at_2["wall_s"] > 0 and at_4["wall_s"] > at_2["wall_s"]  # the second process added its own time
    assert at_2["clips_per_s"] > 0 and at_4["clips_per_s"] > 0
    assert main(["run", str(RECIPES / "mae.yaml"), *overrides]) == 0  # trains nothing, writes summary.json
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 4 and saved["resumed_from_step"] == 4
    assert saved["wall_s"] == at_4["wall_s"] and saved["clips_per_s"] == at_4["clips_per_s"]


def test_a_checkpoint_of_an_older_vlmask_gives_null_figures_not_zeros_when_nothing_is_trained():
    clock = rundir.TrainingClock.resumed({"step": 4, "last_loss": 1.0})  # no wall_s, no clips_per_s recorded
    assert clock.wall_s(trained=False) is None and clock.clips_per_s() is None
    rates = clock.start()
    rates.append(12.5)
    assert clock.wall_s(trained=True) >= 0.0 and clock.clips_per_s() == 12.5


def test_vlmask_run_validates_the_recipe_once(tiny_synth, tiny_scale, tmp_path, isolated_cache, monkeypatch):
    """``vlmask run`` checks its recipe once (the Trainer, before it claims the run directory);
    building the parts, the data and the FLOP count do not check it again."""
    import sys

    import vlmask.schema

    calls: list[str] = []
    real_validate = vlmask.schema.validate

    def counted(recipe, registry):
        calls.append(str(recipe.path))
        return real_validate(recipe, registry)

    for module in [m for name, m in sys.modules.items() if name == "vlmask" or name.startswith("vlmask.")]:
        if getattr(module, "validate", None) is real_validate:  # every module that imported it by name
            monkeypatch.setattr(module, "validate", counted)
    assert main(["run", str(RECIPES / "mae.yaml"), *tiny(tiny_synth, tiny_scale, tmp_path / "run", "train.max_steps=1")]) == 0
    assert len(calls) == 1, calls
