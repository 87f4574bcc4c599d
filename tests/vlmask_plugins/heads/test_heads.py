"""Heads against the reference semantics: CLIP symmetric InfoNCE with open_clip's logit scale,
FILS ActCLIP pooling (eq. 3-6), Turbo classification and Turbo loss weights."""

from __future__ import annotations

import doctest
import math

import pluggy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlmask
import vlmask_plugins.heads.pooling as pooling_module
import vlmask_plugins.heads.video_text as video_text_module
from vlmask.types import Batch, Mask, StepOutputs, TokenGrid
from vlmask_plugins.heads import ClassificationHead, VideoTextInfoNCEHead, pool_visible_in_box, register_plugins
from vlmask_plugins.heads.video_text import symmetric_infonce
from vlmask_plugins.maskers.geometry import token_centres_inside_box

GRID = TokenGrid(t=2, h=2, w=2)  # spatial positions 0 1 / 2 3, centres at 0.25 and 0.75


def step_outputs(
    features: torch.Tensor,
    visible: torch.Tensor,
    text: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    projection: nn.Module | None = None,
    label: torch.Tensor | None = None,
) -> StepOutputs:
    batch = Batch(video=torch.zeros(features.shape[0], 3, 1, 1, 1), text_embedding=text, action_box=boxes, label=label)
    mask = Mask(visible=visible, predict=visible.new_zeros(visible.shape[0], 0))
    return StepOutputs(batch=batch, grid=GRID, mask=mask, visible_features=features, projection=projection)


def test_register_plugins_registers_every_head() -> None:
    seen: list[tuple[str, str]] = []
    register_plugins(lambda kind, name, factory: seen.append((kind, name)))
    assert sorted(seen) == [("head", "classification"), ("head", "coclr"), ("head", "video_text_infonce")]


@pytest.mark.parametrize("module", [pooling_module, video_text_module])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, raise_on_error=False)  # type: ignore[arg-type]
    assert result.failed == 0 and result.attempted > 0


# ---- CLIP loss and logit scale ---------------------------------------------------------------


def test_logit_scale_starts_at_log_one_over_0_07() -> None:
    head = VideoTextInfoNCEHead()
    assert head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert head.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert head.logit_scale.requires_grad


def test_symmetric_loss_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    features, text = torch.randn(3, 4, 5), torch.randn(3, 6)
    visible = torch.tensor([[0, 1, 4, 5]] * 3)
    theta = nn.Linear(5, 6)
    head = VideoTextInfoNCEHead()
    loss, stats = head(step_outputs(features, visible, text, projection=theta))
    video = theta(features.mean(dim=1)).detach()
    z_v = video / video.norm(dim=1, keepdim=True)
    z_t = text / text.norm(dim=1, keepdim=True)
    scale = 1 / 0.07
    def cross_entropy_row(rows: torch.Tensor, columns: torch.Tensor, i: int) -> float:
        scores = [math.exp(scale * float(rows[i] @ columns[j])) for j in range(3)]
        return -math.log(scores[i] / sum(scores))

    video_to_text = sum(cross_entropy_row(z_v, z_t, i) for i in range(3)) / 3
    text_to_video = sum(cross_entropy_row(z_t, z_v, i) for i in range(3)) / 3
    assert loss.item() == pytest.approx((video_to_text + text_to_video) / 2, rel=1e-5)
    assert stats["logit_scale"].item() == pytest.approx(scale, rel=1e-6)
    assert video_to_text != pytest.approx(text_to_video, rel=1e-3)  # the two directions really differ


def test_clamp_after_optimizer_step_through_a_pluggy_hook() -> None:
    spec = pluggy.HookspecMarker("vlmask")

    class Spec:
        @spec
        def vlmask_after_optimizer_step(self, step: int) -> None: ...

    manager = pluggy.PluginManager("vlmask")
    manager.add_hookspecs(Spec)
    head = VideoTextInfoNCEHead()
    manager.register(head)
    with torch.no_grad():
        head.logit_scale.fill_(6.0)  # exp(6) = 403 > 100
    manager.hook.vlmask_after_optimizer_step(step=1)
    assert head.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        head.logit_scale.fill_(3.0)
    manager.hook.vlmask_after_optimizer_step(step=2)
    assert head.logit_scale.item() == 3.0  # below the maximum: untouched
    assert isinstance(vlmask.hookimpl, pluggy.HookimplMarker)


def test_gradient_reaches_logit_scale_projection_and_features() -> None:
    torch.manual_seed(1)
    features = torch.randn(4, 3, 5, requires_grad=True)
    theta = nn.Linear(5, 6)
    head = VideoTextInfoNCEHead()
    loss, _ = head(step_outputs(features, torch.tensor([[0, 1, 2]] * 4), torch.randn(4, 6), projection=theta))
    loss.backward()
    assert head.logit_scale.grad is not None and theta.weight.grad is not None and features.grad is not None


