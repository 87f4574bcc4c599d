"""Classification scores shared by evaluation plugins and ``vlmask finetune``.

``top1`` is plain accuracy over labelled rows; ``group_top1`` is EPIC-Kitchens-style verb or
noun accuracy from action scores marginalised over the classes sharing a verb (or a noun), as
in FILS (Ahmadian et al., BMVC 2024) finetuning evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def marginalise(probabilities: Tensor, groups: list[str]) -> tuple[Tensor, list[str]]:
    """Sum class probabilities (N, C) over classes sharing a group name (a verb or a noun).

    EPIC-Kitchens-style verb and noun scores from action scores, as in FILS (BMVC 2024) finetuning
    evaluation: P(verb v) = sum of P(class c) over the classes c whose verb is v. Returns the
    (N, G) group probabilities and the G group names (sorted).

    >>> p = torch.tensor([[0.5, 0.2, 0.3]])
    >>> scores, names = marginalise(p, ["open", "close", "open"])
    >>> names, [round(v, 6) for v in scores[0].tolist()]
    (['close', 'open'], [0.2, 0.8])
    """
    if probabilities.ndim != 2 or probabilities.shape[1] != len(groups):
        raise ValueError(f"probabilities must have shape (N, {len(groups)}), got {tuple(probabilities.shape)}")
    names = sorted(set(groups))
    index = {name: i for i, name in enumerate(names)}
    membership = torch.zeros(len(groups), len(names), dtype=probabilities.dtype, device=probabilities.device)
    membership[torch.arange(len(groups)), torch.tensor([index[g] for g in groups])] = 1.0
    return probabilities @ membership, names


def top1(scores: Tensor, labels: Tensor, labelled: Tensor) -> float:
    """Fraction of labelled rows whose argmax score is their label (label -1: always wrong)."""
    if int(labelled.sum()) == 0:
        raise ValueError("no labelled rows")
    correct = (scores.argmax(dim=1) == labels) & (labels >= 0)
    return float(correct[labelled].float().mean())


def group_top1(probabilities: Tensor, class_groups: list[str | None], truth: list[str | None]) -> float | None:
    """Top-1 of marginalised groups (verbs or nouns) over rows with a known ``truth``; None
    when a class has no group or no row has one."""
    if any(g is None for g in class_groups):
        return None
    rows = [i for i, t in enumerate(truth) if t is not None]
    if not rows:
        return None
    scores, names = marginalise(probabilities[rows], [g for g in class_groups if g is not None])
    predicted = scores.argmax(dim=1).tolist()
    return sum(names[p] == truth[i] for p, i in zip(predicted, rows)) / len(rows)
