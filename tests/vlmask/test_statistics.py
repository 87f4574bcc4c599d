"""vlmask.statistics on hand-computable numbers (contract: comparison.json ``stats``, ``paired``)."""

from __future__ import annotations

import math

import pytest

from vlmask.statistics import describe_difference, mean_interval, paired_difference, seed_stats, student_t_quantile

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)


def test_t_quantiles_match_the_printed_table():
    assert student_t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert student_t_quantile(0.975, 2) == pytest.approx(T_975_2, abs=1e-9)
    assert student_t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-4)


def test_three_seeds_give_mean_sample_std_and_the_t_interval():
    row = seed_stats("mae", "knn.top1", [1.0, 2.0, 3.0])
    assert (row.mean, row.std, row.n) == (2.0, 1.0, 3)  # sample std: sqrt(((-1)^2 + 0 + 1^2) / 2) = 1
    half = T_975_2 * 1.0 / math.sqrt(3)  # 2.4841
    assert row.ci95 == pytest.approx((2.0 - half, 2.0 + half))
    assert row.as_json()["ci95"] == [pytest.approx(2.0 - half), pytest.approx(2.0 + half)]


def test_one_seed_has_no_interval_and_missing_values_are_skipped():
    row = seed_stats("mae", "knn.top1", [0.25, None, float("nan")])
    assert (row.mean, row.std, row.ci95, row.n) == (0.25, None, None, 1)
    assert seed_stats("mae", "knn.top1", [None]) is None
    with pytest.raises(ValueError):
        mean_interval([])


def test_a_constant_paired_gain_is_beyond_noise_even_when_the_seeds_vary_a_lot():
    # recipe and baseline vary by 30 points across seeds, but the recipe is 10 points ahead on each seed
    recipe = {0: 0.40, 1: 0.70, 2: 0.55}
    baseline = {0: 0.30, 1: 0.60, 2: 0.45}
    row = paired_difference("fils", "mae", "knn.top1", recipe, baseline)
    assert row.mean_difference == pytest.approx(0.10) and row.ci95 == pytest.approx((0.10, 0.10))
    assert row.significant and row.n == 3 and row.seeds == (0, 1, 2)
    unpaired = [seed_stats("x", "m", recipe.values()), seed_stats("x", "m", baseline.values())]
    assert unpaired[0].ci95[0] < unpaired[1].ci95[1]  # the unpaired intervals overlap


def test_differences_that_change_sign_are_within_noise():
    row = paired_difference("fils", "mae", "m", {0: 0.6, 1: 0.4, 2: 0.5, 7: 0.9}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert row.seeds == (0, 1, 2)  # seed 7 has no baseline: not paired
    # differences 0.1, -0.1, 0.0: mean 0, sample std 0.1, half width 4.3027 * 0.1 / sqrt(3) = 0.2484
    assert row.mean_difference == pytest.approx(0.0, abs=1e-12)
    assert row.ci95 == pytest.approx((-0.24841377, 0.24841377))
    assert not row.significant
    assert "within seed noise" in describe_difference(row)


def test_one_shared_seed_gives_no_interval_and_says_so():
    row = paired_difference("fils", "mae", "m", {0: 0.6}, {0: 0.5, 1: 0.5})
    assert row.ci95 is None and not row.significant and row.n == 1
    assert "no interval with one seed" in describe_difference(row)
    assert paired_difference("fils", "mae", "m", {3: 0.6}, {0: 0.5}) is None


def test_the_sentence_names_the_winner_the_points_and_the_verdict():
    gain = paired_difference("fils", "mae", "linear_probe.verb_top1", {0: 0.53, 1: 0.50, 2: 0.56}, {0: 0.50, 1: 0.45, 2: 0.5177})
    text = describe_difference(gain)
    assert text.startswith("fils beats mae on linear_probe.verb_top1 by 4.1 points (95% CI")
    assert text.endswith("beyond seed noise.") and gain.significant
    loss = paired_difference("mae", "fils", "knn.top1", {0: 0.4, 1: 0.3}, {0: 0.5, 1: 0.45})
    assert describe_difference(loss).startswith("mae trails fils on knn.top1 by 12.5 points")
