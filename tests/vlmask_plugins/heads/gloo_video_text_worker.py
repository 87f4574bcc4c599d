"""Worker of the two-process gloo test of the video-text head (test_video_text_distributed.py).

A plain module (not a test file) so that spawned processes can import it by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vlmask.types import Batch, Mask, StepOutputs, TokenGrid
from vlmask_plugins.heads import VideoTextInfoNCEHead

WORLD = 2
GRID = TokenGrid(t=1, h=2, w=2)


def full_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 3, 5, generator=generator, dtype=torch.float64)
    text = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    visible = torch.tensor([[0, 1, 2], [1, 2, 3], [0, 2, 3]] * 2)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.9, 0.9, 1.0, 1.0]] * 2)
    return features, text, visible, boxes


def loss_and_grads(rows: slice) -> dict[str, torch.Tensor]:
    """The head's loss on ``rows`` of the batch and the gradients of its parameters."""
    features, text, visible, boxes = full_batch()
    torch.manual_seed(1)
    theta = nn.Linear(5, 4).double()
    head = VideoTextInfoNCEHead(pooling="action_area").double()
    local = features[rows].clone().requires_grad_(True)
    batch = Batch(video=torch.zeros(local.shape[0], 3, 1, 1, 1), text_embedding=text[rows], action_box=boxes[rows])
    mask = Mask(visible=visible[rows], predict=visible[rows, :0])
    out = StepOutputs(batch=batch, grid=GRID, mask=mask, visible_features=local, projection=theta)
    loss, stats = head(out)
    loss.backward()
    return {
        "loss": loss.detach(),
        "fallback_rate": stats["fallback_rate"],
        "theta_weight": theta.weight.grad,
        "theta_bias": theta.bias.grad,
        "logit_scale": head.logit_scale.grad,
        "features": local.grad,
    }


def worker(rank: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        per_rank = 6 // WORLD
        result = loss_and_grads(slice(rank * per_rank, (rank + 1) * per_rank))
        for name in ("theta_weight", "theta_bias", "logit_scale"):  # what DDP does with parameter grads
            dist.all_reduce(result[name])
            result[name] /= WORLD
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


