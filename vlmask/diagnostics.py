"""Training diagnostics as pure functions of a batch's features: collapse and rank.

All take the encoder's token features (B, N, D) or pooled features (B, D); token features are
mean-pooled over the N tokens first (one vector per clip, the representation the frozen
evaluations read). They run without gradient in float32 and return Python floats, ready for a
``metrics.jsonl`` row.

* :func:`rankme`: the effective rank of the batch of pooled features, RankMe (Garrido, Balestriero,
  Najman, LeCun, "RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised
  Representations by Their Rank", ICML 2023, eq. 1): with the singular values sigma_k of the
  (B, D) matrix, p_k = sigma_k / ||sigma||_1 + eps (eps = 1e-7, the paper's), and
  RankMe = exp(-sum_k p_k log p_k). Between 1 (rank one) and min(B, D); a rank-k matrix with
  equal singular values gives k. Representations that collapse to a few directions have a
  low RankMe long before the loss shows it.
* :func:`feature_std`: the mean over the D dimensions of the standard deviation over the batch of
  the L2-normalised pooled features (SimSiam, Chen & He, CVPR 2021, sec. 4.1 "the std of the
  l2-normalized output"). Collapse to a constant vector gives 0; features spread uniformly
  on the sphere give about 1/sqrt(D). The std is the population one (divisor B).
* :func:`student_teacher_cosine`: the mean over the batch of the cosine similarity between the
  student's and the (EMA) teacher's pooled features of the same clip; only meaningful when both
  live in the same space (an EMA teacher of the student's encoder).

:func:`training_diagnostics` bundles them under the names a ``metrics.jsonl`` row uses:
``rankme``, ``student_std``, and with a teacher ``teacher_std`` and ``student_teacher_cos``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RANKME_EPS", "feature_std", "pooled", "rankme", "student_teacher_cosine", "training_diagnostics"]

#: The epsilon of RankMe (Garrido et al. 2023, eq. 1).
RANKME_EPS = 1e-7


def pooled(features: Tensor) -> Tensor:
    """(B, D) float32 without gradient: ``features`` as is when 2-D, the mean over tokens when (B, N, D)."""
    if features.ndim == 3:
        features = features.mean(dim=1)
    if features.ndim != 2:
        raise ValueError(f"features must have shape (B, D) or (B, N, D), got {tuple(features.shape)}")
    return features.detach().float()


@torch.no_grad()
def rankme(features: Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe effective rank of the batch's pooled features (see the module docstring).

    >>> round(rankme(torch.eye(4)), 3)
    4.0
    """
    sigma = torch.linalg.svdvals(pooled(features))
    total = sigma.sum()
    if not total > 0:
        return 1.0  # an all-zero batch: a single (degenerate) direction
    p = sigma / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def feature_std(features: Tensor) -> float:
    """Mean over dimensions of the std over the batch of the L2-normalised pooled features (0: collapse)."""
    x = F.normalize(pooled(features), dim=1)
    if x.shape[0] < 2:
        raise ValueError("feature_std needs a batch of at least 2 clips")
    return float(x.std(dim=0, unbiased=False).mean())


@torch.no_grad()
def student_teacher_cosine(student: Tensor, teacher: Tensor) -> float:
    """Mean cosine similarity between the student's and the teacher's pooled features, clip by clip."""
    s, t = pooled(student), pooled(teacher)
    if s.shape != t.shape:
        raise ValueError(f"student and teacher features must have the same pooled shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    return float(F.cosine_similarity(s, t, dim=1).mean())


def training_diagnostics(student: Tensor, teacher: Tensor | None = None) -> dict[str, float]:
    """``rankme`` and ``student_std`` of the student's features; with ``teacher`` also
    ``teacher_std``, and ``student_teacher_cos`` when the two have the same pooled width."""
    out = {"rankme": rankme(student), "student_std": feature_std(student)}
    if teacher is not None:
        out["teacher_std"] = feature_std(teacher)
        if pooled(teacher).shape == pooled(student).shape:
            out["student_teacher_cos"] = student_teacher_cosine(student, teacher)
    return out
