"""Faithful DPC / MemDPC dense InfoNCE: online future features, raw dot products.

Two dense contrastive targets ship with vlmask; this module is the faithful one.

- ``dense_infonce`` (:mod:`vlmask_plugins.targets.dense_infonce`, ``recipes/dpc.yaml``): a
  vlmask variant. The true future is an EMA teacher's features (no gradient) and the scores
  are cosine similarities over a temperature of 0.07.
- ``future_infonce`` (here, ``recipes/dpc_faithful.yaml`` and ``recipes/memdpc.yaml``): DPC as
  published (Han, Xie & Zisserman, ICCVW 2019; thesis ch. 2 eq. 2.5) and MemDPC (ECCV 2020;
  thesis ch. 3 eq. 3.6). No teacher: the true future blocks are encoded by the *online* student
  encoder (the same f as the context, with gradient), and the score of a prediction against a
  true feature is their raw dot product.
"""

from __future__ import annotations

import torch  # noqa: F401 (the doctests use it)
from torch import Tensor

from vlmask.types import StepOutputs
from vlmask_plugins.precision import without_autocast
from vlmask_plugins.targets.dense_infonce import dense_infonce
from vlmask_plugins.targets.tokens import check_same_shape, require


def future_infonce(predicted: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """DPC's dense InfoNCE (eq. 2.5) with raw dot products: returns ``(loss, top1 accuracy)``.

    ``predicted`` and ``true`` are (B, K, D) with K = (future time, position) pairs. The logits
    are the (B*K, B*K) matrix of dot products ``predicted[b, i] . true[b', j]`` (no
    normalisation, no temperature); for row (b, i) the only positive is (b, i) itself, and
    every other (clip, time, position) of the batch is a negative. The loss is the mean
    cross-entropy over rows.

    >>> loss, top1 = future_infonce(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0]]]))
    >>> loss.item(), top1.item()
    (0.0, 1.0)
    """
    return dense_infonce(predicted, true, temperature=1.0, normalize=False)


class FutureInfoNCETarget:
    """DPC's dense predictive contrastive loss, faithful form (eq. 2.5); MemDPC's (eq. 3.6) with
    ``bidirectional``.

    The recipe needs the ``future_blocks`` masker (visible: the past slots; predict: the last
    slots) and the ``future`` predictor (recursive rollout; with ``memory_slots`` MemDPC's
    memory). The true future features are a second forward pass of the student encoder over
    the future blocks' tokens ``mask.predict``, with gradient: the encoder sees the past and
    the future in two separate passes, as DPC's f encodes every block without seeing the
    others' pixels (here a pass covers all future slots together, as the context pass covers
    all past slots). Scores are raw dot products (``normalize=False, temperature=1``, the
    paper); ``normalize=True`` with a ``temperature`` gives the cosine form.

    ``bidirectional`` (MemDPC): also predict the past from the future, recursively backwards
    in time (the same predictor, context = the online future features), scored against the
    online past features (``out.visible_features``); the loss is the SUM of both directions, as
    in the released MemDPC code (``loss = loss + loss_tmp_b``). MemDPC's backward context is the
    last N - k blocks reversed and it predicts the first k; here the context is the k future
    slots and every past slot is predicted (the same when the clip has 2k slots, as at demo
    scale: 4 slots, 2 future).
    Stats: ``top1`` (forward direction), and ``top1_backward`` when bidirectional.
    """

    requires = frozenset({"predictor"})

    def __init__(self, bidirectional: bool = False, normalize: bool = False, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.bidirectional = bool(bidirectional)
        self.normalize = bool(normalize)
        self.temperature = float(temperature)

    def score(self, predicted: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
        with without_autocast(predicted.device):  # logits and loss in fp32
            return dense_infonce(predicted.float(), true.float(), self.temperature, self.normalize)

    def __call__(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        term = "target 'future_infonce'"
        require(out.predictions, "predictions", term, "the recipe needs a predictor (e.g. future)")
        require(out.encoder, "the student encoder", term, "the engine must pass StepOutputs.encoder")
        assert out.predictions is not None and out.encoder is not None
        true_future = out.encoder(out.batch.video, out.mask.predict)  # online, with gradient
        check_same_shape(out.predictions, true_future, term)
        loss, top1 = self.score(out.predictions, true_future)
        stats = {"top1": top1}
        if self.bidirectional:
            rollout = getattr(out.predictor, "rollout", None)
            if rollout is None:
                hint = "a predictor with rollout() (predictor 'future')"
                raise ValueError(f"{term} with bidirectional=true needs {hint}")
            past = rollout(true_future, out.mask.predict, out.mask.visible, reverse=True)
            check_same_shape(past, out.visible_features, term)
            backward_loss, stats["top1_backward"] = self.score(past, out.visible_features)
            stats["forward"], stats["backward"] = loss.detach(), backward_loss.detach()
            loss = loss + backward_loss
        return loss, stats
