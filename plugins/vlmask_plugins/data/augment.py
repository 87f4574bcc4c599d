"""Colour augmentations of training clips: DPC's frame-wise colour jitter and greyscale, CoCLR's
clip-wise colour jitter, greyscale and Gaussian blur (``data.dataset.color_jitter``,
``data.dataset.blur``), on ``torchvision.transforms.v2``.

What the thesis says (/work/shared/papers/002_1d0e7e50828790eb.txt):

* DPC, sec. 2.3.3 "Avoiding Shortcuts and Learning Semantics" (line 394): "a critical operation
  is frame-wise augmentation, i.e. random augmentation for each individual frame in the video
  blocks, such as frame-wise color jittering including random brightness, contrast, saturation,
  hue and random greyscale during training"; sec. 2.3.5 (line 416): "Random grey and color
  jittering are applied in a frame-wise manner to prevent the network from learning low-level
  flow information ... the random crop and random horizontal flip are applied for the entire
  clip in a consistent way." Values from the released code (TengdaHan/DPC ``dpc/main.py``):
  ``ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, p=1.0)`` with a draw per
  frame and ``RandomGray(consistent=False, p=0.5)``.
* MemDPC, sec. 3.5.2 (line 703): "clip-wise random crop and horizontal flip, and frame-wise color
  jittering and random greyscale, for both the RGB and optical flow streams"; released code
  (TengdaHan/MemDPC ``memdpc/main.py``): the same jitter, ``RandomGray(consistent=False, p=0.25)``.
* CoCLR, sec. 4.4.2 (line 971): "random crops, horizontal flips, Gaussian blur and color
  jittering, all are clip-wise consistent"; released code (TengdaHan/CoCLR ``main_nce.py``,
  ``get_transform``): ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``,
  ``RandomGray(p=0.2)``, ``RandomApply([GaussianBlur([.1, 2.])], p=0.5)``, one draw per clip (MoCo
  v2's values); sec. 4.4.3 (line 981): finetuning uses them too, "except for the Gaussian blur".

What vlmask does (:class:`ClipColorAugment`, called by ``VideoManifestDataset`` in training
only, on the (T, C, H, W) uint8 frames after the crop, resize and flip):

1. colour jitter (``torchvision.transforms.v2.ColorJitter``: brightness, contrast, saturation and
   hue factors in a random order) with probability ``p`` per clip (one draw, as the released
   code's threshold); ``per_frame: true`` draws the factors (and the order) for every frame,
   ``false`` once for the clip;
2. greyscale (``v2.RandomGrayscale``) with probability ``grayscale``, per frame or per clip alike;
3. Gaussian blur (``v2.functional.gaussian_blur``) with probability ``blur.p`` per clip, sigma
   drawn uniformly from ``blur.sigma`` (in pixels of the frames as cropped and resized to the
   dataset's ``size``), one draw for the clip.

Every draw comes from torch's global generator, which the loader seeds per sample
(``vlmask.data_loading``) exactly as it seeds the crop: a run stays deterministic and resumable,
the second clip (CoCLR's key view) draws its own, and with both settings off (the default)
nothing is drawn, so every other recipe is unchanged to the last bit.

Departures: greyscale is luminance (ITU-R 601, torchvision) where the released codes copy one
random channel to all three ("actually it is a channel splitting"); the blur is a true Gaussian
of ``kernel_size`` taps (default ``2 * ceil(3 * sigma_max) + 1``, at most twice the frame's
shorter side minus one) where MoCo v2 uses PIL's ``GaussianBlur(radius=sigma)``; DPC's released
code applies greyscale before the jitter, here (as CoCLR and MoCo v2) after it; flow images are
never jittered (MemDPC jitters its flow stream too): they are computed from the frames before
the colour augmentation, so the flow shows the clip's motion, not the jitter's frame-to-frame
changes. Evaluation, ``embed`` and finetuning never apply these (the engine builds their
datasets with both settings off, ``vlmask.kinds.TRAINING_AUGMENTATIONS``); CoCLR's finetuning
jitter (line 981) would be a ``finetune`` setting.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from torch import Tensor
from torchvision.transforms import v2
from typing_extensions import TypedDict

Probability = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]
Sigma = Annotated[float, Field(gt=0)]


@with_config(ConfigDict(extra="forbid", strict=True))
class ColorJitter(TypedDict, total=False):
    """``data.dataset.color_jitter``: ``brightness``, ``contrast``, ``saturation`` (factors drawn
    from [max(0, 1 - x), 1 + x]) and ``hue`` (shift drawn from [-x, x], x <= 0.5), all 0 by
    default; ``p`` (default 1.0) the probability that a clip is jittered; ``grayscale`` (default
    0) the probability that a frame (``per_frame``) or the clip is turned grey; ``per_frame``
    (default false) a draw per frame instead of one per clip."""

    brightness: NonNegative
    contrast: NonNegative
    saturation: NonNegative
    hue: Annotated[float, Field(ge=0, le=0.5)]
    p: Probability
    grayscale: Probability
    per_frame: bool


@with_config(ConfigDict(extra="forbid", strict=True))
class Blur(TypedDict, total=False):
    """``data.dataset.blur``: Gaussian blur with probability ``p`` (default 0.5) per clip, sigma
    drawn uniformly from ``sigma`` = [low, high] pixels (default [0.1, 2.0]); ``kernel_size`` (odd;
    default 2 * ceil(3 * high) + 1)."""

    p: Probability
    sigma: tuple[Sigma, Sigma]
    kernel_size: Annotated[int, Field(ge=1)]


def _checked(name: str, value: Any, schema: type) -> dict[str, Any]:
    """``value`` as a plain dict, validated against ``schema``; a ValueError naming the key."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of {', '.join(schema.__annotations__)} or null, got {value!r}")
    plain = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    try:
        TypeAdapter(schema).validate_python(plain)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
        if first["type"] == "extra_forbidden":
            raise ValueError(f"{name}.{key}: unknown key; known: {', '.join(schema.__annotations__)}") from None
        got = plain.get(key, value)
        raise ValueError(f"{name}.{key}: {str(first['msg']).replace('Input should', 'should')}, got {got!r}") from None
    return plain


