"""Targets against the reference semantics: VideoMAE pixels, data2vec/V-JEPA latents,
FILS language-space prediction (eq. 7-8) and DPC dense InfoNCE (eq. 2.5)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlmask_plugins.targets.dense_infonce as dense_infonce_module
import vlmask_plugins.targets.language_space as language_space_module
import vlmask_plugins.targets.pixels as pixels_module
from vlmask.types import Batch, Mask, StepOutputs, TokenGrid, gather_tokens
from vlmask_plugins.targets import (
    DenseInfoNCETarget,
    LanguageSpaceTarget,
    LatentTarget,
    NormalizedPixelsTarget,
    register_plugins,
)
from vlmask_plugins.targets.pixels import IMAGENET_MEAN, IMAGENET_STD, pixel_targets


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The data loader's ImageNet normalisation of [0, 1] pixels (B, C, T, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype).view(1, 3, 1, 1, 1)
    return (pixels - mean) / std


def outputs(
    grid: TokenGrid,
    mask: Mask,
    video: torch.Tensor | None = None,
    predictions: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    projection: nn.Module | None = None,
    teacher_projection: nn.Module | None = None,
) -> StepOutputs:
    batch_size = mask.visible.shape[0]
    video = torch.zeros(batch_size, 3, 1, 1, 1) if video is None else video
    return StepOutputs(
        batch=Batch(video=video),
        grid=grid,
        mask=mask,
        visible_features=torch.zeros(batch_size, mask.num_visible, 4),
        predictions=predictions,
        teacher_features=teacher_features,
        projection=projection,
        teacher_projection=teacher_projection,
    )


def test_register_plugins_registers_every_target() -> None:
    seen: list[tuple[str, str]] = []
    register_plugins(lambda kind, name, factory: seen.append((kind, name)))
    assert sorted(seen) == sorted(
        [("target", n) for n in ("normalized_pixels", "latent", "language_space", "dense_infonce", "future_infonce")]
    )


@pytest.mark.parametrize("module", [pixels_module, language_space_module, dense_infonce_module])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, raise_on_error=False)  # type: ignore[arg-type]
    assert result.failed == 0 and result.attempted > 0


# ---- normalized pixels ------------------------------------------------------------------------


def test_paper_clip_gives_1536_values_per_token() -> None:
    grid = TokenGrid.for_clip(16, 224, 224)
    video = torch.zeros(1, 3, 16, 224, 224)
    assert pixel_targets(video, grid).shape == (1, 1568, 1536)


def test_pixels_undo_input_normalisation_and_flatten_t_p_p_c_channel_fastest() -> None:
    grid = TokenGrid(t=2, h=1, w=2, tubelet=2, patch=2)
    pixels = torch.rand(1, 3, 4, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flat = pixel_targets(normalise_pixels(pixels), grid, normalize=False)
    assert flat.shape == (1, 4, 2 * 2 * 2 * 3)
    for token in range(4):
        slot, x = token // 2, token % 2
        cube = pixels[0, :, slot * 2 : slot * 2 + 2, 0:2, x * 2 : x * 2 + 2]  # C, t, p, p
        expected = cube.permute(1, 2, 3, 0).reshape(-1)  # (t, p, p, c), channel fastest
        torch.testing.assert_close(flat[0, token], expected)


def test_pixels_per_token_per_channel_standardisation_uses_unbiased_std() -> None:
    grid = TokenGrid(t=1, h=1, w=2, tubelet=2, patch=2)
    pixels = torch.rand(2, 3, 2, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    normed = pixel_targets(normalise_pixels(pixels), grid).view(2, 2, 8, 3)
    for clip in range(2):
        for token in range(2):
            for channel in range(3):
                values = pixels[clip, channel, :, :, token * 2 : token * 2 + 2].reshape(-1)
                expected = (values - values.mean()) / (values.std(unbiased=True) + 1e-6)
                torch.testing.assert_close(normed[clip, token, :, channel], expected)


def test_pixel_epsilon_is_added_to_the_std_not_the_variance() -> None:
    grid = TokenGrid(t=1, h=1, w=1, tubelet=2, patch=2)  # 8 values per channel
    signs = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    spread = 1e-6  # std of the token ~ 1.07e-6, comparable to eps
    pixels = (0.5 + spread * signs).view(1, 1, 2, 2, 2).repeat(1, 3, 1, 1, 1)
    normed = pixel_targets(normalise_pixels(pixels), grid).view(8, 3)
    unbiased_std = math.sqrt(8 / 7) * spread
    expected = spread * signs / (unbiased_std + 1e-6)  # ~ +-0.483
    torch.testing.assert_close(normed[:, 0], expected, rtol=1e-6, atol=1e-9)
    eps_on_variance = spread * signs / math.sqrt(unbiased_std**2 + 1e-6)  # ~ +-0.001
    assert not torch.allclose(normed[:, 0], eps_on_variance, atol=0.1)


def test_pixel_loss_is_mse_on_the_predicted_tokens_only() -> None:
    grid = TokenGrid(t=2, h=2, w=2, tubelet=2, patch=2)
    generator = torch.Generator().manual_seed(2)
    video = normalise_pixels(torch.rand(2, 3, 4, 4, 4, generator=generator))
    mask = Mask(visible=torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7]]), predict=torch.tensor([[2, 3, 6, 7], [0, 1, 4, 5]]))
    full = pixel_targets(video, grid)
    exact = gather_tokens(full, mask.predict).clone().requires_grad_(True)
    target = NormalizedPixelsTarget()
    assert target(outputs(grid, mask, video, predictions=exact)).item() == pytest.approx(0.0, abs=1e-10)
    wrong_tokens = gather_tokens(full, mask.visible)
    loss = target(outputs(grid, mask, video, predictions=wrong_tokens))
    torch.testing.assert_close(loss, ((wrong_tokens - gather_tokens(full, mask.predict)) ** 2).mean())
    shifted = exact.detach().clone()
    shifted[0, 0, 0] += 2.0
    assert target(outputs(grid, mask, video, predictions=shifted)).item() == pytest.approx(4.0 / shifted.numel())


def test_pixel_target_checks_shapes_and_predictor() -> None:
    grid = TokenGrid(t=1, h=1, w=2, tubelet=2, patch=2)
    mask = Mask(visible=torch.tensor([[0]]), predict=torch.tensor([[1]]))
    video = torch.zeros(1, 3, 2, 2, 4)
    with pytest.raises(ValueError, match="predictor"):
        NormalizedPixelsTarget()(outputs(grid, mask, video))
    with pytest.raises(ValueError, match="output width"):
        NormalizedPixelsTarget()(outputs(grid, mask, video, predictions=torch.zeros(1, 1, 5)))
    with pytest.raises(ValueError, match="std"):
        NormalizedPixelsTarget(std=(0.2, 0.0, 0.2))


# ---- latent ---------------------------------------------------------------------------------------


def latent_case(dim: int = 6) -> tuple[TokenGrid, Mask, torch.Tensor, torch.Tensor]:
    grid = TokenGrid(t=2, h=1, w=2)
    generator = torch.Generator().manual_seed(3)
    mask = Mask(visible=torch.tensor([[0], [3]]), predict=torch.tensor([[1, 2, 3], [0, 1, 2]]))
    teacher = (torch.randn(2, 4, dim, generator=generator) * 3 + 1).requires_grad_(True)
    predictions = torch.randn(2, 3, dim, generator=generator).requires_grad_(True)
    return grid, mask, teacher, predictions


def layer_norm_by_hand(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)


@pytest.mark.parametrize(
    ("loss", "reference"),
    [
        ("l1", lambda p, t: (p - t).abs().mean()),
        ("mse", lambda p, t: ((p - t) ** 2).mean()),
        ("smooth_l1", lambda p, t: torch.where((p - t).abs() < 1, 0.5 * (p - t) ** 2, (p - t).abs() - 0.5).mean()),
    ],
)
def test_latent_regresses_layer_normed_teacher_features_at_predicted_tokens(loss: str, reference: object) -> None:
    grid, mask, teacher, predictions = latent_case()
    value = LatentTarget(loss=loss)(outputs(grid, mask, predictions=predictions, teacher_features=teacher))
    expected_target = gather_tokens(layer_norm_by_hand(teacher.detach()), mask.predict)
    torch.testing.assert_close(value, reference(predictions, expected_target))  # type: ignore[operator]


def test_latent_default_is_l1_and_no_gradient_reaches_the_teacher() -> None:
    grid, mask, teacher, predictions = latent_case()
    target = LatentTarget()
    assert target.loss == "l1"
    target(outputs(grid, mask, predictions=predictions, teacher_features=teacher)).backward()
    assert teacher.grad is None
    assert predictions.grad is not None and predictions.grad.abs().sum() > 0


def test_latent_requires_teacher_and_known_loss() -> None:
    grid, mask, _, predictions = latent_case()
    with pytest.raises(ValueError, match="teacher"):
        LatentTarget()(outputs(grid, mask, predictions=predictions))
    with pytest.raises(ValueError, match="loss must be one of"):
        LatentTarget(loss="cosine")


# ---- language space (FILS eq. 7-8) -----------------------------------------------------------------


def language_case() -> tuple[TokenGrid, Mask, torch.Tensor, torch.Tensor, nn.Linear, nn.Linear]:
    torch.manual_seed(4)
    grid = TokenGrid(t=2, h=2, w=2)
    mask = Mask(visible=torch.tensor([[0, 1, 2], [5, 6, 7]]), predict=torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]]))
    teacher = torch.randn(2, 8, 6).requires_grad_(True)
    predictions = torch.randn(2, 5, 6).requires_grad_(True)
    return grid, mask, teacher, predictions, nn.Linear(6, 10), nn.Linear(6, 10)


def test_language_space_loss_is_eq8_and_d_times_element_mean_l1() -> None:
    grid, mask, teacher, predictions, student_theta, teacher_theta = language_case()
    out = outputs(grid, mask, None, predictions, teacher, student_theta, teacher_theta)
    p = F.normalize(student_theta(predictions), dim=-1)
    g_teacher = F.normalize(teacher_theta(gather_tokens(teacher, mask.predict)), dim=-1)
    g_student = F.normalize(student_theta(gather_tokens(teacher, mask.predict)), dim=-1)
    by_teacher = LanguageSpaceTarget(projection="teacher")(out)
    torch.testing.assert_close(by_teacher, (p - g_teacher).abs().sum(-1).mean())
    torch.testing.assert_close(by_teacher, 10 * F.l1_loss(p, g_teacher))  # D = 10: eq. 8 is D times the element mean
    # the default maps the target with the student's theta (eq. 7: "the same vision mapping in Eq. 4"),
    # even when the teacher holds a copy
    torch.testing.assert_close(LanguageSpaceTarget()(out), (p - g_student).abs().sum(-1).mean())
    assert not torch.allclose(by_teacher, LanguageSpaceTarget()(out))


@pytest.mark.parametrize("projection", ["student", "teacher"])
def test_language_space_target_side_has_no_gradient(projection: str) -> None:
    grid, mask, teacher, predictions, student_theta, teacher_theta = language_case()
    target = LanguageSpaceTarget(projection=projection)
    target(outputs(grid, mask, None, predictions, teacher, student_theta, teacher_theta)).backward()
    assert teacher.grad is None
    assert all(p.grad is None for p in teacher_theta.parameters())
    assert predictions.grad is not None and student_theta.weight.grad is not None


def test_language_space_student_projection_maps_the_target_under_no_grad() -> None:
    grid, mask, teacher, predictions, student_theta, teacher_theta = language_case()
    LanguageSpaceTarget()(outputs(grid, mask, None, predictions, teacher, student_theta, teacher_theta)).backward()
    assert teacher.grad is None
    actual = student_theta.weight.grad.clone()
    # Expected gradient: only through p, with g a constant computed by the same theta.
    student_theta.zero_grad()
    with torch.no_grad():
        g = F.normalize(student_theta(gather_tokens(teacher, mask.predict)), dim=-1)
    p = F.normalize(student_theta(predictions), dim=-1)
    (p - g).abs().sum(-1).mean().backward()
    torch.testing.assert_close(actual, student_theta.weight.grad)
    # and it differs from letting gradient through both sides
    student_theta.zero_grad()
    both = F.normalize(student_theta(gather_tokens(teacher.detach(), mask.predict)), dim=-1)
    (F.normalize(student_theta(predictions), dim=-1) - both).abs().sum(-1).mean().backward()
    assert not torch.allclose(actual, student_theta.weight.grad)


def test_language_space_smooth_l1_mean_is_the_released_code_option() -> None:
    grid, mask, teacher, predictions, student_theta, teacher_theta = language_case()
    loss = LanguageSpaceTarget(loss="smooth_l1_mean", projection="teacher")(
        outputs(grid, mask, None, predictions, teacher, student_theta, teacher_theta)
    )
    p = F.normalize(student_theta(predictions), dim=-1)
    g = F.normalize(teacher_theta(gather_tokens(teacher, mask.predict)), dim=-1)
    torch.testing.assert_close(loss, F.smooth_l1_loss(p, g, beta=1.0))


def test_language_space_needs_projection_teacher_and_predictor() -> None:
    grid, mask, teacher, predictions, student_theta, _ = language_case()
    with pytest.raises(ValueError, match="projection='teacher' needs a teacher that holds a copy"):
        LanguageSpaceTarget(projection="teacher")(outputs(grid, mask, None, predictions, teacher, student_theta))
    with pytest.raises(ValueError, match="projection must be one of student, teacher"):
        LanguageSpaceTarget(projection="ema")
    with pytest.raises(ValueError, match="projection"):
        LanguageSpaceTarget()(outputs(grid, mask, None, predictions, teacher))
    with pytest.raises(ValueError, match="teacher"):
        LanguageSpaceTarget()(outputs(grid, mask, None, predictions, None, student_theta))
    with pytest.raises(ValueError, match="loss must be one of"):
        LanguageSpaceTarget(loss="l1")


# ---- dense InfoNCE (DPC eq. 2.5) ----------------------------------------------------------------------


def dense_case() -> tuple[TokenGrid, Mask, torch.Tensor]:
    torch.manual_seed(5)
    grid = TokenGrid(t=3, h=1, w=2)
    mask = Mask(visible=torch.tensor([[0, 1]] * 3), predict=torch.tensor([[2, 3, 4, 5]] * 3))
    return grid, mask, torch.randn(3, 6, 8)


def test_dense_infonce_positives_are_the_same_clip_and_position() -> None:
    grid, mask, teacher = dense_case()
    predictions = torch.randn(3, 4, 8)
    loss, stats = DenseInfoNCETarget(temperature=0.5)(outputs(grid, mask, None, predictions, teacher))
    pred = F.normalize(predictions.reshape(12, 8), dim=-1)
    true = F.normalize(gather_tokens(teacher, mask.predict).reshape(12, 8), dim=-1)
    logits = pred @ true.T / 0.5  # every predicted (b, i) against every true (b', j)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(12)))
    assert set(stats) == {"top1"}


def test_dense_infonce_uses_other_clips_as_negatives() -> None:
    grid, mask, teacher = dense_case()
    predictions = torch.randn(3, 4, 8)
    term = DenseInfoNCETarget()
    batched = term(outputs(grid, mask, None, predictions, teacher))[0]
    one_clip_mask = Mask(mask.visible[:1], mask.predict[:1])
    per_clip = torch.stack(
        [term(outputs(grid, one_clip_mask, None, predictions[b : b + 1], teacher[b : b + 1]))[0] for b in range(3)]
    )
    assert batched > per_clip.mean()  # more negatives: the other clips' tokens
    # exactly the cross-entropy over all 12 (clip, token) rows against all 12 true features
    p = F.normalize(predictions.reshape(12, 8), dim=-1)
    g = F.normalize(gather_tokens(teacher, mask.predict).reshape(12, 8), dim=-1)
    torch.testing.assert_close(batched, F.cross_entropy(p @ g.T / term.temperature, torch.arange(12)))


def test_dense_infonce_perfect_prediction_beats_shuffled() -> None:
    grid, mask, teacher = dense_case()
    perfect = gather_tokens(teacher, mask.predict).clone()
    shuffled = perfect.reshape(12, 8)[torch.randperm(12, generator=torch.Generator().manual_seed(0))].reshape(3, 4, 8)
    term = DenseInfoNCETarget()
    perfect_loss, perfect_stats = term(outputs(grid, mask, None, perfect, teacher))
    shuffled_loss, _ = term(outputs(grid, mask, None, shuffled, teacher))
    assert perfect_loss < shuffled_loss
    assert perfect_stats["top1"].item() == 1.0


def test_dense_infonce_requires_a_teacher_and_positive_temperature() -> None:
    grid, mask, _ = dense_case()
    with pytest.raises(ValueError, match="teacher"):
        DenseInfoNCETarget()(outputs(grid, mask, None, torch.randn(3, 4, 8)))
    with pytest.raises(ValueError, match="temperature"):
        DenseInfoNCETarget(temperature=0.0)


def test_language_space_loss_is_computed_in_fp32_under_bf16_autocast() -> None:
    grid, mask, teacher, predictions, student_theta, teacher_theta = language_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = LanguageSpaceTarget(projection="teacher")
        loss = target(outputs(grid, mask, None, predictions, teacher, student_theta, teacher_theta))
        p = student_theta(predictions).float()  # theta in bf16, as autocast runs it
        g = teacher_theta(gather_tokens(teacher, mask.predict)).float()
    assert loss.dtype == torch.float32
    expected = (F.normalize(p, dim=-1) - F.normalize(g, dim=-1)).abs().sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
