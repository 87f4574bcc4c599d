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

Keys of the query's own clip in the queue (:func:`same_clip_mask`). With a small data set, or
after an epoch with a queue longer than the data set, the queue holds keys enqueued from the very
clip of the query, i.e. other augmentations ``psi(x_i; a')``. Eq. 4.1's negatives are
``N_i = {psi(x_n; a) | n != i}`` (thesis line ~911): such an entry is not a negative. The losses
take an ``exclude`` (B, Q) mask whose queue columns leave the softmax (logit -inf): InfoNCE
(:func:`queue_infonce`) excludes them; in the multi-instance losses (eq. 4.2-4.5) every
augmentation of ``x_i`` belongs to ``P_i`` (eq. 4.3: ``psi(x_1i; a), a ~ A``), so the head marks
them positives there instead, and :func:`topk_positive_mask` mines its K neighbours among the
other clips (as the released CoCLR code does with its ``queue_vname``: ``mask_sim[mask_source] =
-inf`` before the top-K, the same-source entries then set in the positive mask). Departure: the
released code's InfoNCE (MoCo) masks nothing; here eq. 4.1 is followed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def same_clip_mask(clips: Tensor, queue_clips: Tensor) -> Tensor:
    """(B, Q) bool: the queue entries that hold a key of the query's own clip. ``clips`` (B,) and
    ``queue_clips`` (Q,) are clip identities (the manifest row, ``Batch.index``); -1 (unknown:
    the initial random keys, or a batch without ``index``) never matches.

    >>> same_clip_mask(torch.tensor([4, -1]), torch.tensor([4, -1, 2, 4])).tolist()
    [[True, False, False, True], [False, False, False, False]]
    """
    return (clips[:, None] == queue_clips[None, :]) & (clips[:, None] >= 0)


def queue_logits(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.07,
                 exclude: Tensor | None = None) -> Tensor:
    """(B, 1 + Q) logits: column 0 the positive ``q_i . k_i``, then ``q_i . queue_j``, over ``temperature``;
    the queue columns marked in ``exclude`` (B, Q) bool are -inf (out of the softmax).

    >>> queue_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.5).tolist()
    [[2.0, 0.0]]
    >>> queue_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.5,
    ...              exclude=torch.tensor([[True]])).tolist()
    [[2.0, -inf]]
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query.shape != key.shape or query.ndim != 2 or queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and key must be (B, D) and the queue (Q, D), got key {tuple(key.shape)}, "
            f"queue {tuple(queue.shape)}"
        )
    positive = (query * key).sum(dim=1, keepdim=True)
    others = query @ queue.T
    if exclude is not None:
        if exclude.shape != others.shape or exclude.dtype != torch.bool:
            raise ValueError(f"exclude must be a bool mask of shape {tuple(others.shape)}, got {exclude.dtype} "
                             f"{tuple(exclude.shape)}")
        others = others.masked_fill(exclude, float("-inf"))
    return torch.cat([positive, others], dim=1) / temperature


def queue_infonce(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.07,
                  exclude: Tensor | None = None) -> Tensor:
    """InfoNCE with a momentum queue (MoCo; thesis eq. 4.1): ``CE(logits, 0)`` averaged over the
    batch; the only positive is the clip's own key, every queue entry a negative except those
    marked in ``exclude`` (B, Q): keys of the query's own clip (:func:`same_clip_mask`), which
    eq. 4.1's ``N_i = {psi(x_n; a) | n != i}`` leaves out of the denominator."""
    logits = queue_logits(query, key, queue, temperature, exclude)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def multi_instance_infonce(
    query: Tensor, key: Tensor, queue: Tensor, positives: Tensor, temperature: float = 0.07,
    exclude: Tensor | None = None,
) -> Tensor:
    """Multi-instance InfoNCE (thesis eq. 4.2 for RGB, 4.4 for flow): ``-log sum_{p in P_i} softmax(logits_i)_p``,
    averaged over the batch.

    ``positives`` (B, 1 + Q) bool marks P_i over the columns of :func:`queue_logits` (column 0,
    the clip's own key, is always a positive: CoCLR's released code sets it). With only column 0
    this is :func:`queue_infonce`. Queue columns marked in ``exclude`` (B, Q) are neither
    positives nor negatives (out of the softmax, as in :func:`queue_infonce`); the head marks the
    keys of the query's own clip positives instead (module docstring).
    """
    logits = queue_logits(query, key, queue, temperature, exclude)
    if positives.shape != logits.shape or positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool mask of shape {tuple(logits.shape)}, got {positives.dtype} "
                         f"{tuple(positives.shape)}")
    if not positives.is_meta and not bool(positives[:, 0].all()):  # meta: FLOP counting, no values
        raise ValueError("positives must include column 0 (the clip's own key) in every row")
    log_probabilities = logits.log_softmax(dim=1)
    positive_log_mass = log_probabilities.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return -positive_log_mass.mean()


def topk_positive_mask(other_query: Tensor, other_queue: Tensor, k: int, skip: Tensor | None = None) -> Tensor:
    """CoCLR's mined positives (eq. 4.3 for RGB, 4.5 for flow): (B, 1 + Q) bool, column 0 (the clip itself) plus the
    ``k`` queue entries most similar to the clip in the OTHER stream (``other_query .
    other_queue``, top-K). The two streams' queues hold the same clips in the same order, so
    the indices mark positives in this stream's queue. Entries marked in ``skip`` (B, Q) bool
    are not candidates (the keys of the query's own clip: the K neighbours are other clips, as
    in the released code); a row with fewer than ``k`` candidates gets them all.

    >>> topk_positive_mask(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]), 2).tolist()
    [[True, False, True, True]]
    >>> topk_positive_mask(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]), 2,
    ...                    skip=torch.tensor([[False, True, False]])).tolist()
    [[True, True, False, True]]
    """
    if not 0 <= k <= other_queue.shape[0]:
        raise ValueError(f"k must be in [0, {other_queue.shape[0]}] (the queue length), got {k}")
    mask = torch.zeros(other_query.shape[0], 1 + other_queue.shape[0], dtype=torch.bool, device=other_query.device)
    mask[:, 0] = True
    if k:
        similarity = other_query @ other_queue.T
        if skip is not None:
            similarity = similarity.masked_fill(skip, float("-inf"))
        nearest = similarity.topk(k, dim=1)
        mask.scatter_(1, nearest.indices + 1, nearest.values > float("-inf"))
    return mask


def label_positive_mask(labels: Tensor, queue_labels: Tensor) -> Tensor:
    """UberNCE's positives (thesis sec. 4.3.1, an unnumbered equation; the supervised upper
    bound): (B, 1 + Q) bool, column 0 plus every queue entry with the clip's label. A clip
    without a label (-1) has no label positives (-1 is "no class", not a class).

    >>> label_positive_mask(torch.tensor([2, 5, -1]), torch.tensor([5, 2, 2, -1])).tolist()
    [[True, False, True, True, False], [True, True, False, False, False], [True, False, False, False, False]]
    """
    same = (labels[:, None] == queue_labels[None, :]) & (labels[:, None] >= 0)
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
