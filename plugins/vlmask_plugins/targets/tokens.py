"""Token bookkeeping shared by the targets: gathering rows and checking what a step provides."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_tokens(features: Tensor, index: Tensor) -> Tensor:
    """Rows of ``features`` (B, N, D) at token indices ``index`` (B, K): returns (B, K, D).

    >>> gather_tokens(torch.arange(6.0).view(1, 3, 2), torch.tensor([[2, 0]])).tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    """
    return torch.gather(features, 1, index[:, :, None].expand(-1, -1, features.shape[-1]))


def require(value: object, what: str, term: str, hint: str) -> None:
    """A clear error when a step output a term needs is missing."""
    if value is None:
        raise ValueError(f"{term} needs {what}, which this step does not provide: {hint}")


def check_same_shape(prediction: Tensor, target: Tensor, term: str) -> None:
    if prediction.shape != target.shape:
        raise ValueError(
            f"{term}: predictions have shape {tuple(prediction.shape)} but the target has {tuple(target.shape)}; "
            "check the predictor's output width"
        )
