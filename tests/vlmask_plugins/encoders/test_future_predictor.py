"""DPC's recursive rollout (thesis eq. 2.3) and MemDPC's memory addressing (eq. 3.3-3.4), on
inputs small enough to compute by hand."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import Tensor, nn

import vlmask_plugins.encoders.future_predictor as future_module
from vlmask.types import Mask, TokenGrid
from vlmask_plugins.encoders.future_predictor import FuturePredictor, memory_expectation, slot_chunks
from vlmask_plugins.maskers.future_blocks import FutureBlocksMasker
from vlmask.types import Batch


def test_doctests() -> None:
    assert doctest.testmod(future_module).failed == 0


def test_memory_expectation_by_hand() -> None:
    """p = softmax([log 1, log 3]) = [1/4, 3/4]; z = 1/4 [4, 0] + 3/4 [0, 8] = [1, 6]."""
    memory = torch.tensor([[4.0, 0.0], [0.0, 8.0]])
    z = memory_expectation(torch.tensor([[math.log(1.0), math.log(3.0)]]), memory)
    assert torch.allclose(z, torch.tensor([[1.0, 6.0]]))
    # one dominant slot selects (almost exactly) that slot's vector
    assert torch.allclose(memory_expectation(torch.tensor([[-50.0, 50.0]]), memory), torch.tensor([[0.0, 8.0]]))
    with pytest.raises(ValueError, match="3 slots but the memory has 2"):
        memory_expectation(torch.zeros(1, 3), memory)


class MeanPlusOne(nn.Module):
    """A hand-computable aggregator: every query gets the mean of the context features plus 1."""

    def forward(self, context: Tensor, mask: Mask) -> Tensor:
        mean = context.mean(dim=1, keepdim=True)
        return (mean + 1).expand(-1, mask.predict.shape[1], -1)


class ConstantLogits(nn.Module):
    """Logits (1, 1) for every query: p = [1/2, 1/2]."""

    def forward(self, context: Tensor, mask: Mask) -> Tensor:
        return torch.ones(context.shape[0], mask.predict.shape[1], 2)


def hand_predictor(grid: TokenGrid, memory_slots: int | None = None) -> FuturePredictor:
    predictor = FuturePredictor(encoder_dim=1, grid=grid, dim=4, depth=1, num_heads=1, memory_slots=memory_slots)
    predictor.aggregate = MeanPlusOne()
    return predictor


def test_rollout_feeds_each_prediction_back() -> None:
    """One past slot of value 0, three future slots: 1, then mean(0, 1) + 1 = 1.5, then
    mean(0, 1, 1.5) + 1 = 11/6. Without the feedback every slot would be 1."""
    grid = TokenGrid(t=4, h=1, w=1)
    predictor = hand_predictor(grid)
    mask = Mask(visible=torch.tensor([[0]]), predict=torch.tensor([[1, 2, 3]]))
    predicted = predictor(torch.zeros(1, 1, 1), mask)
    assert predicted.flatten().tolist() == pytest.approx([1.0, 1.5, 11 / 6])


def test_rollout_backwards_predicts_the_latest_slot_first() -> None:
    """MemDPC's backward direction: context = future slots 2, 3 with values 0 and 2 (mean 1);
    slot 1 is predicted first (1 + 1 = 2), then slot 0 from (0, 2, 2): 4/3 + 1 = 7/3."""
    grid = TokenGrid(t=4, h=1, w=1)
    predictor = hand_predictor(grid)
    future, future_index = torch.tensor([[[0.0], [2.0]]]), torch.tensor([[2, 3]])
    past = predictor.rollout(future, future_index, torch.tensor([[0, 1]]), reverse=True)
    assert past.flatten().tolist() == pytest.approx([7 / 3, 2.0])


def test_rollout_with_memory_predicts_expectations() -> None:
    """With a memory the aggregator's output is logits over the slots: logits (1, 1) give
    p = [1/2, 1/2] and the prediction is the mean of the two memory rows."""
    grid = TokenGrid(t=2, h=1, w=1)
    predictor = hand_predictor(grid, memory_slots=2)
    predictor.aggregate = ConstantLogits()
    with torch.no_grad():
        predictor.memory.copy_(torch.tensor([[2.0], [4.0]]))
    predicted = predictor(torch.zeros(1, 1, 1), Mask(visible=torch.tensor([[0]]), predict=torch.tensor([[1]])))
    assert predicted.flatten().tolist() == pytest.approx([3.0])


def test_transformer_rollout_equals_step_by_step_prediction() -> None:
    """With the real transformer: slot t+1 from the past, slot t+2 from the past plus the
    prediction of t+1 at t+1's positions; differs from predicting both slots at once."""
    torch.manual_seed(0)
    grid = TokenGrid(t=4, h=2, w=2)
    predictor = FuturePredictor(encoder_dim=8, grid=grid, dim=8, depth=1, num_heads=2).eval()
    video = torch.zeros(2, 3, 8, 32, 32)
    mask = FutureBlocksMasker(num_future_slots=2)(Batch(video=video), grid)
    past = torch.randn(2, 8, 8)
    rolled = predictor(past, mask)
    first = predictor.predict_slot(past, mask.visible, mask.predict[:, :4])
    context, context_index = torch.cat([past, first], 1), torch.cat([mask.visible, mask.predict[:, :4]], 1)
    second = predictor.predict_slot(context, context_index, mask.predict[:, 4:])
    assert torch.allclose(rolled, torch.cat([first, second], 1), atol=1e-6)
    at_once = predictor.aggregate(past, mask)
    assert not torch.allclose(rolled[:, 4:], at_once[:, 4:], atol=1e-3)  # not one parallel prediction


