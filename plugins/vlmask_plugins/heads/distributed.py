"""Gathering contrastive features across processes: open_clip's ``gather_features`` (with the
local gradient) and MoCo's ``concat_all_gather`` (without gradient, for queues)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None]:
        return grad * ctx.scale, None  # type: ignore[attr-defined]


def gather_with_local_gradient(features: Tensor) -> Tensor:
    """Concatenate ``features`` (B, D) from every rank in rank order: (world * B, D).

    Semantics of open_clip's ``gather_features(local_loss=False)``: the other ranks' slices are
    constants and the local slice is the local tensor itself, so the gradient flows only into
    this rank's features. Each rank then computes the full global loss. To keep DDP's gradient
    *averaging* equal to the single-process gradient on the concatenated batch, the local
    slice's gradient is multiplied by the world size (its value is unchanged). That equals
    open_clip's ``gather_with_grad=True`` (whose backward sums the identical gradients of every
    rank) without a backward all-reduce. Every rank must pass the same batch size.
    """
    rank, world_size = world()
    if world_size == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = _ScaleGradient.apply(features, float(world_size))
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank in rank order: (world * B, ...), without
    gradient (MoCo's ``concat_all_gather``, He et al. CVPR 2020, facebookresearch/moco
    ``builder.py``: the keys of every rank go into every rank's queue).

    A collective: every rank must call it, with the same shape and dtype. Without a process
    group (one process) it returns ``tensor`` detached.
    """
    _, world_size = world()
    if world_size == 1:
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return torch.cat(gathered, dim=0)
