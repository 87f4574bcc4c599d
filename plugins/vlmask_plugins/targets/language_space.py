"""Feature prediction in the language space (FILS, Ahmadian et al., BMVC 2024, eq. 7-8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmask.types import StepOutputs, gather_tokens
from vlmask_plugins.targets.tokens import check_same_shape, require

LANGUAGE_SPACE_LOSSES = ("l1_norm", "smooth_l1_mean")


def l1_norm_distance(prediction: Tensor, target: Tensor) -> Tensor:
    """FILS eq. 8: the L1 norm of the difference per token, averaged over tokens.

    ``(prediction - target).abs().sum(-1).mean()``: D times ``F.l1_loss`` (an element mean).

    >>> p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> g = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    >>> l1_norm_distance(p, g).item(), F.l1_loss(p, g).item()
    (1.0, 0.5)
    """
    return (prediction - target).abs().sum(dim=-1).mean()


class LanguageSpaceTarget:
    """FILS feature prediction in the language space (Ahmadian et al., BMVC 2024, eq. 7-8).

    ``p = normalize(theta(predictions))`` with the student's video-to-text projection theta,
    ``g = normalize(theta_teacher(teacher_features at mask.predict))`` without gradient, where
    theta_teacher is ``out.teacher_projection`` (the EMA teacher's copy of theta) or, when the
    teacher holds no copy, the student's theta evaluated under ``no_grad`` (so theta receives
    gradient only through p).

    ``loss="l1_norm"`` (default, the paper's eq. 8): ``(p - g).abs().sum(-1).mean()``, in fp32
    under any autocast precision (theta itself runs in the autocast dtype).
    ``loss="smooth_l1_mean"``: the released FILS code's ``F.smooth_l1_loss(p, g, beta=1)``, an
    element mean; on unit vectors it is about D times smaller than eq. 8 (D the text width),
    which lets the contrastive term dominate. Kept as a documented option only.
    """

    #: What the recipe must provide (vlmask.kinds.REQUIREMENTS); ``vlmask validate`` checks it.
    requires: frozenset[str] = frozenset({"predictor", "teacher", "projection"})

    def __init__(self, loss: str = "l1_norm") -> None:
        if loss not in LANGUAGE_SPACE_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LANGUAGE_SPACE_LOSSES)}, got {loss!r}")
        self.loss = loss

    def __call__(self, out: StepOutputs) -> Tensor:
        term = "target 'language_space'"
        require(out.predictions, "predictions", term, "the recipe needs a predictor")
        require(out.teacher_features, "teacher_features", term, "the recipe needs a teacher")
        require(out.projection, "the video-to-text projection", term, "the student needs a projection (text_dim)")
        assert out.predictions is not None and out.teacher_features is not None and out.projection is not None
        teacher_projection = out.teacher_projection if out.teacher_projection is not None else out.projection
        with torch.no_grad():
            teacher_tokens = gather_tokens(out.teacher_features.detach(), out.mask.predict)
            check_same_shape(out.predictions, teacher_tokens, term)
            target = F.normalize(teacher_projection(teacher_tokens).float(), dim=-1)
        # the projections run in the autocast dtype; the normalisation and the loss in fp32
        # (a bf16 sum of |p - g| over the text width would be quantised to 1/8 near 20)
        prediction = F.normalize(out.projection(out.predictions).float(), dim=-1)
        if self.loss == "l1_norm":
            return l1_norm_distance(prediction, target)
        return F.smooth_l1_loss(prediction, target, beta=1.0)