def test_gradient_reaches_the_memory() -> None:
    grid = TokenGrid(t=2, h=1, w=2)
    predictor = FuturePredictor(encoder_dim=4, grid=grid, dim=8, depth=1, num_heads=2, memory_slots=3)
    mask = Mask(visible=torch.tensor([[0, 1]]), predict=torch.tensor([[2, 3]]))
    predictor(torch.randn(1, 2, 4), mask).sum().backward()
    assert predictor.memory.grad is not None and predictor.memory.grad.abs().sum() > 0
    assert predictor(torch.randn(1, 2, 4), mask).shape == (1, 2, 4)


def test_tokens_to_predict_must_be_whole_slots() -> None:
    grid = TokenGrid(t=3, h=1, w=2)
    assert slot_chunks(torch.tensor([[4, 5, 2, 3]]), grid) == [slice(0, 2), slice(2, 4)]  # reverse time is fine
    with pytest.raises(ValueError, match="whole temporal slots of 2 tokens"):
        slot_chunks(torch.tensor([[2, 3, 4]]), grid)
    with pytest.raises(ValueError, match="whole temporal slots"):
        slot_chunks(torch.tensor([[2, 4, 3, 5]]), grid)  # a run of 2 columns mixes two slots
    with pytest.raises(ValueError, match="same columns of every row"):
        slot_chunks(torch.tensor([[2, 3, 4, 5], [4, 5, 2, 3]]), grid)
    with pytest.raises(ValueError, match="memory_slots"):
        FuturePredictor(encoder_dim=4, grid=grid, memory_slots=0)


def by_hand_context(predictor: FuturePredictor, features: Tensor) -> Tensor:
    """c_T as the thesis evaluates it (sec. 3.4, line 678), through the transformer's own layers:
    every token of the clip is context (its positions added, no mask token), the blocks and the
    final LayerNorm run, and the last temporal slot's tokens are kept."""
    transformer = predictor.aggregate
    tokens = transformer.embed(features) + transformer.pos_embed
    for block in transformer.blocks:
        tokens = block(tokens)
    return transformer.norm(tokens)[:, -predictor.grid.spatial:]


@pytest.mark.parametrize("memory_slots", [None, 8], ids=["dpc", "memdpc"])
def test_context_is_the_aggregate_of_every_block_at_the_last_slot(memory_slots) -> None:
    from vlmask.kinds import ContextFeatures, offers_context

    torch.manual_seed(0)
    grid = TokenGrid(t=3, h=2, w=2)
    predictor = FuturePredictor(encoder_dim=6, grid=grid, dim=8, depth=2, num_heads=2, memory_slots=memory_slots).eval()
    features = torch.randn(2, grid.num_tokens, 6)
    with torch.no_grad():
        context = predictor.context(features)
        assert context.shape == (2, grid.spatial, 8)  # one token per position, the predictor's width
        assert torch.allclose(context, by_hand_context(predictor, features), atol=1e-6)
        changed = features.clone()
        changed[:, : grid.spatial] += 1.0  # the first block changes the last slot's context: it aggregates all blocks
        assert not torch.allclose(predictor.context(changed), context)
    assert predictor.context_grid() == TokenGrid(t=1, h=2, w=2)
    assert isinstance(predictor, ContextFeatures) and offers_context(FuturePredictor) is True
    with pytest.raises(ValueError, match="every token of the clip"):
        predictor.context(features[:, :-1])


def test_the_plain_transformer_predictor_offers_no_context() -> None:
    """FILS' and VideoMAE's predictor decodes masked tokens; it aggregates no past into a context,
    so ``evaluation.features: context`` is refused for it (vlmask validate)."""
    from vlmask.kinds import ContextFeatures, offers_context
    from vlmask_plugins.encoders.predictor import TransformerPredictor

    assert offers_context(TransformerPredictor) is False
    assert not isinstance(TransformerPredictor(4, TokenGrid(t=2, h=1, w=1), dim=4, depth=1, num_heads=1), ContextFeatures)
