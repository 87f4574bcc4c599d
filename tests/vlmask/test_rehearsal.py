"""Rehearsal (vlmask.rehearsal): every shipped recipe builds and takes the first step of each of
its stages on meta; recipes whose keys are each valid but fail when built or at step 1 are
refused by ``vlmask validate`` and ``vlmask compare`` with the key of the part that fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmask import hookimpl
from vlmask.config import RecipeError, load_recipe
from vlmask.compare import plan_compare
from vlmask.plugins import default_plugins, load_plugins
from vlmask.rehearsal import rehearse

RECIPES = Path(__file__).parents[2] / "recipes"
SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml") if "base" not in p.parts and "paper" not in p.parts)


@pytest.fixture(scope="module")
def plugins():
    return default_plugins()


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_rehearses(recipe, plugins):
    assert rehearse(load_recipe(recipe), plugins) == []


@pytest.mark.parametrize("recipe, overrides, expected", [
    # the masker's rule: 4 frames in tubelets of 2 are 2 slots, and DPC predicts 2 of them
    ("dpc_faithful.yaml", ["data.dataset.num_frames=4"],
     "recipes/dpc_faithful.yaml:17: key masker: the first training step would fail: ValueError: num_future_slots=2 "
     "leaves no visible slot of the 2 temporal slots"),
    # a constructor's rule across two values of one node
    ("mae.yaml", ["model.encoder.num_heads=5"], "recipes/base/demo.yaml:20: key model.encoder (encoder 'video_vit'): num_heads (5)"),
    ("coclr/infonce.yaml", ["heads.coclr.topk=1000"], "key heads.coclr (head 'coclr'): topk must be in [0, queue_size=512]"),
])
def test_a_recipe_that_fails_when_built_or_stepped_names_the_key(recipe, overrides, expected, plugins):
    problems = rehearse(load_recipe(RECIPES / recipe, overrides), plugins)
    assert len(problems) == 1 and expected in problems[0], problems


def test_rehearsal_leaves_the_random_state_and_the_environment_as_they_were(plugins):
    """validate and compare rehearse inside a process that goes on (a compare trains next, a
    notebook draws next): the Trainer's seeding and the parts' draws must not leak out."""
    environment = dict(os.environ)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    assert rehearse(load_recipe(RECIPES / "mae.yaml", ["seed=7"]), plugins) == []
    assert torch.equal(torch.rand(4), expected)
    assert dict(os.environ) == environment and torch.get_default_dtype() == torch.float32


def test_a_part_that_takes_the_data_s_class_count_is_built_with_the_synthetic_labels_classes(plugins):
    """Without data the Trainer knew no classes (num_classes=0), so validate refused every recipe
    with a classification head (Turbo training) although it trains, and its FLOPs went uncounted."""
    from vlmask.bench import SYNTHETIC_CLASSES, count_flops

    overrides = ["heads.cls={name: classification}", "loss_weights.cls=1.0"]
    assert rehearse(load_recipe(RECIPES / "mae.yaml", overrides), plugins) == []
    plain = count_flops(RECIPES / "mae.yaml", ["model.encoder.depth=1"], plugins=plugins)["flops_per_clip"]
    counted = count_flops(RECIPES / "mae.yaml", [*overrides, "model.encoder.depth=1"], plugins=plugins)["flops_per_clip"]
    width = load_recipe(RECIPES / "mae.yaml").get("model.encoder.embed_dim")
    assert counted - plain == pytest.approx(3 * 2 * width * SYNTHETIC_CLASSES)  # the classifier's matmul, forward and backward


def test_every_stage_is_rehearsed_and_named(tmp_path, plugins):
    """Stage 'frozen' freezes every trained parameter: its first step has nothing to backpropagate."""
    staged = tmp_path / "staged.yaml"
    staged.write_text(f"base: [{RECIPES / 'mae.yaml'}]\ntrain: {{max_steps: null}}\nstages:\n"
                      "  - {name: warm, steps: 2}\n  - {name: frozen, steps: 2, freeze: [encoder, predictor]}\n")
    problems = rehearse(load_recipe(staged), plugins)
    assert len(problems) == 1 and "(stage 'frozen') would fail: RuntimeError: element 0 of tensors does not require grad" in problems[0]
    assert problems[0].startswith(f"{staged}:5: key stages.1: "), problems  # the stage's own line


class PickyHead(nn.Module):
    """A head whose stage switch refuses a value when it is set (a property), as a plugin may."""

    stage_settable = ("mode",)

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("mean", "max"):
            raise ValueError(f"mode must be mean or max, got {value!r}")
        self._mode = value

    def forward(self, out):
        return out.visible_features.mean() * self.scale


class PickyHeadPlugin:
    @hookimpl
    def vlmask_register_plugins(self, register):
        register("head", "picky", PickyHead)


@pytest.mark.parametrize("base, head, override, error", [
    # the constructor's rule (stream in both/rgb/flow) is not checked on a stage's value: the head trains nothing
    (RECIPES / "coclr" / "infonce.yaml", "", "heads.coclr.stream: sideways", "RuntimeError: element 0 of tensors"),
    # the plugin refuses the value as the stage sets it
    (RECIPES / "mae.yaml", "heads: {picky: {name: picky}}\nloss_weights: {picky: 1.0}\n", "heads.picky.mode: min",
     "ValueError: mode must be mean or max, got 'min'"),
], ids=["constructor-rule-unchecked", "setter-refuses"])
def test_a_stage_value_that_fails_names_the_stage(tmp_path, base, head, override, error):
    staged = tmp_path / "staged.yaml"
    staged.write_text(f"base: [{base}]\n{head}train: {{max_steps: null}}\nstages:\n"
                      f"  - {{name: first, steps: 2}}\n  - {{name: second, steps: 2, overrides: {{{override}}}}}\n")
    plugins = load_plugins(extra=[("picky-head", PickyHeadPlugin())])
    problems = rehearse(load_recipe(staged), plugins)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{staged}:") and "key stages.1: the first training step (stage 'second') would fail: " \
        f"{error}" in problems[0], problems


def test_validate_and_compare_refuse_what_fails_at_step_one(tmp_path):
    bad = [str(RECIPES / "dpc_faithful.yaml"), "data.dataset.num_frames=4"]
    result = subprocess.run([sys.executable, "-m", "vlmask", "validate", *bad], capture_output=True, text=True, timeout=300)
    said = result.stdout + result.stderr
    assert result.returncode == 1 and "key masker" in said and "Traceback" not in said, said
    keys_only = subprocess.run([sys.executable, "-m", "vlmask", "validate", *bad, "--keys-only"], capture_output=True,
                               text=True, timeout=300)
    assert keys_only.returncode == 0 and "valid" in keys_only.stdout  # every key is valid: only building shows it
    with pytest.raises(RecipeError) as refused:
        plan_compare([str(RECIPES / "mae.yaml"), bad[0]], bad[1:], [0], tmp_path / "out")
    assert len(refused.value.problems) == 1 and "key masker" in refused.value.problems[0]
    assert not (tmp_path / "out").exists()  # nothing trained


class BuggyHead(nn.Module):
    """A third-party head with a bug that shows only when built (``at="build"``) or stepped."""

    def __init__(self, at: str = "step") -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        if at == "build":
            self.width = self.scale.widht  # AttributeError

    def forward(self, out):
        return out.batch.caption_embeddings.sum() * self.scale  # AttributeError: the field is text_embedding


class BuggyHeadPlugin:
    @hookimpl
    def vlmask_register_plugins(self, register):
        register("head", "buggy", BuggyHead)


@pytest.mark.parametrize("at, expected", [
    ("step", "command line: heads.buggy={name: buggy, at: step}: key heads.buggy: the first training step would fail: "
             "AttributeError: 'Batch' object has no attribute 'caption_embeddings'"),
    ("build", "building the run fails: AttributeError: 'Parameter' object has no attribute 'widht'"),
])
def test_any_exception_of_a_plugin_is_a_problem_not_a_traceback(at, expected):
    """A part may raise anything, not only ValueError and its kin: an AttributeError is one problem
    line (naming the head when it is stepped) that validate and compare list, not an exception."""
    plugins = load_plugins(extra=[("buggy-head", BuggyHeadPlugin())])
    recipe = load_recipe(RECIPES / "mae.yaml", ["heads.buggy={name: buggy, at: %s}" % at, "loss_weights.buggy=1.0"])
    problems = rehearse(recipe, plugins)
    assert len(problems) == 1 and expected in problems[0], problems


class StuckTeacher(nn.Module):
    """A teacher whose update fails (after the optimizer step, where only the real step reaches)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return video.flatten(2).transpose(1, 2) * self.scale

    def module(self, name: str) -> nn.Module | None:
        return None

    def init_share(self, step: int) -> float:
        return 1.0

    def update(self, student: nn.Module, step: int) -> None:
        raise RuntimeError("the teacher cannot follow the student")


