"""CoCLR's losses as pure functions (Han, Xie & Zisserman, "Self-supervised Co-training for
Video Representation Learning", NeurIPS 2020; thesis ch. 4, eq. 4.1-4.5).

CoCLR trains an RGB and an optical-flow stream, each with a momentum (MoCo) encoder and a
queue of the momentum encoder's past keys. Stage 1 trains each stream alone with InfoNCE
(:func:`queue_infonce`, eq. 4.1). Stage 2 alternates streams: the positives of a clip in one
stream are the clip itself plus the clips whose *other-stream* features are its top-K
neighbours in the other stream's queue (:func:`topk_positive_mask`, eq. 4.3 and 4.5), scored with the
multi-instance InfoNCE (:func:`multi_instance_infonce`, eq. 4.2 and 4.4). UberNCE, the oracle upper
bound, takes the positives from the labels instead (:func:`label_positive_mask`, sec. 4.3.1, unnumbered).

Every function works on L2-normalised (B, D) queries and keys and a (Q, D) queue; the logits
are ``[q . k, q . queue] / temperature`` with the clip's own key in column 0. The two-stream
engine (flow view, stages) is not part of this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def queue_logits(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.07) -> Tensor:
    """(B, 1 + Q) logits: column 0 the positive ``q_i . k_i``, then ``q_i . queue_j``, over ``temperature``.

    >>> queue_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.5).tolist()
    [[2.0, 0.0]]
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query.shape != key.shape or query.ndim != 2 or queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and key must be (B, D) and the queue (Q, D), got key {tuple(key.shape)}, "
            f"queue {tuple(queue.shape)}"
        )
    positive = (query * key).sum(dim=1, keepdim=True)
    return torch.cat([positive, query @ queue.T], dim=1) / temperature


def queue_infonce(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE with a momentum queue (MoCo; thesis eq. 4.1): ``CE(logits, 0)`` averaged over the
    batch; the only positive is the clip's own key, every queue entry a negative."""
    logits = queue_logits(query, key, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def multi_instance_infonce(
    query: Tensor, key: Tensor, queue: Tensor, positives: Tensor, temperature: float = 0.07
) -> Tensor:
    """Multi-instance InfoNCE (thesis eq. 4.2 for RGB, 4.4 for flow): ``-log sum_{p in P_i} softmax(logits_i)_p``,
    averaged over the batch.

    ``positives`` (B, 1 + Q) bool marks P_i over the columns of :func:`queue_logits` (column 0,
    the clip's own key, is always a positive: CoCLR's released code sets it). With only column 0
    this is :func:`queue_infonce`.
    """
    logits = queue_logits(query, key, queue, temperature)
    if positives.shape != logits.shape or positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool mask of shape {tuple(logits.shape)}, got {positives.dtype} "
                         f"{tuple(positives.shape)}")
    if not positives.is_meta and not bool(positives[:, 0].all()):  # meta: FLOP counting, no values
        raise ValueError("positives must include column 0 (the clip's own key) in every row")
    log_probabilities = logits.log_softmax(dim=1)
    positive_log_mass = log_probabilities.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return -positive_log_mass.mean()


def topk_positive_mask(other_query: Tensor, other_queue: Tensor, k: int) -> Tensor:
    """CoCLR's mined positives (eq. 4.3 for RGB, 4.5 for flow): (B, 1 + Q) bool, column 0 (the clip itself) plus the
    ``k`` queue entries most similar to the clip in the OTHER stream (``other_query .
    other_queue``, top-K). The two streams' queues hold the same clips in the same order, so
    the indices mark positives in this stream's queue.

    >>> topk_positive_mask(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]), 2).tolist()
    [[True, False, True, True]]
    """
    if not 0 <= k <= other_queue.shape[0]:
        raise ValueError(f"k must be in [0, {other_queue.shape[0]}] (the queue length), got {k}")
    mask = torch.zeros(other_query.shape[0], 1 + other_queue.shape[0], dtype=torch.bool, device=other_query.device)
    mask[:, 0] = True
    if k:
        nearest = (other_query @ other_queue.T).topk(k, dim=1).indices
        mask.scatter_(1, nearest + 1, True)
    return mask


def label_positive_mask(labels: Tensor, queue_labels: Tensor) -> Tensor:
    """UberNCE's positives (thesis sec. 4.3.1, an unnumbered equation; the supervised upper
    bound): (B, 1 + Q) bool, column 0 plus every queue entry with the clip's label.

    >>> label_positive_mask(torch.tensor([2, 5]), torch.tensor([5, 2, 2])).tolist()
    [[True, False, True, True], [True, True, False, False]]
    """
    same = labels[:, None] == queue_labels[None, :]
    return torch.cat([torch.ones_like(same[:, :1]), same], dim=1)


def enqueue(queue: Tensor, keys: Tensor, pointer: int | Tensor) -> tuple[Tensor, int | Tensor]:
    """MoCo's FIFO queue update: ``keys`` (B, ...) overwrite rows ``pointer ... pointer + B - 1``
    (wrapping around); returns the new queue and pointer. ``pointer`` may be a 0-d tensor on the
    queue's device (the head's buffer): the rows and the next pointer are then computed there,
    with no host-device synchronisation in the training step.

    >>> queue, pointer = enqueue(torch.zeros(4, 1), torch.tensor([[1.0], [2.0]]), 3)
    >>> queue.flatten().tolist(), pointer
    ([2.0, 0.0, 0.0, 1.0], 1)
    >>> queue, pointer = enqueue(torch.full((3,), -1), torch.tensor([7, 8]), torch.tensor(2))
    >>> queue.tolist(), int(pointer)
    ([8, -1, 7], 1)
    """
    length = queue.shape[0]
    rows = (pointer + torch.arange(keys.shape[0], device=queue.device)) % length
    updated = queue.clone()
    updated[rows] = keys.detach().to(queue.dtype)
    return updated, (pointer + keys.shape[0]) % length
