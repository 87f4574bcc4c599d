"""The evaluator contract: pooling, and the :class:`EvalFeatures` every evaluator (plugin kind
``evaluator``) reads. Extraction and the on-disk feature cache are engine-owned:
``vlmask.caches`` (``extract_features``, ``FeatureCache``).

The protocols are the frozen-feature ones of FILS (Ahmadian et al., BMVC 2024) and the thesis
it comes from: the pretrained encoder runs in eval mode, without gradient, on every token of
the evaluation clip (no masking), and its token features are pooled into one vector per clip:

* ``mean``: the mean over all tokens, (N, D);
* ``temporal``: the mean over the spatial positions of each temporal slot, the slots
  concatenated in time order, (N, t * D). It keeps the order of events, so a linear probe can
  tell "move left" from "move right" where the mean over time cannot.

An evaluator is any object with ``evaluate(features: EvalFeatures) -> dict[str, float] | None``
(see :class:`Evaluator`); it returns None when its section cannot be computed from what the
run has (no labels, no captions, no text encoder, no projection), and the section is then
absent from ``eval.json``: never faked.

Evaluators that read the token features themselves (the attentive probe) set an attribute
``token_budget`` (int): extraction then also keeps ``tokens``, (N, T', D) float16 on the CPU, where
T' <= token_budget: when the encoder's tokens form its grid (t, h, w) and t*h*w exceeds the
budget, each temporal slot is average-pooled spatially to (h', w') = ceil(h / k), ceil(w / k) with
the smallest k that fits (:func:`reduce_tokens`); the time axis is never pooled. float16 halves
the memory: 900 clips x 64 tokens x 192 dims take 22 MB. The cache stores them beside the
pooled features (``...-tokens.safetensors``, float16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from vlmask.types import TokenGrid

#: Poolings every extraction produces, by name.
POOLINGS: tuple[str, ...] = ("mean", "temporal")

#: The cache entry (and ``extract_features`` key) of the kept token features.
TOKENS = "tokens"


def reduce_tokens(tokens: Tensor, grid: TokenGrid | None, budget: int) -> Tensor:
    """At most ``budget`` tokens per clip: (B, N, D) -> (B, T', D) by spatial average pooling of
    each temporal slot (see the module docstring); unchanged when N <= budget. Tokens that do not
    form ``grid`` cannot be pooled spatially and are an error when over the budget.

    >>> reduce_tokens(torch.arange(8.0).view(1, 8, 1), TokenGrid(t=2, h=2, w=2), 2).flatten().tolist()
    [1.5, 5.5]
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    b, n, d = tokens.shape
    if n <= budget:
        return tokens
    if grid is None or n != grid.num_tokens:
        raise ValueError(f"{n} tokens exceed the token budget {budget} and do not form the encoder's grid; raise the budget")
    if grid.t > budget:
        raise ValueError(f"the token budget {budget} is below the {grid.t} temporal slots; raise it")
    k = 1
    while grid.t * math.ceil(grid.h / k) * math.ceil(grid.w / k) > budget:
        k += 1
    size = (math.ceil(grid.h / k), math.ceil(grid.w / k))
    x = tokens.reshape(b * grid.t, grid.h, grid.w, d).permute(0, 3, 1, 2)
    x = torch.nn.functional.adaptive_avg_pool2d(x.float(), size)
    return x.permute(0, 2, 3, 1).reshape(b, grid.t * size[0] * size[1], d)


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def pool_tokens(tokens: Tensor, grid: TokenGrid | None) -> dict[str, Tensor]:
    """Pool token features (B, N, D) in (t, h, w) order into ``{"mean": (B, D), "temporal": (B, t*D)}``.

    ``temporal`` is left out when the tokens do not form ``grid`` (no grid, or N != t*h*w).

    >>> tokens = torch.arange(8.0).view(1, 4, 2)  # t=2 slots of h*w=2 tokens, D=2
    >>> pooled = pool_tokens(tokens, TokenGrid(t=2, h=1, w=2))
    >>> pooled["mean"].tolist(), pooled["temporal"].tolist()
    ([[3.0, 4.0]], [[1.0, 2.0, 5.0, 6.0]])
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (B, N, D), got {tuple(tokens.shape)}")
    tokens = tokens.float()
    pooled = {"mean": tokens.mean(dim=1)}
    if grid is not None and tokens.shape[1] == grid.num_tokens:
        b, _, d = tokens.shape
        pooled["temporal"] = tokens.view(b, grid.t, grid.spatial, d).mean(dim=2).flatten(1)
    return pooled


@dataclass
class SplitFeatures:
    """Pooled features and annotations of the clips of one manifest (rows = clips that loaded).

    ``pooled[name]`` is (N, ·) float32 for each name of :data:`POOLINGS` that was computed.
    ``labels`` (N,) long: the class index into :attr:`EvalFeatures.classes`, -1 when the clip
    has no label *or* a label that is not among the classes; ``labelled`` (N,) bool tells the
    two apart (a clip with an unknown class still counts, as an error, in accuracies).
    ``captions`` ("" when absent), ``verbs`` and ``nouns`` (None when absent) are per row.
    ``tokens`` (N, T', D) float16: the token features, kept only when an evaluator asked for them
    (``token_budget``), else None.
    """

    pooled: dict[str, Tensor]
    labels: Tensor
    labelled: Tensor
    captions: list[str]
    verbs: list[str | None]
    nouns: list[str | None]
    tokens: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for name, value in self.pooled.items():
            if value.ndim != 2 or value.shape[0] != n:
                raise ValueError(f"pooled[{name!r}] must have shape ({n}, D), got {tuple(value.shape)}")
        if self.tokens is not None and (self.tokens.ndim != 3 or self.tokens.shape[0] != n):
            raise ValueError(f"tokens must have shape ({n}, T, D), got {tuple(self.tokens.shape)}")
        if self.labelled.shape != (n,) or not (len(self.captions) == len(self.verbs) == len(self.nouns) == n):
            raise ValueError(f"every per-clip field of a split must have {n} rows")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def features(self, pooling: str) -> Tensor | None:
        """The (N, ·) features of ``pooling``, or None when they were not computed."""
        return self.pooled.get(check_pooling(pooling))


@dataclass
class EvalFeatures:
    """Everything an evaluator may read: frozen features of the train and val manifests.

    ``classes`` are the training set's class names (``labels`` index them; the probe's output
    space). ``class_verbs[c]`` / ``class_nouns[c]`` are the verb and noun of class ``c`` read
    from the manifest rows (None when unknown): EPIC-Kitchens-style verb and noun accuracy is
    marginalised through them. ``project`` maps mean-pooled video features (N, D) into the text
    space (the student's video-to-text projection theta; None without one) and
    ``encode_text(texts) -> (len(texts), dim)`` is the run's frozen text encoder behind the
    caption-embedding cache (None without a text encoder).
    """

    train: SplitFeatures
    val: SplitFeatures
    classes: list[str]
    class_verbs: list[str | None] = field(default_factory=list)
    class_nouns: list[str | None] = field(default_factory=list)
    project: Callable[[Tensor], Tensor] | None = None
    encode_text: Callable[[list[str]], Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.class_verbs:
            self.class_verbs = [None] * len(self.classes)
        if not self.class_nouns:
            self.class_nouns = [None] * len(self.classes)
        if len(self.class_verbs) != len(self.classes) or len(self.class_nouns) != len(self.classes):
            raise ValueError("class_verbs and class_nouns must have one entry per class")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@runtime_checkable
class Evaluator(Protocol):
    """kind ``evaluator``: one section of ``eval.json`` computed from frozen features.

    ``evaluate`` returns the section (metric name -> number, e.g. ``{"top1": 0.71}``), or None
    when the run lacks what the section needs; it must not modify ``features``.
    """

    def evaluate(self, features: EvalFeatures) -> dict[str, float] | None: ...


# --------------------------------------------------------------------------- extraction


def finite_rows(pooled: dict[str, Tensor]) -> Tensor:
    """(N,) bool: rows finite in every pooling and in the tokens (False for clips that did not load)."""
    rows: Tensor | None = None
    for value in pooled.values():
        ok = torch.isfinite(value).flatten(1).all(dim=1)
        rows = ok if rows is None else rows & ok
    if rows is None:
        raise ValueError("no pooled features")
    return rows

