"""Dense predictive contrastive loss (DPC, Han, Xie & Zisserman, ICCVW 2019, eq. 2.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmask.types import StepOutputs, gather_tokens
from vlmask_plugins.precision import without_autocast
from vlmask_plugins.targets.tokens import check_same_shape, require


def dense_infonce(
    predicted: Tensor, true: Tensor, temperature: float = 0.07, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """InfoNCE over every (clip, token) pair: returns ``(loss, top1 accuracy)``.

    ``predicted`` and ``true`` are (B, K, D). Row ``(b, i)`` of the (B*K, B*K) logits scores the
    prediction for clip b, token i against every true feature of the batch; the only positive
    is ``(b, i)`` itself (the diagonal).

    >>> true = torch.eye(4).view(2, 2, 4)
    >>> loss, top1 = dense_infonce(true, true, temperature=0.1)
    >>> round(loss.item(), 4), top1.item()
    (0.0001, 1.0)
    """
    batch, tokens, dim = predicted.shape
    predicted = predicted.reshape(batch * tokens, dim)
    true = true.reshape(batch * tokens, dim)
    if normalize:
        predicted, true = F.normalize(predicted, dim=-1), F.normalize(true, dim=-1)
    logits = predicted @ true.T / temperature
    labels = torch.arange(batch * tokens, device=logits.device)
    loss = F.cross_entropy(logits, labels)
    top1 = (logits.argmax(dim=1) == labels).float().mean()
    return loss, top1.detach()


class DenseInfoNCETarget:
    """DPC's dense InfoNCE between predicted and true features (Han et al., ICCVW 2019, eq. 2.5).

    Predictions ``out.predictions`` (B, Np, D) are scored against the teacher's features at the
    same positions (``out.teacher_features`` gathered at ``mask.predict``, without gradient;
    a teacher is required). Every predicted (clip, time, position) is contrasted with every
    true one in the batch; the only positive is the same clip, time and position.

    DPC itself scores raw dot products (``normalize=False, temperature=1.0``); vlmask defaults
    to cosine similarity with temperature 0.07 (the MoCo/CLIP convention), which keeps logits
    bounded for any feature scale. Stats: ``top1``, how often the positive scores highest.
    The logits and the loss are computed in fp32 under any autocast precision.
    """

    #: What the recipe must provide (vlmask.kinds.REQUIREMENTS); ``vlmask validate`` checks it.
    requires: frozenset[str] = frozenset({"predictor", "teacher"})

    def __init__(self, temperature: float = 0.07, normalize: bool = True) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.normalize = bool(normalize)

    def __call__(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        term = "target 'dense_infonce'"
        require(out.predictions, "predictions", term, "the recipe needs a predictor")
        require(out.teacher_features, "teacher_features", term, "the recipe needs a teacher (e.g. ema)")
        assert out.predictions is not None and out.teacher_features is not None
        with torch.no_grad():
            true = gather_tokens(out.teacher_features.detach(), out.mask.predict)
        check_same_shape(out.predictions, true, term)
        with without_autocast(out.predictions.device):  # logits and loss in fp32
            loss, top1 = dense_infonce(out.predictions.float(), true.float(), self.temperature, self.normalize)
        return loss, {"top1": top1}
