"""Seed statistics for ``vlmask compare``: mean, sample std and a Student-t 95% interval per
recipe and metric, and differences to a baseline recipe paired by seed.

A bottom-layer module: it imports only the standard library and scipy (for the Student t
quantile; scipy is a declared dependency, brought by scikit-learn).

For values x_1..x_n of one recipe and metric (one per seed), with the sample mean m and the
sample standard deviation s (divisor n - 1)::

    ci95 = m -/+ t_{0.975, n-1} * s / sqrt(n)

the two-sided 95% confidence interval of the mean under the usual normal model (Student,
1908; e.g. Wasserman, "All of Statistics", sec. 10.x). With n = 1 there is no interval (s is
undefined): ``std`` and ``ci95`` are None and the markdown says so.

The paired comparison (Student's paired t interval) takes, for each seed that both a recipe and
the baseline ran, the difference d_i = x_i(recipe) - x_i(baseline), and gives the interval of
the mean of the d_i the same way. ``significant`` is true when that interval excludes 0 (a
two-sided paired t-test at the 5% level); with fewer than two paired seeds it is false and
``ci95`` is None. Pairing by seed removes what the seed shares between recipes (the same clips,
crops and masks at equal seed: see tests/vlmask/test_fair.py), so a paired interval is
narrower than the difference of two unpaired ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

__all__ = [
    "PairedDifference",
    "SeedStats",
    "paired_difference",
    "seed_stats",
    "student_t_quantile",
]


def student_t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The ``probability`` quantile of Student's t with ``degrees_of_freedom`` (scipy.stats.t.ppf).

    >>> round(student_t_quantile(0.975, 1), 3), round(student_t_quantile(0.975, 2), 3)
    (12.706, 4.303)
    """
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom must be >= 1, got {degrees_of_freedom}")
    from scipy.stats import t

    return float(t.ppf(probability, degrees_of_freedom))


@dataclass(frozen=True)
class SeedStats:
    """One recipe's metric over seeds: ``std`` and ``ci95`` are None with one value."""

    recipe: str
    metric: str
    mean: float
    std: float | None
    ci95: tuple[float, float] | None
    n: int

    def as_json(self) -> dict[str, object]:
        row = asdict(self)
        row["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return row


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (recipe - baseline) over the seeds both ran; ``seeds`` lists them."""

    recipe: str
    baseline: str
    metric: str
    mean_difference: float
    ci95: tuple[float, float] | None
    significant: bool
    n: int
    seeds: tuple[int, ...]

    def as_json(self) -> dict[str, object]:
        row = asdict(self)
        row["ci95"] = list(self.ci95) if self.ci95 is not None else None
        row["seeds"] = list(self.seeds)
        return row


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, tuple[float, float] | None]:
    """(mean, sample std, Student-t interval of the mean at ``level``); std and interval are None
    for one value.

    >>> mean, std, ci = mean_interval([1.0, 2.0, 3.0])
    >>> mean, std, [round(x, 4) for x in ci]  # 2 -/+ 4.3027 * 1 / sqrt(3)
    (2.0, 1.0, [-0.4841, 4.4841])
    """
    if not values:
        raise ValueError("no values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None, None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean, std, (mean - half, mean + half)


def seed_stats(recipe: str, metric: str, values: Iterable[float | None]) -> SeedStats | None:
    """Mean, sample std and 95% interval of the finite ``values``; None when there are none."""
    finite = _finite(values)
    if not finite:
        return None
    mean, std, ci = mean_interval(finite)
    return SeedStats(recipe, metric, mean, std, ci, len(finite))


def paired_difference(recipe: str, baseline: str, metric: str, values: Mapping[int, float | None],
                      baseline_values: Mapping[int, float | None]) -> PairedDifference | None:
    """Paired-by-seed difference ``values[s] - baseline_values[s]`` over the seeds where both are
    finite; None when no seed is shared."""
    seeds = sorted(s for s in values if s in baseline_values and _finite([values[s]]) and _finite([baseline_values[s]]))
    if not seeds:
        return None
    differences = [float(values[s]) - float(baseline_values[s]) for s in seeds]  # type: ignore[arg-type]
    mean, _, ci = mean_interval(differences)
    significant = ci is not None and (ci[0] > 0.0 or ci[1] < 0.0)
    return PairedDifference(recipe, baseline, metric, mean, ci, significant, len(seeds), tuple(seeds))


def describe_difference(row: PairedDifference, scale: float = 100.0, unit: str = "points") -> str:
    """One sentence a reader understands, e.g. "fils beats mae on linear_probe.verb_top1 by
    4.1 points (95% CI 1.2 to 7.0, 3 seeds): beyond seed noise."

    ``scale`` turns fractions into points (100); differences are assumed "higher is better".

    >>> describe_difference(PairedDifference("fils", "mae", "knn.top1", 0.041, (0.012, 0.070), True, 3, (0, 1, 2)))
    'fils beats mae on knn.top1 by 4.1 points (95% CI 1.2 to 7.0, 3 seeds): beyond seed noise.'
    """
    amount = abs(row.mean_difference) * scale
    if round(amount, 1) == 0:  # what the sentence would show as 0.0
        verb = f"ties {row.baseline} on {row.metric}"
    elif row.mean_difference > 0:
        verb = f"beats {row.baseline} on {row.metric} by {amount:.1f} {unit}"
    elif row.mean_difference < 0:
        verb = f"trails {row.baseline} on {row.metric} by {amount:.1f} {unit}"
    else:
        verb = f"ties {row.baseline} on {row.metric}"
    if row.ci95 is None:
        return (f"{row.recipe} {verb} ({row.n} paired seed{'s' if row.n != 1 else ''}: no interval with one seed, "
                f"so seed noise cannot be judged).")
    low, high = (x * scale for x in row.ci95)
    judgement = "beyond seed noise" if row.significant else "within seed noise (the interval includes 0)"
    return f"{row.recipe} {verb} (95% CI {low:.1f} to {high:.1f}, {row.n} seeds): {judgement}."
