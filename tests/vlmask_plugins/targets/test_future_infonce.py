"""Faithful DPC dense InfoNCE (thesis eq. 2.5) and MemDPC's bi-directional form (eq. 3.6):
raw dot products, every other (clip, time, position) a negative, online future features."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import vlmask_plugins.targets.future_infonce as future_infonce_module
from vlmask.types import Batch, StepOutputs
from vlmask_plugins.encoders.future_predictor import FuturePredictor
from vlmask_plugins.encoders.vit import VideoViT
from vlmask_plugins.maskers.future_blocks import FutureBlocksMasker
from vlmask_plugins.targets.future_infonce import FutureInfoNCETarget, future_infonce


def test_doctests() -> None:
    assert doctest.testmod(future_infonce_module).failed == 0


def test_raw_dot_product_by_hand() -> None:
    """Two clips, one future token each. Logits [[2, 0], [0, 1]] (raw dot products):
    row 0: log(1 + e^-2) = 0.126928; row 1: log(1 + e^-1) = 0.313262; mean 0.220095.
    (Cosine over 0.07 would give about 1e-6: normalisation and temperature are absent.)"""
    predicted = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    true = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
    loss, top1 = future_infonce(predicted, true)
    assert loss.item() == pytest.approx(0.220095, abs=1e-6)
    assert top1.item() == 1.0


def test_every_other_clip_time_and_position_is_a_negative() -> None:
    """2 clips x 2 future tokens, D = 1, every prediction 1, true features log 1..log 4: every
    row's logits are [log 1, log 2, log 3, log 4], so the softmax denominator is 1+2+3+4 = 10
    and row (b, i) scores -log(k / 10) with k its own entry: the positive is (b, i) and the
    three other (clip, token) pairs, of the same clip and of the other, are the negatives.
    Mean of log 10, log 5, log 10/3, log 10/4 = 1.508072."""
    predicted = torch.ones(2, 2, 1)
    true = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).view(2, 2, 1)
    loss, top1 = future_infonce(predicted, true)
    assert loss.item() == pytest.approx(1.508072, abs=1e-6)
    assert top1.item() == 0.25  # every row's highest logit is (1, 1)


def step(bidirectional: bool = False, memory_slots: int | None = None) -> tuple[StepOutputs, VideoViT, FuturePredictor]:
    torch.manual_seed(0)
    encoder = VideoViT(num_frames=8, img_size=16, tubelet=2, patch=8, embed_dim=16, depth=1, num_heads=2)
    grid = encoder.grid  # 4 x 2 x 2
    predictor = FuturePredictor(encoder_dim=16, grid=grid, dim=16, depth=1, num_heads=2, memory_slots=memory_slots)
    video = torch.randn(3, 3, 8, 16, 16)
    mask = FutureBlocksMasker(num_future_slots=2)(Batch(video=video), grid)
    visible = encoder(video, mask.visible)
    out = StepOutputs(
        batch=Batch(video=video), grid=grid, mask=mask, visible_features=visible,
        predictions=predictor(visible, mask), encoder=encoder, predictor=predictor,
    )  # fmt: skip
    return out, encoder, predictor


def test_target_scores_the_online_encoders_future_features() -> None:
    out, encoder, _ = step()
    loss, stats = FutureInfoNCETarget()(out)
    true = encoder(out.batch.video, out.mask.predict)
    expected = F.cross_entropy(out.predictions.reshape(24, 16) @ true.reshape(24, 16).T, torch.arange(24))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(stats) == {"top1"}
    # the true side carries gradient into the encoder (no teacher, no stop-gradient)
    out.predictions = out.predictions.detach()
    encoder.zero_grad()
    FutureInfoNCETarget()(out)[0].backward()
    assert encoder.patch_embed.weight.grad is not None and encoder.patch_embed.weight.grad.abs().sum() > 0


def test_bidirectional_is_the_sum_of_both_directions() -> None:
    out, encoder, predictor = step(bidirectional=True, memory_slots=5)
    loss, stats = FutureInfoNCETarget(bidirectional=True)(out)
    true_future = encoder(out.batch.video, out.mask.predict)
    forward, _ = future_infonce(out.predictions, true_future)
    past = predictor.rollout(true_future, out.mask.predict, out.mask.visible, reverse=True)
    backward, _ = future_infonce(past, out.visible_features)
    assert loss.item() == pytest.approx((forward + backward).item(), rel=1e-5)  # MemDPC sums
    assert stats["forward"].item() == pytest.approx(forward.item(), rel=1e-5)
    assert stats["backward"].item() == pytest.approx(backward.item(), rel=1e-5)
    assert not math.isclose(forward.item(), backward.item(), rel_tol=1e-3)


def test_missing_parts_are_clear_errors() -> None:
    out, _, _ = step()
    out.encoder = None
    with pytest.raises(ValueError, match="needs the student encoder"):
        FutureInfoNCETarget()(out)
    out, _, _ = step()
    out.predictor = None
    with pytest.raises(ValueError, match="rollout"):
        FutureInfoNCETarget(bidirectional=True)(out)
    with pytest.raises(ValueError, match="temperature"):
        FutureInfoNCETarget(temperature=0)
    assert FutureInfoNCETarget.requires == frozenset({"predictor"})
