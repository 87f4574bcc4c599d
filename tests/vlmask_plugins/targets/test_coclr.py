"""CoCLR's losses (thesis eq. 4.1-4.5, UberNCE sec. 4.3.1) on inputs small enough to compute by hand."""

from __future__ import annotations

import doctest

import pytest
import torch

import vlmask_plugins.targets.coclr as coclr
from vlmask_plugins.targets.coclr import (
    enqueue,
    label_positive_mask,
    multi_instance_infonce,
    queue_infonce,
    same_clip_mask,
    topk_positive_mask,
)

QUERY = torch.tensor([[1.0, 0.0]])
KEY = torch.tensor([[1.0, 0.0]])
QUEUE = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # logits at temperature 1: [1, 0, -1]


def test_doctests() -> None:
    assert doctest.testmod(coclr).failed == 0


def test_queue_infonce_by_hand() -> None:
    """eq. 4.1: -log(e / (e + 1 + e^-1)) = log(1 + e^-1 + e^-2) = 0.407606."""
    assert queue_infonce(QUERY, KEY, QUEUE, temperature=1.0).item() == pytest.approx(0.407606, abs=1e-6)


def test_queue_infonce_leaves_the_own_clips_queue_keys_out_by_hand() -> None:
    """eq. 4.1's N_i excludes n = i: with queue entry 0 a key of the query's own clip it leaves the
    denominator: -log(e / (e + e^-1)) = log(1 + e^-2) = 0.126928 (0.407606 with it counted)."""
    same = same_clip_mask(torch.tensor([5]), torch.tensor([5, 3]))
    assert same.tolist() == [[True, False]]
    assert queue_infonce(QUERY, KEY, QUEUE, 1.0, exclude=same).item() == pytest.approx(0.126928, abs=1e-6)
    assert queue_infonce(QUERY, KEY, QUEUE, 1.0, exclude=~same).item() == pytest.approx(0.313262, abs=1e-6)
    unknown = same_clip_mask(torch.tensor([-1]), torch.tensor([-1, -1]))  # -1: no identity, never the same clip
    assert queue_infonce(QUERY, KEY, QUEUE, 1.0, exclude=unknown).item() == pytest.approx(0.407606, abs=1e-6)
    only_self = torch.tensor([[True, False, False]])
    assert multi_instance_infonce(QUERY, KEY, QUEUE, only_self, 1.0, exclude=same).item() == pytest.approx(0.126928, abs=1e-6)
    with pytest.raises(ValueError, match="exclude must be a bool mask of shape"):
        queue_infonce(QUERY, KEY, QUEUE, 1.0, exclude=torch.ones(1, 3, dtype=torch.bool))


def test_multi_instance_infonce_sums_the_positive_probabilities() -> None:
    """eq. 4.2/4.4 with P = {own key, queue 0}: -log((e + 1) / (e + 1 + e^-1)) = 0.094344; with the
    own key only it is eq. 4.2."""
    positives = torch.tensor([[True, True, False]])
    assert multi_instance_infonce(QUERY, KEY, QUEUE, positives, 1.0).item() == pytest.approx(0.094344, abs=1e-6)
    only_self = torch.tensor([[True, False, False]])
    assert multi_instance_infonce(QUERY, KEY, QUEUE, only_self, 1.0).item() == pytest.approx(0.407606, abs=1e-6)
    with pytest.raises(ValueError, match="column 0"):
        multi_instance_infonce(QUERY, KEY, QUEUE, torch.tensor([[False, True, False]]), 1.0)


def test_topk_positives_come_from_the_other_stream() -> None:
    """The RGB queue would rank entry 0 first; the flow stream ranks entries 2 then 1: the
    positives are the clip itself and flow's top-2 (queue columns 3 and 2), not RGB's."""
    flow_query = torch.tensor([[1.0, 0.0]])
    flow_queue = torch.tensor([[-1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    mask = topk_positive_mask(flow_query, flow_queue, k=2)
    assert mask.tolist() == [[True, False, True, True]]
    assert topk_positive_mask(flow_query, flow_queue, k=0).tolist() == [[True, False, False, False]]
    # entry 2 holds a key of the clip itself: skipped, the next neighbours (2 then 1) are mined
    skip = torch.tensor([[False, False, True]])
    assert topk_positive_mask(flow_query, flow_queue, k=2, skip=skip).tolist() == [[True, True, True, False]]
    # fewer candidates than k: the row gets the candidates it has
    assert topk_positive_mask(flow_query, flow_queue, k=3, skip=~skip).tolist() == [[True, False, False, True]]
    with pytest.raises(ValueError, match="k must be in"):
        topk_positive_mask(flow_query, flow_queue, k=4)


def test_ubernce_takes_positives_by_label() -> None:
    """eq. 4.5: label 3, queue labels [3, 1, 3], temperature 0.5, key [0.6, 0.8]: logits
    [1.2, 2, 0, -2], positives columns 0, 1, 3: -log((e^1.2 + e^2 + e^-2) / sum) = 0.088206."""
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    positives = label_positive_mask(torch.tensor([3]), torch.tensor([3, 1, 3]))
    assert positives.tolist() == [[True, True, False, True]]
    loss = multi_instance_infonce(QUERY, torch.tensor([[0.6, 0.8]]), queue, positives, temperature=0.5)
    assert loss.item() == pytest.approx(0.088206, abs=1e-6)


def test_enqueue_is_first_in_first_out() -> None:
    queue, pointer = enqueue(torch.zeros(4, 1), torch.tensor([[1.0], [2.0]]), 0)
    queue, pointer = enqueue(queue, torch.tensor([[3.0], [4.0]]), pointer)
    queue, pointer = enqueue(queue, torch.tensor([[5.0], [6.0]]), pointer)
    assert queue.flatten().tolist() == [5.0, 6.0, 3.0, 4.0] and pointer == 2
