"""What the targets share: checking what a step provides (the gather is ``vlmask.types.gather_tokens``)."""

from __future__ import annotations

from torch import Tensor


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