def test_turbo_weight_divides_by_log_batch_size() -> None:
    torch.manual_seed(2)
    features, text, theta = torch.randn(4, 3, 5), torch.randn(4, 6), nn.Linear(5, 6)
    visible = torch.tensor([[0, 1, 2]] * 4)
    plain, _ = VideoTextInfoNCEHead()(step_outputs(features, visible, text, projection=theta))
    weighted, _ = VideoTextInfoNCEHead(turbo_weight=True)(step_outputs(features, visible, text, projection=theta))
    assert weighted.item() == pytest.approx(plain.item() / math.log(4))


def test_head_errors_name_what_is_missing() -> None:
    features, visible = torch.randn(2, 3, 5), torch.tensor([[0, 1, 2]] * 2)
    with pytest.raises(ValueError, match="text_embedding"):
        VideoTextInfoNCEHead()(step_outputs(features, visible, projection=nn.Linear(5, 6)))
    with pytest.raises(ValueError, match="projection"):
        VideoTextInfoNCEHead()(step_outputs(features, visible, torch.randn(2, 6)))
    with pytest.raises(ValueError, match="action_box"):
        VideoTextInfoNCEHead(pooling="action_area")(
            step_outputs(features, visible, torch.randn(2, 6), projection=nn.Linear(5, 6))
        )
    with pytest.raises(ValueError, match="text_dim"):
        VideoTextInfoNCEHead()(step_outputs(features, visible, torch.randn(2, 7), projection=nn.Linear(5, 6)))
    with pytest.raises(ValueError, match="pooling must be one of"):
        VideoTextInfoNCEHead(pooling="max")
    with pytest.raises(ValueError, match="action_strategy"):
        VideoTextInfoNCEHead(action_strategy="tokens")


# ---- ActCLIP pooling ------------------------------------------------------------------------------


def actclip_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    features = torch.randn(3, 4, 5)
    # visible tokens (t, position): clip 0 sees positions 0, 1 (slot 0) and 0, 3 (slot 1)
    visible = torch.tensor([[0, 1, 4, 7], [1, 2, 5, 6], [0, 3, 4, 7]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 0.5, 0.5],  # position 0 only -> tokens 0 and 4 (visible columns 0, 2)
            [0.5, 0.0, 1.0, 1.0],  # positions 1 and 3 -> tokens 1 and 5 (columns 0, 2)
            [0.5, 0.0, 1.0, 0.5],  # position 1 only -> clip 2 sees no token there: fallback
        ]
    )
    return features, visible, boxes


def test_actclip_pools_visible_tokens_inside_the_box_and_counts_fallbacks() -> None:
    features, visible, boxes = actclip_case()
    pooled, fell_back = pool_visible_in_box(features, visible, GRID, boxes)
    torch.testing.assert_close(pooled[0], features[0, [0, 2]].mean(0))
    torch.testing.assert_close(pooled[1], features[1, [0, 2]].mean(0))
    torch.testing.assert_close(pooled[2], features[2].mean(0))  # fallback: every visible token
    assert fell_back.tolist() == [False, False, True]
    inside = token_centres_inside_box(GRID, boxes, "cpu")
    assert inside.tolist()[2] == [False, True, False, False]  # the same inside rule as the masker


