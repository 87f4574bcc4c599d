"""vlmask.diagnostics on constructed inputs: rank-k matrices, collapsed and spread features."""

from __future__ import annotations

import math

import pytest
import torch

from vlmask.diagnostics import feature_std, rankme, student_teacher_cosine, training_diagnostics


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rankme_of_a_rank_k_matrix_with_equal_singular_values_is_k(k):
    generator = torch.Generator().manual_seed(k)
    q_left, _ = torch.linalg.qr(torch.randn(64, k, generator=generator))
    q_right, _ = torch.linalg.qr(torch.randn(32, k, generator=generator))
    features = 5.0 * q_left @ q_right.T  # (64, 32), k equal singular values
    assert rankme(features) == pytest.approx(k, rel=1e-3)


def test_rankme_is_lower_for_a_dominant_direction_and_reads_token_features():
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 16, generator=generator)
    dominated = spread * torch.tensor([100.0] + [0.1] * 15)
    assert rankme(dominated) < 2.0 < 12.0 < rankme(spread) <= 16.0
    tokens = spread[:, None, :].expand(64, 5, 16)  # (B, N, D): pooled over tokens first
    assert rankme(tokens) == pytest.approx(rankme(spread), rel=1e-5)


def test_collapsed_features_have_zero_std_and_spread_ones_about_one_over_sqrt_d():
    constant = torch.ones(32, 10, 64) * torch.randn(64)
    assert feature_std(constant) == pytest.approx(0.0, abs=1e-6)
    spread = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1))
    assert feature_std(spread) == pytest.approx(1 / math.sqrt(64), rel=0.05)
    scaled = feature_std(spread * 100.0)  # normalised first: scale-free
    assert scaled == pytest.approx(feature_std(spread), rel=1e-5)


def test_cosine_of_identical_opposite_and_mixed_features():
    x = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(2))
    assert student_teacher_cosine(x, x) == pytest.approx(1.0, abs=1e-6)
    assert student_teacher_cosine(x, -x) == pytest.approx(-1.0, abs=1e-6)
    flipped = torch.cat([x[:4], -x[4:]])
    assert student_teacher_cosine(x, flipped) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same pooled shape"):
        student_teacher_cosine(x, x[:, :, :8])


def test_bundle_names():
    x = torch.randn(8, 4, 16)
    assert set(training_diagnostics(x)) == {"rankme", "student_std"}
    assert set(training_diagnostics(x, x)) == {"rankme", "student_std", "teacher_std", "student_teacher_cos"}
    assert set(training_diagnostics(x, torch.randn(8, 4, 32))) == {"rankme", "student_std", "teacher_std"}
