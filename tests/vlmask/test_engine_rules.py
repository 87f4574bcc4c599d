"""Engine-level rules of FILS-style training, each checked through a real ``Trainer`` at tiny scale.

* The EMA teacher moves after *every* optimizer step (the released FILS code updates once per
  epoch: a bug, not copied): the teacher is compared after each step with the EMA formula
  ``teacher <- tau * teacher + (1 - tau) * student`` applied to the student's weights of that step.
* The contrastive head's learnable logit scale is clamped to at most ``log(100)`` (open_clip,
  CLIP sec. 2.5) in a real run: the clamp is a lifecycle hook the engine must register.
* The language-space target (FILS eq. 7-8) projects the teacher's features with the projection
  theta its ``projection`` names: the student's (default, eq. 7's text) or the teacher's EMA copy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vlmask import hookimpl
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.plugins import load_plugins
from vlmask.types import gather_tokens

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture
def fils_overrides(tiny_synth: Any, tiny_scale: list[str], tmp_path: Path) -> list[str]:
    return [*tiny_scale, f"data.train={tiny_synth[0]}", f"run.dir={tmp_path / 'run'}", "train.log_every=1",
            "train.ckpt_every=100", "train.max_steps=6"]


class EMAFormula:
    """After every optimizer step, applies the EMA formula to the student's weights of that step
    and records how far the teacher's encoder is from it."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.expected: dict[str, torch.Tensor] = {}
        self.errors: list[float] = []
        self.moved: list[float] = []

    def start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        encoder = trainer.train_step.teacher.module("encoder")
        self.expected = {k: v.detach().clone() for k, v in encoder.named_parameters()}

    @hookimpl
    def vlmask_after_optimizer_step(self, step: int) -> None:
        assert self.trainer is not None
        train_step = self.trainer.train_step
        tau = train_step.teacher.tau(step)
        student = dict(train_step.student.encoder.named_parameters())
        teacher = dict(train_step.teacher.module("encoder").named_parameters())
        before = {k: v.clone() for k, v in self.expected.items()}
        for name, value in self.expected.items():
            value.mul_(tau).add_(student[name].detach(), alpha=1 - tau)
        self.errors.append(max((teacher[k] - self.expected[k]).abs().max().item() for k in teacher))
        self.moved.append(max((self.expected[k] - before[k]).abs().max().item() for k in teacher))


def test_the_ema_teacher_follows_the_student_after_every_optimizer_step(fils_overrides: list[str]) -> None:
    probe = EMAFormula()
    # tau 0.5: each update moves the teacher halfway, so a skipped update is far from the formula
    recipe = load_recipe(RECIPES / "fils.yaml", [*fils_overrides, "~teacher.half_life_fraction", "teacher.tau_start=0.5",
                                                 "teacher.tau_end=0.5", "optim.warmup_lr=1e-3"])
    trainer = Trainer(recipe, load_plugins(extra=[("ema-probe", probe)]))
    try:
        assert trainer.data.steps_per_epoch < trainer.total_steps  # the run crosses epoch boundaries
        probe.start(trainer)
        trainer.train()
    finally:
        trainer.close()
    assert len(probe.errors) == 6
    assert min(probe.moved) > 1e-5, "the student did not move: the test could not tell an update from none"
    assert max(probe.errors) < 1e-6, f"teacher vs EMA formula after each step: {probe.errors}"


def test_metrics_log_the_share_of_the_teachers_initial_weights(fils_overrides: list[str], tmp_path: Path) -> None:
    """``teacher_init_share`` at every log step: the product of the taus of the updates so far;
    fils.yaml's half_life_fraction 0.2 halves it every fifth of the run (6 steps: every 1.2)."""
    with Trainer(load_recipe(RECIPES / "fils.yaml", fils_overrides), load_plugins()) as trainer:
        trainer.train()
        run_dir = trainer.run_dir
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [m["teacher_init_share"] for m in logged]
    assert shares == pytest.approx([2.0 ** (-m["step"] / 1.2) for m in logged], rel=1e-9)
    assert shares[-1] < 0.05
    mae = load_recipe(RECIPES / "mae.yaml", [*fils_overrides[:-3], f"run.dir={tmp_path / 'mae'}", "train.log_every=1",
                                              "train.max_steps=2"])
    with Trainer(mae, load_plugins()) as trainer:
        trainer.train()
    assert all("teacher_init_share" not in json.loads(line)
               for line in (tmp_path / "mae" / "metrics.jsonl").read_text().splitlines())  # no teacher, no share


def test_the_logit_scale_is_clamped_to_log_100_in_a_real_run(fils_overrides: list[str]) -> None:
    recipe = load_recipe(RECIPES / "fils.yaml", fils_overrides)
    trainer = Trainer(recipe, load_plugins())
    bound = math.log(100.0)
    try:
        head = trainer.train_step.student.objectives["actclip"]
        with torch.no_grad():  # above the bound: AdamW's steps (about lr each) cannot bring it back alone
            head.logit_scale.fill_(bound + 1.0)
        trainer.train()
        assert head.logit_scale.item() <= bound + 1e-6
    finally:
        trainer.close()
    logged = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    # the logged exp(s) of each step is at most 100 from the second step on (the first saw s = bound + 1)
    assert logged[0]["actclip/logit_scale"] > 100.0
    assert all(m["actclip/logit_scale"] <= 100.0 + 1e-3 for m in logged[1:]), [m["actclip/logit_scale"] for m in logged]


@pytest.mark.parametrize("projection", [None, "student", "teacher"])
def test_the_language_space_target_projects_the_teacher_side_with_the_projection_it_names(
    fils_overrides: list[str], projection: str | None
) -> None:
    chosen = [] if projection is None else [f"targets.fp.projection={projection}"]
    recipe = load_recipe(RECIPES / "fils.yaml", [*fils_overrides, *chosen])
    trainer = Trainer(recipe, load_plugins())
    step = trainer.train_step
    try:
        teacher_projection = step.teacher.module("projection")
        student_projection = step.student.projection
        assert teacher_projection is not None and teacher_projection is not student_projection
        with torch.no_grad():  # make the two copies differ (they are equal at step 0)
            teacher_projection.weight.copy_(torch.randn_like(teacher_projection.weight, generator=None))
        batch = trainer.prepare(next(iter(trainer.data.loader)))

        with torch.no_grad():  # FILS eq. 7-8 by hand, with the pre-step weights the step will use
            mask = step.masker(batch, step.grid, step.mask_generator(0))
            visible = step.student.encoder(batch.video, mask.visible)
            predictions = step.student.predictor(visible, mask)
            teacher_tokens = gather_tokens(step.teacher(batch.video), mask.predict)
            prediction = F.normalize(student_projection(predictions), dim=-1)

            def loss_with(projection: torch.nn.Module) -> float:
                target = F.normalize(projection(teacher_tokens), dim=-1)
                return (prediction - target).abs().sum(-1).mean().item()

            with_teachers, with_students = loss_with(teacher_projection), loss_with(student_projection)

        logged = step.step(batch, 0)
    finally:
        trainer.close()
    assert abs(with_teachers - with_students) > 0.05, "the two projections must give different losses for the test to tell"
    by_hand = with_teachers if projection == "teacher" else with_students  # the default is the student's
    assert logged["fp"].item() == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
