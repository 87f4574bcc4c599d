"""Supervised classification head (Turbo training, Han et al., BMVC 2022)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from vlmask.types import StepOutputs


class ClassificationHead(nn.Module):
    """Linear classifier on the mean of the visible features, cross-entropy against ``batch.label``.

    Turbo training (Han, Xie & Zisserman, "Turbo Training with Token Dropout", BMVC 2022)
    trains supervised action recognition on the visible tokens only. ``turbo_weight``
    multiplies the loss by ``1 / log(num_classes)`` (lambda_CE). Stats: ``top1`` of the batch.
    """

    #: What the recipe must provide (vlmask.kinds.REQUIREMENTS); ``vlmask validate`` checks it.
    requires: frozenset[str] = frozenset({"label"})

    def __init__(
        self, num_classes: int, encoder_dim: int, label_smoothing: float = 0.0, turbo_weight: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if encoder_dim < 1:
            raise ValueError(f"encoder_dim must be >= 1, got {encoder_dim}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.turbo_weight = bool(turbo_weight)
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(encoder_dim, num_classes)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        if out.batch.label is None:
            raise ValueError("head 'classification' needs batch.label; the manifest needs a 'label' field")
        logits = self.classifier(out.visible_features.mean(dim=1))
        loss = F.cross_entropy(logits, out.batch.label, label_smoothing=self.label_smoothing)
        if self.turbo_weight:
            loss = loss / math.log(self.num_classes)
        top1 = (logits.argmax(dim=1) == out.batch.label).float().mean().detach()
        return loss, {"top1": top1}
