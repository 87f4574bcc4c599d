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


TARGET_PROJECTIONS = ("student", "teacher")


class LanguageSpaceTarget:
    """FILS feature prediction in the language space (Ahmadian et al., BMVC 2024, eq. 7-8).

    ``p = normalize(theta(predictions))`` with the student's video-to-text projection theta and
    ``g = normalize(theta_g(teacher_features at mask.predict))`` without gradient, where theta_g is
    chosen by ``projection``:

    - ``"student"`` (default): the student's own theta, evaluated under ``no_grad`` (theta receives
      gradient only through p). This is the paper's text: eq. 7 maps both sides with one theta,
      "where ... theta(.) represents the same vision mapping in Eq. 4" (sec. 3.2, the line after
      eq. 7), and Eq. 4's theta is the projection head of the student's ActCLIP branch; only f_m,
      the features, "com[e] from the Teacher encoder" (the lines before eq. 8).
    - ``"teacher"``: the EMA teacher's copy of theta (``out.teacher_projection``), as the teacher's
      copy of the encoder gives f_m. vlmask used this reading until 2026-12-07; it needs a teacher
      that mirrors the projection (the ``ema`` teacher does; ``frozen`` does not: an error).

    The two agree at step 1 (the EMA copy starts equal to the student) and drift apart as the
    teacher lags; with ``tau`` near 1 over a short run the teacher's theta stays close to its random
    initialisation, so ``"teacher"`` then maps targets through a nearly random projection.

    ``loss="l1_norm"`` (default, the paper's eq. 8): ``(p - g).abs().sum(-1).mean()``, in fp32
    under any autocast precision (theta itself runs in the autocast dtype).
    ``loss="smooth_l1_mean"``: the released FILS code's ``F.smooth_l1_loss(p, g, beta=1)``, an
    element mean; on unit vectors it is about D times smaller than eq. 8 (D the text width),
    which lets the contrastive term dominate. Kept as a documented option only.
    """

    #: What the recipe must provide (vlmask.kinds.REQUIREMENTS); ``vlmask validate`` checks it.
    requires: frozenset[str] = frozenset({"predictor", "teacher", "projection"})

    def __init__(self, loss: str = "l1_norm", projection: str = "student") -> None:
        if loss not in LANGUAGE_SPACE_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LANGUAGE_SPACE_LOSSES)}, got {loss!r}")
        if projection not in TARGET_PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(TARGET_PROJECTIONS)}, got {projection!r}")
        self.loss = loss
        self.projection = projection

    def __call__(self, out: StepOutputs) -> Tensor:
        term = "target 'language_space'"
        require(out.predictions, "predictions", term, "the recipe needs a predictor")
        require(out.teacher_features, "teacher_features", term, "the recipe needs a teacher")
        require(out.projection, "the video-to-text projection", term, "the student needs a projection (text_dim)")
        assert out.predictions is not None and out.teacher_features is not None and out.projection is not None
        if self.projection == "teacher" and out.teacher_projection is None:
            raise ValueError(
                f"{term} with projection='teacher' needs a teacher that holds a copy of the projection "
                "(teacher: ema); use projection='student'"
            )
        target_projection = out.teacher_projection if self.projection == "teacher" else out.projection
        assert target_projection is not None
        with torch.no_grad():
            teacher_tokens = gather_tokens(out.teacher_features.detach(), out.mask.predict)
            check_same_shape(out.predictions, teacher_tokens, term)
            target = F.normalize(target_projection(teacher_tokens).float(), dim=-1)
        # the projections run in the autocast dtype; the normalisation and the loss in fp32
        # (a bf16 sum of |p - g| over the text width would be quantised to 1/8 near 20)
        prediction = F.normalize(out.projection(out.predictions).float(), dim=-1)
        if self.loss == "l1_norm":
            return l1_norm_distance(prediction, target)
        return F.smooth_l1_loss(prediction, target, beta=1.0)
