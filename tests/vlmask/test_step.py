"""``vlmask.step.TrainStep``: one step built from the parts without data or a run directory;
its after-step list in its documented order; its state dict continuing a step exactly; its
meta copy (FLOP counting, the rehearsal) leaving the step as it was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vlmask import hookimpl
from vlmask.bench import count_flops, count_step_flops, synthetic_batch
from vlmask.config import RecipeError, load_recipe
from vlmask.plugins import default_plugins, load_plugins, run_manager
from vlmask.step import ON_META, TrainStep, build_step

RECIPES = Path(__file__).parents[2] / "recipes"

#: Width 32, one block, 4 x 32 x 32 clips: milliseconds per step on the CPU.
TINY = ["device=cpu", "train.batch_size=2", "data.dataset.num_frames=4", "data.dataset.size=32",
        "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
        "model.predictor.dim=16", "model.predictor.depth=1", "model.predictor.num_heads=2"]


class TeacherWatch:
    """After every optimizer step: has the teacher moved already (the teacher's update comes first)?"""

    def __init__(self) -> None:
        self.step: TrainStep | None = None
        self.before: dict[str, torch.Tensor] = {}
        self.seen: list[tuple[int, bool]] = []

    def start(self, step: TrainStep) -> None:
        self.step = step
        self.before = {k: v.clone() for k, v in step.teacher.state_dict().items()}

    @hookimpl
    def vlmask_after_optimizer_step(self, step: int) -> None:
        assert self.step is not None
        now = self.step.teacher.state_dict()
        self.seen.append((step, any(not torch.equal(now[k], v) for k, v in self.before.items())))


def test_the_after_step_list_updates_the_teacher_then_calls_every_hook() -> None:
    watch = TeacherWatch()
    plugins = load_plugins(extra=[("teacher-watch", watch)])
    recipe = load_recipe(RECIPES / "fils.yaml", [*TINY, "~teacher.half_life_fraction", "teacher.tau_start=0.5",
                                                  "optim.warmup_lr=1e-3"])
    with build_step(recipe, plugins, manager=run_manager(plugins)) as step:
        assert [name for name, _ in step.after_step] == ["teacher_update", "hooks"]
        head = step.student.objectives["actclip"]
        assert step.manager.is_registered(head)  # the parts' own hooks (the logit-scale clamp) are in the list
        watch.start(step)
        with torch.no_grad():
            head.logit_scale.fill_(10.0)  # above log(100): the clamp must bring it back after the step
        step.step(synthetic_batch(step, 2, "cpu"), 0)
        assert watch.seen == [(1, True)]  # called once, with the steps taken, after the teacher moved
        assert head.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6
    assert not step.manager.is_registered(head), "close() unregisters the parts"


def test_a_state_dict_continues_the_step_exactly() -> None:
    recipe = load_recipe(RECIPES / "fils.yaml", TINY)
    plugins = default_plugins()
    with build_step(recipe, plugins) as first:
        batch = synthetic_batch(first, 2, "cpu", seed=3)
        first.step(batch, 0)
        state = copy.deepcopy(first.state_dict())
        assert list(state) == ["student", "teacher", "optimizer", "scaler"]  # the checkpoint's files, in order
        expected = first.step(batch, 1)
        weights = copy.deepcopy(first.state_dict())
    with build_step(recipe, plugins) as second:
        second.load_state_dict(state)
        logged = second.step(batch, 1)
        assert logged.keys() == expected.keys()
        assert all(torch.equal(logged[k], expected[k]) for k in logged)
        now = second.state_dict()
        for part in ("student", "teacher"):
            assert all(torch.equal(now[part][k], weights[part][k]) for k in weights[part]), part


def test_on_meta_copies_the_parts_shapes_not_their_weights_and_leaves_the_step_as_it_was() -> None:
    recipe = load_recipe(RECIPES / "fils.yaml", TINY)
    with build_step(recipe, default_plugins()) as step:
        weights = {k: v.clone() for k, v in step.student.state_dict().items()}
        with step.on_meta() as meta:
            assert meta.device == ON_META.device and meta.precision == "fp32"
            shapes = {k: (v.shape, v.dtype) for k, v in step.student.state_dict().items()}
            assert {k: (v.shape, v.dtype) for k, v in meta.student.state_dict().items()} == shapes
            assert all(p.is_meta for p in [*meta.student.parameters(), *meta.teacher.parameters()])
            assert meta.parts.text_encoder is step.parts.text_encoder  # shared, not copied
            assert meta.student.objectives["actclip"] is not step.student.objectives["actclip"]
            assert not meta.manager.is_registered(step.student.objectives["actclip"])
            counted = count_step_flops(meta)  # the real step, after-step work included, on the copies
        assert all(p.device.type == "cpu" for p in step.student.parameters())
        assert all(torch.equal(v, weights[k]) for k, v in step.student.state_dict().items())
        with pytest.raises(ValueError, match="meta"):
            count_step_flops(step)  # a step that computes is never counted
    from_recipe = count_flops(RECIPES / "fils.yaml", TINY)["gflops_per_clip"]
    assert counted["gflops_per_clip"] == pytest.approx(from_recipe, abs=1e-3)


def _old_rule(name: str, param: torch.Tensor) -> bool:
    """The engine's rule before the parts declared ``no_weight_decay()``: names matched by substring."""
    return param.ndim <= 1 or any(k in name for k in ("pos_embed", "mask_token", "cls_token", "logit_scale"))


@pytest.mark.parametrize("recipe_name, overrides, declared", [
    ("fils.yaml", [], {"encoder.pos_embed", "predictor.mask_token", "objective_modules.actclip.logit_scale"}),
    ("mae.yaml", [], {"encoder.pos_embed", "predictor.mask_token"}),  # a sin-cos buffer: declared, not a parameter
    ("mae.yaml", ["model.encoder.pos_embed=learned"], {"predictor.mask_token", "encoder.pos_embed"}),
])
def test_weight_decay_groups_come_from_the_parts_declarations(recipe_name: str, overrides: list[str],
                                                             declared: set[str]) -> None:
    """AdamW's two groups hold exactly the parameters the old name-matching rule put there: the
    parts' ``no_weight_decay()`` (timm's convention) plus 1-D parameters and biases."""
    recipe = load_recipe(RECIPES / recipe_name, [*TINY, *overrides])
    with build_step(recipe, default_plugins()) as step:
        assert step.student.no_weight_decay() == declared
        names = {id(p): n for n, p in step.student.named_parameters()}
        decay, no_decay = ([names[id(p)] for p in group["params"]] for group in step.optimizer.param_groups)
        expected = [n for n, p in step.student.named_parameters() if p.requires_grad]
        assert no_decay == [n for n in expected if _old_rule(n, step.student.get_parameter(n))]
        assert decay == [n for n in expected if not _old_rule(n, step.student.get_parameter(n))]
        assert {"predictor.mask_token"} <= set(no_decay) and "predictor.head.weight" in decay


class MisspeltHead(torch.nn.Module):
    """A head whose clamp is spelt the British way: pluggy would register it and never call it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    @hookimpl
    def vlmask_after_optimiser_step(self, step: int) -> None:
        self.scale.data.clamp_(0.0, 1.0)

    def forward(self, out):
        return out.visible_features.mean() * self.scale


class MisspeltHeadPlugin:
    @hookimpl
    def vlmask_register_plugins(self, register):
        register("head", "misspelt", MisspeltHead)


def test_a_part_with_a_misspelt_hook_is_refused_naming_its_key_and_the_nearest_hook() -> None:
    plugins = load_plugins(extra=[("misspelt-head", MisspeltHeadPlugin())])
    recipe = load_recipe(RECIPES / "mae.yaml", [*TINY, "heads.clamp={name: misspelt}", "loss_weights.clamp=1.0"])
    with pytest.raises(RecipeError) as refused:
        build_step(recipe, plugins, manager=run_manager(plugins))
    [problem] = refused.value.problems
    assert "key heads.clamp:" in problem and "did you mean vlmask_after_optimizer_step?" in problem, problem
