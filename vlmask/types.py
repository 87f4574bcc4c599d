"""The data that flows through one training step.

Every plugin kind speaks these types, so a masker, an encoder, a target and a head written by
different people fit together. They are plain dataclasses: no behaviour beyond shape helpers.

Shapes use B (clips in the batch), C (channels), T/H/W (frames, height, width in pixels),
N (tokens of the whole clip), Nv (visible tokens), Np (tokens to predict), D (feature width).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

#: ImageNet channel statistics (RGB, [0, 1] pixels): the clips' normalisation everywhere in vlmask
#: (data loader, pixel targets, exported preprocessing), as in VideoMAE.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Flow images (uint8, 128 = no motion) are mapped to [-1, 1] (CoCLR's flow normalisation).
FLOW_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
FLOW_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


_NORMALIZE_CONSTANTS: dict[tuple[str, tuple[float, ...], tuple[float, ...]], tuple[Tensor, Tensor]] = {}


def normalize_video(
    video: Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """Raw uint8 pixels (B, C, T, H, W) -> float32 ``(x / 255 - mean) / std`` per channel, on the
    video's device; a float video is returned as it is (it is normalised already).

    The one place clips are normalised: data loaders hand over uint8 (4x fewer bytes through
    worker shared memory and the host-to-device copy) and :meth:`Batch.to` calls this after the
    copy, so training, evaluation and finetuning see the same numbers. Computed as
    ``x * (1 / (255 std)) + (-mean / std)`` in one ``addcmul``; the constants are kept per device.

    >>> normalize_video(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2, 1, 1).expand(1, 3, 2, 1, 1),
    ...                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).flatten().round(decimals=5).tolist()
    [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]
    """
    if video.dtype != torch.uint8:
        return video
    key = (str(video.device), tuple(mean), tuple(std))
    if key not in _NORMALIZE_CONSTANTS:
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        _NORMALIZE_CONSTANTS[key] = ((1.0 / (255.0 * std_t)).to(video.device), (-mean_t / std_t).to(video.device))
    scale, shift = _NORMALIZE_CONSTANTS[key]
    return torch.addcmul(shift, video.float(), scale)


def gather_tokens(table: Tensor, index: Tensor) -> Tensor:
    """Rows of a token table (B, N, D), or (1, N, D) shared by the batch, at token indices
    ``index`` (B, K): returns (B, K, D). The one gather of encoders, predictors and targets.

    >>> gather_tokens(torch.arange(6.0).view(1, 3, 2), torch.tensor([[2, 0], [1, 1]])).tolist()
    [[[4.0, 5.0], [0.0, 1.0]], [[2.0, 3.0], [2.0, 3.0]]]
    """
    table = table.expand(index.shape[0], -1, -1)
    return torch.gather(table, 1, index.long().unsqueeze(-1).expand(-1, -1, table.shape[-1]))


@dataclass(frozen=True)
class TokenGrid:
    """The token grid of a clip cut into tubelets of ``tubelet x patch x patch`` pixels.

    Tokens are ordered (t, h, w), row-major (VideoMAE): token ``i`` sits at
    ``t = i // (h*w)``, ``y = (i // w) % h``, ``x = i % w``.
    """

    t: int
    h: int
    w: int
    tubelet: int = 2
    patch: int = 16

    @property
    def spatial(self) -> int:
        """Positions per temporal slot (h * w)."""
        return self.h * self.w

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @classmethod
    def for_clip(cls, frames: int, height: int, width: int, tubelet: int = 2, patch: int = 16) -> "TokenGrid":
        if frames % tubelet or height % patch or width % patch:
            raise ValueError(
                f"clip {frames}x{height}x{width} is not divisible into tubelets {tubelet}x{patch}x{patch}"
            )
        return cls(frames // tubelet, height // patch, width // patch, tubelet, patch)


@dataclass
class Batch:
    """A batch of clips as the data loader delivers it.

    ``video`` (B, C, T, H, W) leaves the loader as raw uint8 pixels; :meth:`to` moves it to the
    device and normalises it there (:func:`normalize_video`: ImageNet mean/std, or
    ``extra["video_mean"]`` / ``extra["video_std"]`` when the dataset set others), so every step,
    target and head reads a normalised float video. A float ``video`` is taken as normalised
    already and only moved. The optional fields
    are present when the manifest carries them: ``text_embedding`` (B, D_text) are the frozen
    text encoder's embeddings of the captions (computed once and cached, never in the step),
    ``action_box`` (B, 4) holds [x0, y0, x1, y1] as fractions of width and height (after the
    same crop and flip as the pixels), ``label`` (B,) class indices, ``index`` (B,) the rows of
    the manifest. ``flow`` (B, 3, T, H, W) are optical-flow images of the clip (dataset
    ``flow: true``); ``second_video`` and ``second_flow`` a second, independently sampled and
    augmented clip of the same video and its flow (dataset ``second_clip: true``: the positive
    view of instance discrimination), normalised like ``video`` and ``flow``.
    """

    video: Tensor
    index: Tensor | None = None
    text_embedding: Tensor | None = None
    action_box: Tensor | None = None
    label: Tensor | None = None
    caption: list[str] | None = None
    flow: Tensor | None = None
    second_video: Tensor | None = None
    second_flow: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.video.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        def move(x: Any) -> Any:
            return x.to(device, non_blocking=non_blocking) if isinstance(x, Tensor) else x

        mean, std = self.extra.get("video_mean", IMAGENET_MEAN), self.extra.get("video_std", IMAGENET_STD)
        return replace(
            self,
            video=normalize_video(move(self.video), mean, std),
            index=move(self.index),
            text_embedding=move(self.text_embedding),
            action_box=move(self.action_box),
            label=move(self.label),
            flow=normalize_video(move(self.flow), FLOW_MEAN, FLOW_STD) if self.flow is not None else None,
            second_video=(normalize_video(move(self.second_video), mean, std)
                          if self.second_video is not None else None),
            second_flow=(normalize_video(move(self.second_flow), FLOW_MEAN, FLOW_STD)
                         if self.second_flow is not None else None),
        )


@dataclass
class Mask:
    """Which tokens the student sees and which it must predict.

    ``visible`` (B, Nv) and ``predict`` (B, Np) are token indices into the (t, h, w)-ordered
    grid, each row sorted ascending, with the same counts in every row. For MAE-style masking,
    ``predict`` is every masked token; for partial masking (Turbo training) it is a subset of
    the dropped tokens; for future-block prediction (DPC) it is the last temporal slots.
    """

    visible: Tensor
    predict: Tensor

    @property
    def num_visible(self) -> int:
        return self.visible.shape[1]

    @property
    def num_predict(self) -> int:
        return self.predict.shape[1]

    def to(self, device: torch.device | str) -> "Mask":
        return Mask(self.visible.to(device), self.predict.to(device))


@dataclass
class StepOutputs:
    """What targets and heads may read in one training step.

    ``visible_features``: the student encoder's output for ``mask.visible`` (B, Nv, D).
    ``predictions``: the predictor's output at ``mask.predict`` (B, Np, D_out), or None when
    the recipe has no predictor. ``teacher_features``: the teacher's features of every token
    (B, N, D), computed without gradient, or None without a teacher. ``projection`` is the
    student's video-to-text projection (None when the recipe has no text space) and
    ``teacher_projection`` the teacher's copy of it (EMA teacher) or None. ``encoder`` and
    ``predictor`` are the student's own modules, for terms that must run them again with
    gradient (faithful DPC encodes the true future blocks online; MemDPC's backward direction
    predicts the past from them); None when the step does not provide them.
    """

    batch: Batch
    grid: TokenGrid
    mask: Mask
    visible_features: Tensor
    predictions: Tensor | None = None
    teacher_features: Tensor | None = None
    projection: torch.nn.Module | None = None
    teacher_projection: torch.nn.Module | None = None
    encoder: torch.nn.Module | None = None
    predictor: torch.nn.Module | None = None


@runtime_checkable
class Masker(Protocol):
    """kind ``masker``: chooses visible and predicted tokens for a batch."""

    def __call__(self, batch: Batch, grid: TokenGrid, generator: torch.Generator | None = None) -> Mask: ...


@runtime_checkable
class Objective(Protocol):
    """kinds ``target`` and ``head``: one loss term.

    Returns the scalar loss, or ``(loss, stats)`` where ``stats`` maps names to scalar tensors
    logged as ``<term>/<stat>`` (e.g. how often ActCLIP fell back to all visible tokens).
    Targets and heads that hold parameters are ``nn.Module``s and are trained with the student.
    """

    def __call__(self, out: StepOutputs) -> Tensor | tuple[Tensor, dict[str, Tensor]]: ...