class ClampingHead(nn.Module):
    """A head whose after-step hook fails, as a clamp written for another parameter would."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    @hookimpl
    def vlmask_after_optimizer_step(self, step: int) -> None:
        self.temperature.clamp_(0.0, 1.0)  # AttributeError: the parameter is scale

    def forward(self, out):
        return out.visible_features.mean() * self.scale


class AfterStepPlugin:
    @hookimpl
    def vlmask_register_plugins(self, register):
        register("teacher", "stuck", StuckTeacher)
        register("head", "clamping", ClampingHead)


@pytest.mark.parametrize("overrides, expected", [
    (["teacher={name: stuck}"], "key teacher: the first training step would fail: RuntimeError: the teacher cannot"),
    (["heads.clamp={name: clamping}", "loss_weights.clamp=1.0"],
     "key heads.clamp: the first training step would fail: AttributeError: 'ClampingHead' object has no attribute"),
], ids=["teacher-update", "after-step-hook"])
def test_the_work_after_the_optimizer_step_is_rehearsed_and_named(overrides, expected):
    """The rehearsal takes the real step: the teacher's update and the parts' hooks run too."""
    plugins = load_plugins(extra=[("after-step", AfterStepPlugin())])
    problems = rehearse(load_recipe(RECIPES / "mae.yaml", overrides), plugins)
    assert len(problems) == 1 and expected in problems[0], problems