def test_actclip_head_loss_uses_the_box_pooled_feature_and_reports_fallback_rate() -> None:
    features, visible, boxes = actclip_case()
    text, theta = torch.randn(3, 6), nn.Linear(5, 6)
    head = VideoTextInfoNCEHead(pooling="action_area")
    loss, stats = head(step_outputs(features, visible, text, boxes, theta))
    assert stats["fallback_rate"].item() == pytest.approx(1 / 3)
    pooled, _ = pool_visible_in_box(features, visible, GRID, boxes)
    z_v, z_t = F.normalize(theta(pooled), dim=-1), F.normalize(text, dim=-1)
    logits = z_v @ z_t.T / 0.07
    labels = torch.arange(3)
    torch.testing.assert_close(loss, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    global_loss, global_stats = VideoTextInfoNCEHead()(step_outputs(features, visible, text, boxes, theta))
    assert not torch.allclose(loss, global_loss) and "fallback_rate" not in global_stats


def test_actclip_patch_strategy_draws_one_in_box_token() -> None:
    features, visible, boxes = actclip_case()
    generator = torch.Generator().manual_seed(0)
    drawn: set[int] = set()
    for _ in range(20):
        pooled, fell_back = pool_visible_in_box(features, visible, GRID, boxes, "patch", generator)
        matches = [int(j) for j in range(4) if torch.equal(pooled[1], features[1, j])]
        assert len(matches) == 1 and matches[0] in (0, 2)
        drawn.add(matches[0])
        assert any(torch.equal(pooled[2], features[2, j]) for j in range(4))  # fallback: any visible token
        assert fell_back.tolist() == [False, False, True]
        assert torch.equal(pooled[0], features[0, 0]) or torch.equal(pooled[0], features[0, 2])
    assert drawn == {0, 2}  # random, not always the first


def test_actclip_patch_iterations_average_the_draws_into_one_feature_and_one_loss() -> None:
    """Table 3a's ``patch`` with N iterations (sec. 4.2): N random in-box tokens per clip,
    averaged into one feature, one InfoNCE (the same global random stream, replayed by hand)."""
    features, visible, boxes = actclip_case()
    text, theta = torch.randn(3, 6), nn.Linear(5, 6)
    head = VideoTextInfoNCEHead(pooling="action_area", action_strategy="patch", patch_iterations=10)
    torch.manual_seed(11)
    loss, stats = head(step_outputs(features, visible, text, boxes, theta))
    torch.manual_seed(11)
    draws = [pool_visible_in_box(features, visible, GRID, boxes, "patch")[0] for _ in range(10)]
    z_v, z_t = F.normalize(theta(torch.stack(draws).mean(dim=0)), dim=-1), F.normalize(text, dim=-1)
    torch.testing.assert_close(loss, symmetric_infonce(z_v, z_t, torch.tensor(1 / 0.07)))
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1  # the draws differ
    assert stats["fallback_rate"].item() == pytest.approx(1 / 3)
    # many draws approach the patch-average feature (the paper: "approaching the patch-average strategy")
    average, _ = pool_visible_in_box(features, visible, GRID, boxes, "patch-average")
    many = torch.stack([pool_visible_in_box(features, visible, GRID, boxes, "patch")[0] for _ in range(4000)]).mean(0)
    torch.testing.assert_close(many, average, atol=0.1, rtol=0)
    torch.manual_seed(11)
    one_draw, _ = VideoTextInfoNCEHead(pooling="action_area", action_strategy="patch")(
        step_outputs(features, visible, text, boxes, theta)
    )
    z_one = F.normalize(theta(draws[0]), dim=-1)
    torch.testing.assert_close(one_draw, symmetric_infonce(z_one, z_t, torch.tensor(1 / 0.07)))
    with pytest.raises(ValueError, match="patch_iterations > 1 needs"):
        VideoTextInfoNCEHead(pooling="action_area", patch_iterations=10)  # patch-average has nothing to draw
    with pytest.raises(ValueError, match="positive integer"):
        VideoTextInfoNCEHead(pooling="action_area", action_strategy="patch", patch_iterations=0)


# ---- classification -----------------------------------------------------------------------------------


def test_classification_is_cross_entropy_of_a_linear_head_on_mean_visible_features() -> None:
    torch.manual_seed(4)
    features, labels = torch.randn(4, 3, 5), torch.tensor([0, 2, 1, 2])
    head = ClassificationHead(num_classes=3, encoder_dim=5, label_smoothing=0.1)
    out = step_outputs(features, torch.tensor([[0, 1, 2]] * 4), label=labels)
    loss, stats = head(out)
    logits = head.classifier(features.mean(dim=1))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert stats["top1"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_classification_turbo_weight_is_one_over_log_classes() -> None:
    torch.manual_seed(5)
    out = step_outputs(torch.randn(2, 3, 5), torch.tensor([[0, 1, 2]] * 2), label=torch.tensor([1, 3]))
    head = ClassificationHead(num_classes=4, encoder_dim=5)
    weighted = ClassificationHead(num_classes=4, encoder_dim=5, turbo_weight=True)
    weighted.load_state_dict(head.state_dict())
    assert weighted(out)[0].item() == pytest.approx(head(out)[0].item() / math.log(4))


def test_classification_errors() -> None:
    with pytest.raises(ValueError, match="batch.label"):
        ClassificationHead(3, 5)(step_outputs(torch.randn(2, 3, 5), torch.tensor([[0, 1, 2]] * 2)))
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationHead(1, 5)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationHead(3, 5, label_smoothing=1.0)


def test_contrastive_logits_and_loss_are_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    features, text = torch.randn(4, 4, 5), torch.randn(4, 6)
    visible = torch.tensor([[0, 1, 4, 5]] * 4)
    theta = nn.Linear(5, 6)
    head = VideoTextInfoNCEHead(init_temperature=0.01)  # logit scale 100: bf16 logits would step by 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = head(step_outputs(features, visible, text, projection=theta))
        video = theta(features.mean(dim=1)).float()  # the projection itself runs in bf16
    assert loss.dtype == torch.float32
    expected = symmetric_infonce(F.normalize(video, dim=-1), F.normalize(text, dim=-1), torch.tensor(100.0))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