class ClipColorAugment:
    """The colour augmentation of one clip's (T, C, H, W) uint8 frames (module docstring).

    ``color_jitter`` and ``blur`` are the dataset's settings (:class:`ColorJitter`,
    :class:`Blur`; None: off). Calling it draws from torch's global generator; returns uint8 frames
    of the same shape.

    >>> augment = ClipColorAugment({"brightness": 0.5, "per_frame": True}, None)
    >>> frames = torch.full((3, 3, 4, 4), 100, dtype=torch.uint8)
    >>> _ = torch.manual_seed(0)
    >>> [int(frame[0, 0, 0]) for frame in augment(frames)]  # a brightness factor per frame
    [80, 95, 52]
    """

    def __init__(self, color_jitter: dict[str, Any] | None = None, blur: dict[str, Any] | None = None) -> None:
        self.jitter: v2.ColorJitter | None = None
        self.grayscale: v2.RandomGrayscale | None = None
        self.jitter_p, self.per_frame = 1.0, False
        if color_jitter is not None:
            settings = _checked("color_jitter", color_jitter, ColorJitter)
            factors = {k: float(settings.get(k, 0.0)) for k in ("brightness", "contrast", "saturation", "hue")}
            if any(factors.values()):
                self.jitter = v2.ColorJitter(**factors)
            if settings.get("grayscale", 0.0) > 0:
                self.grayscale = v2.RandomGrayscale(p=float(settings["grayscale"]))
            self.jitter_p, self.per_frame = float(settings.get("p", 1.0)), bool(settings.get("per_frame", False))
        self.blur_p, self.sigma, self.kernel_size = 0.0, (0.1, 2.0), 0
        if blur is not None:
            settings = _checked("blur", blur, Blur)
            self.blur_p = float(settings.get("p", 0.5))
            self.sigma = tuple(float(s) for s in settings.get("sigma", (0.1, 2.0)))  # type: ignore[assignment]
            if self.sigma[0] > self.sigma[1]:
                raise ValueError(f"blur.sigma: should be [low, high] with low <= high, got {list(self.sigma)}")
            self.kernel_size = int(settings.get("kernel_size", 2 * math.ceil(3 * self.sigma[1]) + 1))
            if self.kernel_size % 2 == 0:
                raise ValueError(f"blur.kernel_size: should be odd, got {self.kernel_size}")

    @property
    def active(self) -> bool:
        """Whether calling it can change a frame (False: the dataset skips it, drawing nothing)."""
        return self.jitter is not None or self.grayscale is not None or self.blur_p > 0

    def __call__(self, frames: Tensor) -> Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"colour augmentation needs (T, 3, H, W) uint8 frames, got {frames.dtype} {tuple(frames.shape)}")
        if self.jitter is not None and float(torch.rand(())) < self.jitter_p:
            frames = self._apply(self.jitter, frames)
        if self.grayscale is not None:
            frames = self._apply(self.grayscale, frames)
        if self.blur_p > 0 and float(torch.rand(())) < self.blur_p:
            low, high = self.sigma
            sigma = low + (high - low) * float(torch.rand(()))
            kernel = min(self.kernel_size, 2 * min(frames.shape[-2:]) - 1)  # reflect padding needs < the side
            kernel -= 1 - kernel % 2  # odd
            frames = v2.functional.gaussian_blur(frames, [kernel, kernel], [sigma, sigma])
        return frames

    def _apply(self, transform: Any, frames: Tensor) -> Tensor:
        """``transform`` with one draw for the clip, or one per frame with ``per_frame``."""
        if not self.per_frame:
            return transform(frames)
        return torch.stack([transform(frame) for frame in frames])
