"""Normalised-pixel reconstruction target (VideoMAE, Tong et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmask.types import IMAGENET_MEAN, IMAGENET_STD, StepOutputs, TokenGrid, gather_tokens
from vlmask_plugins.targets.tokens import check_same_shape, require


def pixel_targets(
    video: Tensor,
    grid: TokenGrid,
    mean: Sequence[float] | Tensor = IMAGENET_MEAN,
    std: Sequence[float] | Tensor = IMAGENET_STD,
    normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """VideoMAE's reconstruction targets of every token: (B, N, t * p * p * C).

    ``video`` (B, C, T, H, W) is normalised with ``mean``/``std`` (values, or tensors already on
    the video's device and dtype, which are used without a copy); this undoes that to [0, 1],
    cuts tubelets, and (``normalize``) standardises each token per channel over its t*p*p
    values with ``(x - mean) / (sqrt(unbiased var) + eps)``: eps is added to the std, not
    the variance, as in VideoMAE's ``run_mae_pretraining``. Values are flattened in
    (t, p, p, c) order, channel fastest.

    >>> grid = TokenGrid(t=1, h=1, w=1, tubelet=1, patch=2)
    >>> video = torch.arange(12.0).view(1, 3, 1, 2, 2)
    >>> pixel_targets(video, grid, mean=(0, 0, 0), std=(1, 1, 1), normalize=False)[0, 0, :6].tolist()
    [0.0, 4.0, 8.0, 1.0, 5.0, 9.0]
    """
    if video.dim() != 5:
        raise ValueError(f"video must have shape (B, C, T, H, W), got {tuple(video.shape)}")
    batch, channels, frames, height, width = video.shape
    t, p = grid.tubelet, grid.patch
    if (frames, height, width) != (grid.t * t, grid.h * p, grid.w * p):
        raise ValueError(f"video of {frames}x{height}x{width} pixels does not match the token grid {grid}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
    mean_t = torch.as_tensor(mean, dtype=video.dtype, device=video.device).view(1, channels, 1, 1, 1)
    std_t = torch.as_tensor(std, dtype=video.dtype, device=video.device).view(1, channels, 1, 1, 1)
    pixels = video.detach() * std_t + mean_t
    tubelets = pixels.reshape(batch, channels, grid.t, t, grid.h, p, grid.w, p)
    tubelets = tubelets.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, t', h', w', t, p, p, C
    tubelets = tubelets.reshape(batch, grid.num_tokens, t * p * p, channels)
    if normalize:
        centred = tubelets - tubelets.mean(dim=-2, keepdim=True)
        tubelets = centred / (tubelets.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
    return tubelets.reshape(batch, grid.num_tokens, t * p * p * channels)


class NormalizedPixelsTarget:
    """MSE on the normalised pixels of the masked tokens (VideoMAE, Tong et al., NeurIPS 2022).

    ``out.predictions`` (B, Np, t*p*p*C) are compared with :func:`pixel_targets` gathered at
    ``out.mask.predict``; the loss is the mean squared error over every predicted value.
    """

    #: What the recipe must provide (vlmask.kinds.REQUIREMENTS); ``vlmask validate`` checks it.
    requires: frozenset[str] = frozenset({"predictor"})

    def __init__(
        self,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        normalize: bool = True,
        eps: float = 1e-6,
    ) -> None:
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self._statistics: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def statistics(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """``mean`` and ``std`` as tensors on the video's device and dtype, made once per pair
        (a host-to-device copy every step would wait for the GPU)."""
        key = (video.device, video.dtype)
        if key not in self._statistics:
            self._statistics[key] = tuple(torch.tensor(v, dtype=video.dtype, device=video.device) for v in (self.mean, self.std))
        return self._statistics[key]

    def __call__(self, out: StepOutputs) -> Tensor:
        require(out.predictions, "predictions", "target 'normalized_pixels'", "the recipe needs a predictor (decoder)")
        assert out.predictions is not None
        with torch.no_grad():
            mean, std = self.statistics(out.batch.video)
            targets = pixel_targets(out.batch.video, out.grid, mean, std, self.normalize, self.eps)
            targets = gather_tokens(targets, out.mask.predict)
        check_same_shape(out.predictions, targets, "target 'normalized_pixels'")
        return F.mse_loss(out.predictions, targets.to(out.predictions.dtype))
