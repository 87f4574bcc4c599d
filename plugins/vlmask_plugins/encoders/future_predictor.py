"""Recursive future prediction (DPC) with an optional memory of hypotheses (MemDPC).

DPC (Han, Xie & Zisserman, "Video Representation Learning by Dense Predictive Coding", ICCV
workshops 2019; thesis ch. 2, eq. 2.1-2.4): block features ``z_t = f(x_t)`` are aggregated
into a context ``c_t = g(z_1, ..., z_t)`` and the next block is predicted, ``z^_{t+1} =
phi(c_t)``; several future blocks are predicted *recursively*: the prediction is fed back as
if it were an observed block, ``c_{t+1} = g(z_1, ..., z_t, z^_{t+1})``, ``z^_{t+2} =
phi(c_{t+1})``.

MemDPC (Han, Xie & Zisserman, "Memory-augmented Dense Predictive Coding for Video
Representation Learning", ECCV 2020; thesis ch. 3, eq. 3.3-3.4): ``phi`` outputs a probability
distribution over ``k`` learnable memory slots ``M`` (k, D), ``p = softmax(phi(c_t))``, and the
prediction is the expectation ``z^_{t+1} = sum_i p_i M_i`` (the memory holds hypotheses of the
future; the softmax picks a mixture of them).

In vlmask ``g`` and ``phi`` are one transformer (:class:`TransformerPredictor`: the context
tokens plus one mask token per position of the slot to predict); the temporal slots of
``mask.predict`` are predicted one at a time in time order, each slot's predictions appended to
the context of the next.

For evaluation (``evaluation.features: context``, :meth:`FuturePredictor.context`) the thesis
probes the context, not the block features: "we take the input video blocks x_1, ..., x_t ... and
extract the context feature c_t using the feature extractor f(.) for each block and temporal
aggregator g(.); then we spatially pool the context feature c_t to obtain the embedding" (sec.
3.4, line 678; retrieval: line 689; DPC's classifier: sec. 2.4, line 428). The released code
aggregates every block of the clip and keeps the last step, ``context[:, -1]``, pooled over space
(DPC ``eval/model_3d_lc.py``, MemDPC ``eval/model_lc.py``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from vlmask.types import Mask, TokenGrid
from vlmask_plugins.encoders.predictor import TransformerPredictor


def memory_expectation(logits: Tensor, memory: Tensor) -> Tensor:
    """MemDPC's memory addressing (eq. 3.3-3.4): ``softmax(logits) @ memory``.

    ``logits`` (..., k) score the ``k`` slots of ``memory`` (k, D); returns (..., D), the
    expectation of the memory under the softmax.

    >>> memory = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> memory_expectation(torch.tensor([[0.0, 0.0]]), memory).tolist()
    [[0.5, 1.0]]
    """
    if logits.shape[-1] != memory.shape[0]:
        raise ValueError(f"logits score {logits.shape[-1]} slots but the memory has {memory.shape[0]}")
    probabilities = torch.softmax(logits.float(), dim=-1).to(memory.dtype)
    return probabilities @ memory


def slot_chunks(index: Tensor, grid: TokenGrid) -> list[slice]:
    """The columns of ``index`` (B, K) cut into whole temporal slots, in the order of the columns.

    The tokens to predict must be whole slots listed in order (as the future-blocks masker
    gives them): K a multiple of ``grid.spatial`` and each run of ``grid.spatial`` columns one
    slot, in the same columns for every row. The shape is always checked; the values are
    checked with a clear error on the CPU, and on an accelerator by an asynchronous device
    assertion (a host check would stall every step).

    >>> grid = TokenGrid(t=3, h=1, w=2)
    >>> slot_chunks(torch.tensor([[2, 3, 4, 5]]), grid)
    [slice(0, 2, None), slice(2, 4, None)]
    """
    spatial = grid.spatial
    if index.ndim != 2 or index.shape[1] % spatial:
        raise ValueError(
            f"recursive prediction needs whole temporal slots of {spatial} tokens to predict, got {tuple(index.shape)} "
            "(use the future_blocks masker)"
        )
    slots = index.reshape(index.shape[0], -1, spatial)
    first = torch.div(slots[:, :, :1], spatial, rounding_mode="floor")
    whole = (torch.remainder(slots, spatial) == torch.arange(spatial, device=index.device)) & (
        torch.div(slots, spatial, rounding_mode="floor") == first
    )
    whole = whole.all() & (first == first[:1]).all()
    if index.device.type == "cpu":
        if not bool(whole):
            raise ValueError(
                "recursive prediction needs the tokens to predict as whole temporal slots, in the same columns of "
                "every row (use the future_blocks masker)"
            )
    else:
        torch._assert_async(whole, "recursive prediction needs whole temporal slots in the same columns of every row")
    return [slice(k * spatial, (k + 1) * spatial) for k in range(index.shape[1] // spatial)]


class FuturePredictor(nn.Module):
    """DPC's recursive future predictor; with ``memory_slots`` MemDPC's memory-addressed one.

    ``forward(visible_features, mask)`` returns predictions (B, Np, encoder_dim) at
    ``mask.predict`` (the predictor contract), computed slot by slot in time order:
    :meth:`rollout`. ``memory_slots=None``: the transformer regresses the features directly
    (DPC, eq. 2.2); ``memory_slots=k``: it outputs k logits per token and the prediction is the
    expectation over a learnable (k, encoder_dim) memory (MemDPC, eq. 3.3-3.4; the paper uses
    k = 1024; initialised N(0, 1) as in the released code). MemDPC's backward direction uses its
    own aggregator (``agg_b``) with the shared prediction head and memory; here one transformer
    serves both directions (its positions say which slots are context). ``encoder_dim`` and
    ``grid`` are injected by the engine.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid: TokenGrid,
        dim: int = 384,
        depth: int = 4,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        memory_slots: int | None = None,
        attention: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        whole = not isinstance(memory_slots, bool) and memory_slots is not None and int(memory_slots) == memory_slots
        if memory_slots is not None and not (whole and memory_slots >= 1):
            raise ValueError(f"memory_slots must be a positive integer or None, got {memory_slots!r}")
        self.grid = grid
        self.encoder_dim = encoder_dim
        self.memory_slots = int(memory_slots) if memory_slots is not None else None
        self.aggregate = TransformerPredictor(
            encoder_dim, grid, dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            output=self.memory_slots if self.memory_slots is not None else "features",
            attention=attention, grad_checkpointing=grad_checkpointing,
        )  # fmt: skip
        if self.memory_slots is not None:
            self.memory = nn.Parameter(torch.randn(self.memory_slots, encoder_dim))  # MemDPC: randn, std 1
        else:
            self.register_parameter("memory", None)

    def no_weight_decay(self) -> set[str]:
        """The transformer's exemptions (its mask token); MemDPC's memory is decayed, as in its code."""
        return {f"aggregate.{name}" for name in self.aggregate.no_weight_decay()}

    def predict_slot(self, context: Tensor, context_index: Tensor, query_index: Tensor) -> Tensor:
        """One prediction step: features (B, Nq, encoder_dim) at ``query_index`` from the context."""
        out = self.aggregate(context, Mask(visible=context_index, predict=query_index))
        return memory_expectation(out, self.memory) if self.memory is not None else out

    def rollout(self, context: Tensor, context_index: Tensor, query_index: Tensor, reverse: bool = False) -> Tensor:
        """Predict the tokens ``query_index`` (B, Nq) slot by slot, feeding each slot's
        predictions back into the context (DPC's recursion, eq. 2.3).

        Slots go in ascending time (``reverse=False``: the future from the past) or descending
        time (``reverse=True``: the past from the future, MemDPC's backward direction), each slot
        a run of ``grid.spatial`` columns (:func:`slot_chunks`). Returns
        (B, Nq, encoder_dim) in the column order of ``query_index``.
        """
        chunks = slot_chunks(query_index, self.grid)
        predictions: list[Tensor] = []
        for columns in reversed(chunks) if reverse else chunks:
            query = query_index[:, columns]
            predicted = self.predict_slot(context, context_index, query)
            predictions.append(predicted)
            context = torch.cat([context, predicted.to(context.dtype)], dim=1)
            context_index = torch.cat([context_index, query], dim=1)
        if reverse:
            predictions.reverse()
        return torch.cat(predictions, dim=1)

    def forward(self, visible_features: Tensor, mask: Mask) -> Tensor:
        """(B, Nv, encoder_dim) features of ``mask.visible`` -> (B, Np, encoder_dim) at ``mask.predict``."""
        return self.rollout(visible_features, mask.visible, mask.predict)

    def context(self, features: Tensor) -> Tensor:
        """The aggregated context c_T of a whole clip (``vlmask.kinds.ContextFeatures``): the
        encoder's features of every token (B, N, encoder_dim), grid order -> (B, h*w, dim).

        As the thesis evaluates DPC and MemDPC (module docstring): every block z_1..z_T of the
        clip is aggregated, and the context at the last temporal slot, one token per spatial
        position, is kept (the released code's ``context[:, -1]``); mean pooling these tokens is
        the thesis' spatial pooling. g is here the transformer up to its final LayerNorm (what
        the head, phi, reads), run on the clip's tokens alone, without mask tokens.

        Where vlmask departs: g is a transformer, not a ConvGRU, so every slot's context has
        attended to every block (there is no causal order), and during training the last
        ``num_future_slots`` positions held mask tokens, never context; MemDPC's backward
        aggregator (the released code concatenates its last step to the forward one) is the same
        transformer here, so one context serves both directions.
        """
        batch, tokens, width = features.shape
        if tokens != self.grid.num_tokens:
            raise ValueError(f"context needs the features of every token of the clip ({self.grid.num_tokens}), "
                             f"got {tokens}")
        every = torch.arange(tokens, device=features.device).expand(batch, tokens)
        hidden = self.aggregate.hidden_tokens(features, Mask(visible=every, predict=every[:, :0]))
        return self.aggregate.norm(hidden[:, -self.grid.spatial:])

    def context_grid(self) -> TokenGrid:
        """The grid of :meth:`context`'s tokens: one temporal slot of the clip's h x w positions."""
        return dataclasses.replace(self.grid, t=1)


#: Registered name -> factory of every predictor in this module.
FUTURE_PREDICTORS = {"future": FuturePredictor}
