"""``vlmask show reconstruction``: a pixel-target run's prediction of the tokens it did not see."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vlmask.pictures import Panel, darken, slot_of_frames
from vlmask.show import ShowError, ShownClips, recipe_name
from vlmask.types import TokenGrid, gather_tokens
from vlmask_plugins.pictures.masks import hidden_cells
from vlmask_plugins.targets.pixels import NormalizedPixelsTarget, pixel_targets


def pixel_target_of(shown: ShownClips) -> tuple[str, NormalizedPixelsTarget]:
    """The run's pixel target (its loss-term name and object), or a ShowError naming the recipe."""
    for name, objective in shown.run.student.objectives.items():
        if isinstance(objective, NormalizedPixelsTarget):
            return name, objective
    raise ShowError(f"reconstruction: {shown.name}: recipe {recipe_name(shown.run)} has no pixel target "
                    "(normalized_pixels): its predictor does not predict pixels")


def unnormalize_tokens(predicted: Tensor, reference: Tensor, channels: int, eps: float) -> Tensor:
    """Undo the per-token normalisation of :func:`pixel_targets` with the statistics of the
    true tokens: ``predicted`` (B, K, t*p*p*C), normalised as targets are, and ``reference``
    the same tokens' true pixels in [0, 1] (``normalize=False``), both channel fastest.

    Each token and channel: ``x = y * (std + eps) + mean`` with the true token's mean and
    unbiased std over its t*p*p values (VideoMAE's normalisation, inverted as its
    visualisation does). Given the true targets it gives back the true pixels.

    >>> grid = TokenGrid(t=1, h=1, w=1, tubelet=1, patch=2)
    >>> video = torch.rand(1, 3, 1, 2, 2)
    >>> raw = pixel_targets(video, grid, (0, 0, 0), (1, 1, 1), normalize=False)
    >>> normed = pixel_targets(video, grid, (0, 0, 0), (1, 1, 1), normalize=True, eps=1e-6)
    >>> bool(torch.allclose(unnormalize_tokens(normed, raw, 3, 1e-6), raw, atol=1e-6))
    True
    """
    shape = (*reference.shape[:-1], -1, channels)
    true = reference.reshape(shape)
    mean = true.mean(dim=-2, keepdim=True)
    std = true.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return (predicted.reshape(shape) * (std + eps) + mean).reshape(predicted.shape)


def tokens_to_frames(tokens: Tensor, grid: TokenGrid, channels: int) -> np.ndarray:
    """Token pixels (N, t*p*p*C) in [0, 1], channel fastest, back to (T, H, W, C) uint8 images
    (the inverse of :func:`pixel_targets`' cutting; values clipped to [0, 1])."""
    t, p = grid.tubelet, grid.patch
    cells = tokens.reshape(grid.t, grid.h, grid.w, t, p, p, channels)
    frames = cells.permute(0, 3, 1, 4, 2, 5, 6).reshape(grid.t * t, grid.h * p, grid.w * p, channels)
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def reconstructed_tokens(raw: Tensor, predicted: Tensor, predict: Tensor, target: NormalizedPixelsTarget,
                         channels: int) -> Tensor:
    """Every token's pixels (B, N, t*p*p*C) in [0, 1]: the true ``raw`` ones, with the tokens
    ``predict`` (B, Np) replaced by ``predicted`` (B, Np, t*p*p*C) brought back to pixels (un-normalised
    with the true tokens' statistics when the target normalises)."""
    true = gather_tokens(raw, predict)
    pixels = predicted.float()
    if target.normalize:
        pixels = unnormalize_tokens(pixels, true, channels, target.eps)
    out = raw.clone()
    out.scatter_(1, predict.long().unsqueeze(-1).expand(-1, -1, raw.shape[-1]), pixels)
    return out


def reconstruction(shown: ShownClips) -> list[list[Panel]]:
    """the clip, what the student saw of it (step-1 mask), and its prediction of the rest, per frame.

    For recipes with a pixel target (VideoMAE, Tong et al., NeurIPS 2022; ``recipes/mae.yaml``):
    the student encodes the visible tokens of the run's step-1 mask, the predictor predicts the
    hidden ones, and the prediction, made in per-token normalised pixels, is brought back to
    pixels with each true token's mean and std (:func:`unnormalize_tokens`, as
    ``targets/pixels.py`` normalised them). The third row shows the visible tokens as they are
    and the predicted ones in place of the others.
    """
    _, target = pixel_target_of(shown)
    run, grid = shown.run, shown.grid
    predictor = run.student.predictor
    mask = shown.training_mask()
    video = shown.batch.video
    channels = video.shape[1]
    with torch.no_grad():
        predicted = predictor(run.encoder(video, mask.visible), mask)
        mean, std = target.statistics(video)
        raw = pixel_targets(video, grid, mean, std, normalize=False)
    if predicted.shape[-1] != raw.shape[-1]:
        raise ShowError(f"reconstruction: {shown.name}: the predictor gives {predicted.shape[-1]} values per token, "
                        f"a token has {raw.shape[-1]} pixel values")
    tokens = reconstructed_tokens(raw, predicted, mask.predict, target, channels)
    frames = list(range(shown.frames.shape[1]))
    slots = slot_of_frames(frames, grid)
    labels = shown.frame_labels(frames)
    pictures = []
    for row in range(shown.batch.size):
        seen = darken(shown.frames[row], hidden_cells(mask, row, grid)[slots], grid)
        pictures.append([
            Panel("original", shown.frames[row], labels),
            Panel(f"masked input ({mask.num_visible} of {grid.num_tokens} tokens)", seen, labels),
            Panel("prediction", tokens_to_frames(tokens[row], grid, channels), labels),
        ])
    return pictures
