"""Latent feature target (data2vec, Baevski et al. 2022; V-JEPA, Bardes et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmask.types import StepOutputs, gather_tokens
from vlmask_plugins.targets.tokens import check_same_shape, require

LATENT_LOSSES = ("l1", "smooth_l1", "mse")


class LatentTarget:
    """Regress the teacher's layer-normalised features at the masked positions.

    data2vec (Baevski et al., ICML 2022) and V-JEPA (Bardes et al., 2024): the teacher encodes
    the full clip without gradient; its features pass a LayerNorm without affine parameters
    and are gathered at ``out.mask.predict``. Loss over every element: ``l1`` (V-JEPA, default),
    ``smooth_l1`` (data2vec, with ``smooth_l1_beta``) or ``mse``.
    """

    #: What the recipe must provide (vlmask.kinds.REQUIREMENTS); ``vlmask validate`` checks it.
    requires: frozenset[str] = frozenset({"predictor", "teacher"})

    def __init__(self, loss: str = "l1", smooth_l1_beta: float = 1.0) -> None:
        if loss not in LATENT_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LATENT_LOSSES)}, got {loss!r}")
        if smooth_l1_beta <= 0:
            raise ValueError(f"smooth_l1_beta must be > 0, got {smooth_l1_beta}")
        self.loss = loss
        self.smooth_l1_beta = float(smooth_l1_beta)

    def __call__(self, out: StepOutputs) -> Tensor:
        require(out.predictions, "predictions", "target 'latent'", "the recipe needs a predictor")
        require(out.teacher_features, "teacher_features", "target 'latent'", "the recipe needs a teacher")
        assert out.predictions is not None and out.teacher_features is not None
        with torch.no_grad():
            teacher = out.teacher_features.detach()
            targets = gather_tokens(F.layer_norm(teacher, teacher.shape[-1:]), out.mask.predict)
        check_same_shape(out.predictions, targets, "target 'latent'")
        targets = targets.to(out.predictions.dtype)
        if self.loss == "l1":
            return F.l1_loss(out.predictions, targets)
        if self.loss == "smooth_l1":
            return F.smooth_l1_loss(out.predictions, targets, beta=self.smooth_l1_beta)
        return F.mse_loss(out.predictions, targets)
