"""The clip dataset: a manifest, decoded and augmented (dataset ``video_manifest``)."""

from __future__ import annotations

import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from vlmask.types import IMAGENET_MEAN, IMAGENET_STD, Batch
from vlmask_plugins.data.augment import Blur, ClipColorAugment, ColorJitter
from vlmask_plugins.data.decode import (
    DecodeError,
    FrameSampler,
    VideoInfo,
    decode_clip,
    probe_video,
    resolve_decoder,
    segment_frames,
)
from vlmask_plugins.data.manifest import ManifestClip, SkippedClip, read_manifest



class EmptyManifestError(ValueError):
    """A manifest with no usable clip (every line was bad, or there were none)."""


@dataclass(frozen=True)
class CropWindow:
    """A crop of a (frame_height, frame_width) frame: rows [top, top+height), columns
    [left, left+width), in pixels."""

    top: int
    left: int
    height: int
    width: int
    frame_height: int
    frame_width: int


def random_resized_crop(frame_height: int, frame_width: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> CropWindow:
    """torchvision's ``RandomResizedCrop.get_params`` (area fraction in ``scale``, log-uniform
    aspect ratio, ten tries, then a centre crop with the ratio clamped), drawn from torch's RNG
    so DataLoader workers are seeded as usual."""
    area = frame_height * frame_width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator)))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand((), generator=generator)))
        width = int(round(math.sqrt(target * aspect)))
        height = int(round(math.sqrt(target / aspect)))
        if 0 < width <= frame_width and 0 < height <= frame_height:
            top = int(torch.randint(0, frame_height - height + 1, (), generator=generator))
            left = int(torch.randint(0, frame_width - width + 1, (), generator=generator))
            return CropWindow(top, left, height, width, frame_height, frame_width)
    in_ratio = frame_width / frame_height
    if in_ratio < ratio[0]:
        width, height = frame_width, int(round(frame_width / ratio[0]))
    elif in_ratio > ratio[1]:
        height, width = frame_height, int(round(frame_height * ratio[1]))
    else:
        width, height = frame_width, frame_height
    return CropWindow((frame_height - height) // 2, (frame_width - width) // 2, height, width, frame_height, frame_width)


def centre_crop(frame_height: int, frame_width: int, size: int) -> CropWindow:
    height, width = min(size, frame_height), min(size, frame_width)
    return CropWindow((frame_height - height) // 2, (frame_width - width) // 2, height, width, frame_height, frame_width)


def crop_box(box: Tensor, window: CropWindow) -> Tensor:
    """An [x0, y0, x1, y1] fraction box of the frame, as fractions of the crop, clipped to
    [0, 1] (a box wholly outside the crop becomes empty: x0 == x1 or y0 == y1).

    >>> crop_box(torch.tensor([0.25, 0.25, 0.75, 0.75]), CropWindow(0, 50, 100, 50, 100, 100)).tolist()
    [0.0, 0.25, 0.5, 0.75]
    """
    x = (box[0::2] * window.frame_width - window.left) / window.width
    y = (box[1::2] * window.frame_height - window.top) / window.height
    return torch.stack([x[0], y[0], x[1], y[1]]).clamp(0.0, 1.0)


def flip_box(box: Tensor) -> Tensor:
    """The box of a horizontally flipped frame: x0' = 1 - x1, x1' = 1 - x0.

    >>> flip_box(torch.tensor([0.125, 0.25, 0.5, 0.75])).tolist()
    [0.5, 0.25, 0.875, 0.75]
    """
    return torch.stack([1.0 - box[2], box[1], 1.0 - box[0], box[3]])


class VideoManifestDataset(Dataset):
    """Clips of a JSONL manifest, decoded to ``num_frames`` frames at ``size`` x ``size``.

    Sampling and augmentation follow VideoMAE (Tong et al., NeurIPS 2022) as used by FILS
    (Ahmadian et al., BMVC 2024): ``dynamic`` or ``fixed``-stride frame sampling
    (``decode.FrameSampler``), then, in training, one RandomResizedCrop and one horizontal flip
    shared by every frame *and applied to the action box*; in evaluation, the short side is
    resized to ``size`` and the centre cropped. Frames are decoded straight to a short side of
    ``decode_short_side`` (default ``size``; AVION's lesson: never decode at full resolution).

    ``crop_scale`` (0.5, 1.0) is milder than classification finetuning's usual (0.08, 1.0), so
    the action area survives pretraining crops; use (0.08, 1.0) for finetuning. Note that
    ``hflip`` mirrors direction words: for data whose labels or captions say "left"/"right"
    (the built-in synthetic set) set ``hflip: false`` (a warning says so at construction).

    Bad lines never crash: lines the manifest parser rejects and files the probe (PyAV, in
    threads, at construction) cannot decode are skipped with their line numbers in
    ``.skipped``; a clip that still fails while loading is recorded and replaced by another
    random good clip (see ``item["load_failures"]``). A manifest with no usable clip raises
    :class:`EmptyManifestError` naming it.

    Decoding: ``decoder`` is ``auto`` (PyAV, the fastest measured: ``decode``'s docstring),
    ``pyav``, ``decord`` or ``torchcodec``; every decoder picks the same frames (the rule is
    ``decode.slot_times``). The choice and why are ``.decoder`` and ``.decoder_reason`` (the run's
    start line prints them). ``decode_device="cuda"`` makes torchcodec decode on the GPU (with
    ``num_workers: 0``, as CUDA does not survive forked workers).

    Items are dicts: ``video`` (C, T, H, W) **uint8** pixels (normalised on the device by
    ``vlmask.types.normalize_video`` when the batch is moved there, with this dataset's ``mean``
    and ``std``: ``.collate`` records them in the batch), ``index`` (row among the kept
    clips), ``label`` (class index or -1), ``action_box`` (4,) or NaNs, ``caption`` ("" when
    absent) and ``load_failures`` (list of (line, video, reason), usually empty). With
    ``flow=True`` (CoCLR's second view) items also hold ``flow``: (3, T, H, W) uint8 DIS
    optical-flow images of the frames as cropped (``action_area.flow.flow_images``; x, y, zero),
    displacements clipped to ``flow_bound`` pixels (CoCLR's 20 px is for frames of about 256 px;
    at the demo's 32-64 px most motions are a pixel or less, i.e. a few grey levels: scale the
    bound with the frame size, e.g. 20 x size / 256). With ``second_clip=True`` items also hold ``second_video`` (and ``second_flow`` with
    ``flow``): a second clip of the same segment, sampled and augmented independently of the
    first (another temporal draw of the sampler: another phase with ``dynamic``, another start
    with ``fixed``; its own crop and flip), as the positive pair of instance discrimination
    (MoCo / CoCLR: Han et al., NeurIPS 2020, sec. 4.1 "two clips of the same video").

    Colour augmentation (training only, off by default; ``vlmask_plugins.data.augment``):
    ``color_jitter`` ({brightness, contrast, saturation, hue, p, grayscale, per_frame}: DPC's
    frame-wise jitter and greyscale with ``per_frame: true``, thesis sec. 2.3.3; CoCLR's clip-wise
    one, sec. 4.4.2) and ``blur`` ({p, sigma, kernel_size}: CoCLR's Gaussian blur) are applied to
    the uint8 frames after the crop and flip, drawn from the per-sample seed like the crop; the
    second clip draws its own; flow images are computed from the frames before them.
    """

    def __init__(
        self,
        manifest: str,
        num_frames: int = 16,
        size: int = 224,
        sampling: str = "dynamic",
        stride: int = 4,
        train: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        decoder: str = "auto",
        classes: list[str] | None = None,
        probe: bool = True,
        decode_short_side: int | None = None,
        probe_workers: int = 8,
        decode_device: str = "cpu",
        flow: bool = False,
        second_clip: bool = False,
        flow_bound: float = 20.0,
        color_jitter: ColorJitter | None = None,
        blur: Blur | None = None,
    ) -> None:
        if probe_workers < 1:
            raise ValueError(f"probe_workers must be >= 1, got {probe_workers}")
        self._configure(num_frames, size, sampling, stride, train, crop_scale, hflip, mean, std, decoder,
                        decode_short_side, decode_device, flow, second_clip, flow_bound, color_jitter, blur)
        self.manifest = Path(manifest)

        report = read_manifest(self.manifest)
        self.manifest_skipped: list[SkippedClip] = list(report.skipped)
        clips = report.clips
        infos: list[VideoInfo | None] = [None] * len(clips)
        self.probe_skipped: list[SkippedClip] = []
        if probe and clips:
            clips, infos, self.probe_skipped = _probe_all(clips, probe_workers)
        self.clips: list[ManifestClip] = clips
        self._infos = infos
        if not clips:
            total = len(self.skipped)
            shown = "; ".join(str(s) for s in self.skipped[:5])
            raise EmptyManifestError(
                f"manifest {self.manifest} has no usable clip"
                + (f": all {total} lines were skipped ({shown}{'; ...' if total > 5 else ''})" if total else " (it is empty)")
            )

        self.captions: list[str] = [c.caption or "" for c in clips]
        self.labels: list[str | None] = [c.label for c in clips]
        self.verbs: list[str | None] = [c.verb for c in clips]
        self.nouns: list[str | None] = [c.noun for c in clips]
        self.classes: list[str] = list(classes) if classes is not None else sorted({l for l in self.labels if l is not None})
        lookup = {name: i for i, name in enumerate(self.classes)}
        self.label_ids: list[int] = [lookup.get(l, -1) if l is not None else -1 for l in self.labels]
        self.unknown_labels: int = sum(1 for l in self.labels if l is not None and l not in lookup)
        self.load_failures: list[SkippedClip] = []  # this process's load-time failures
        self._bad: set[int] = set()
        if hflip and train and any(_mentions_direction(c) for c in clips[:200]):
            warnings.warn(
                f"hflip=True on {self.manifest}, whose labels or captions mention left/right: flipping "
                "mirrors those actions and contradicts the text; set hflip: false for such data",
                stacklevel=2,
            )

    def _configure(self, num_frames: int, size: int, sampling: str, stride: int, train: bool,
                   crop_scale: tuple[float, float], hflip: bool, mean: tuple[float, float, float],
                   std: tuple[float, float, float], decoder: str, decode_short_side: int | None,
                   decode_device: str, flow: bool, second_clip: bool, flow_bound: float,
                   color_jitter: ColorJitter | None, blur: Blur | None) -> None:
        """Check and keep the sampling, decoding and augmentation settings (shared with
        ``vlmask_plugins.data.shards.VideoShardsDataset``, which reads its clips elsewhere)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if sampling not in ("dynamic", "fixed"):
            raise ValueError(f"sampling must be 'dynamic' or 'fixed', got {sampling!r}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        crop_scale = tuple(float(v) for v in crop_scale)  # type: ignore[assignment]
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 values and std must be > 0, got mean={mean}, std={std}")
        if decode_device not in ("cpu", "cuda"):
            raise ValueError(f"decode_device must be 'cpu' or 'cuda', got {decode_device!r}")
        self.decoder, self.decoder_reason = resolve_decoder(decoder)  # one-line error naming the key
        self.requested_decoder = decoder
        if decode_device == "cuda" and self.decoder != "torchcodec":
            raise ValueError(f"decode_device='cuda' needs decoder torchcodec, got {self.decoder} ({self.decoder_reason})")
        self.decode_device = decode_device
        self.flow = bool(flow)
        self.second_clip = bool(second_clip)
        if not flow_bound > 0:
            raise ValueError(f"flow_bound must be > 0 (pixels), got {flow_bound}")
        self.flow_bound = float(flow_bound)
        self.color_augment = ClipColorAugment(color_jitter, blur)  # ValueError naming color_jitter.KEY / blur.KEY
        if decode_short_side is not None and decode_short_side < size:
            raise ValueError(f"decode_short_side must be >= size ({size}) or None, got {decode_short_side}")

        self.sampler = FrameSampler(num_frames, sampling, stride)
        self.size = size
        self.train = train
        self.crop_scale: tuple[float, float] = crop_scale  # type: ignore[assignment]
        self.hflip = hflip
        self.decode_short_side = decode_short_side or size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        #: Stacks items into a Batch that carries this dataset's mean/std (``collate_of`` finds it).
        self.collate = functools.partial(collate, mean=self.mean, std=self.std)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def skipped(self) -> list[SkippedClip]:
        """Every skipped line: rejected by the manifest parser or by the probe, by line."""
        return sorted(self.manifest_skipped + self.probe_skipped, key=lambda s: s.line)

    @property
    def skip_counts(self) -> dict[str, int]:
        return {
            "manifest": len(self.manifest_skipped),
            "probe": len(self.probe_skipped),
            "load": len(self.load_failures),
        }

    def __len__(self) -> int:
        return len(self.clips)

    # ------------------------------------------------------------------ items

    def __getitem__(self, index: int) -> dict[str, Any]:
        failures: list[tuple[int, str, str]] = []
        current = index
        for _attempt in range(20):
            try:
                item = self._load(current)
                item["load_failures"] = failures
                return item
            except DecodeError as error:
                clip = self.clips[current]
                failures.append((clip.line, str(clip.video), error.reason))
                self.load_failures.append(SkippedClip(clip.line, str(clip.video), error.reason))
                self._bad.add(current)
                good = [i for i in range(len(self.clips)) if i not in self._bad]
                if not good:
                    break
                current = good[int(torch.randint(0, len(good), ()))]
        raise RuntimeError(
            f"{self.manifest}: could not load any clip after {len(failures)} failures; last: "
            + (f"line {failures[-1][0]} ({failures[-1][1]}): {failures[-1][2]}" if failures else "none")
        )

    def _load(self, index: int) -> dict[str, Any]:
        clip = self.clips[index]
        video, box, flow = self._view(clip, self._infos[index])
        item: dict[str, Any] = {} if flow is None else {"flow": flow}
        if self.second_clip:  # independent temporal draw, crop and flip of the same segment
            second_video, _, second_flow = self._view(clip, self._infos[index])
            item["second_video"] = second_video
            if second_flow is not None:
                item["second_flow"] = second_flow
        return item | {
            "video": video,
            "index": index,
            "label": self.label_ids[index],
            "action_box": box if box is not None else torch.full((4,), float("nan")),
            "caption": self.captions[index],
        }

    def _view(self, clip: ManifestClip, info: VideoInfo | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One decoded, augmented clip of ``clip``'s segment: (C, T, H, W) uint8 pixels, the
        action box after the same crop and flip (or None), and the flow images (or None)."""
        frames, _ = decode_clip(
            clip.video, self.sampler, train=self.train, short_side=self.decode_short_side,
            start=clip.start, end=clip.end, decoder=self.requested_decoder,
            info=info, device=self.decode_device,
        )
        # uint8 until the end: torch's uint8 antialiased resize is several times faster than float's.
        video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, C, H, W) uint8, channels-last
        box = torch.tensor(clip.action_box, dtype=torch.float32) if clip.action_box is not None else None
        video, box = self.transform(video, box)
        flow = None
        if self.flow:  # CoCLR's flow view, of the frames as cropped: (C, T, H, W) uint8 x/y/zero images
            from vlmask_plugins.action_area.flow import flow_images

            images = flow_images(video.permute(0, 2, 3, 1).contiguous().numpy(), bound=self.flow_bound)
            flow = torch.from_numpy(images).permute(3, 0, 1, 2).contiguous()
        if self.train and self.color_augment.active:  # after the flow: it shows motion, not the jitter
            video = self.color_augment(video)
        return video.permute(1, 0, 2, 3).contiguous(), box, flow

    def transform(self, video: Tensor, box: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Crop, resize and flip (T, C, H, W) frames (uint8 or float) and the box the same way."""
        height, width = video.shape[-2:]
        if self.train:
            window = random_resized_crop(height, width, self.crop_scale)
        else:
            if min(height, width) != self.size:  # resize the short side to size first
                scale = self.size / min(height, width)
                video = _resize(video, max(self.size, round(height * scale)), max(self.size, round(width * scale)))
                height, width = video.shape[-2:]
            window = centre_crop(height, width, self.size)
        video = video[..., window.top:window.top + window.height, window.left:window.left + window.width]
        if video.shape[-2:] != (self.size, self.size):
            video = _resize(video, self.size, self.size)
        if box is not None:
            box = crop_box(box, window)
        if self.train and self.hflip and float(torch.rand(())) < 0.5:
            video = video.flip(-1)
            if box is not None:
                box = flip_box(box)
        return video, box


def _resize(video: Tensor, height: int, width: int) -> Tensor:
    resized = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized if resized.dtype == torch.uint8 else resized.clamp_(0, 255)


def _mentions_direction(clip: ManifestClip) -> bool:
    text = " ".join(t for t in (clip.label, clip.caption, clip.verb) if t).lower().split()
    return "left" in text or "right" in text


def _probe_all(clips: list[ManifestClip], workers: int) -> tuple[list[ManifestClip], list[VideoInfo | None], list[SkippedClip]]:
    """Probe every file (threads); keep the clips whose file decodes and whose segment holds
    at least one frame."""

    def check(clip: ManifestClip) -> VideoInfo | str:
        try:
            info = probe_video(clip.video)
        except DecodeError as error:
            return error.reason
        first, stop = segment_frames(info.num_frames, info.fps, clip.start, clip.end)
        if stop <= first:
            return f"segment [{clip.start}, {clip.end}) s holds no frame (video has {info.num_frames} at {info.fps:g} fps)"
        return info

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(clips), (os.cpu_count() or 1) * 2))) as pool:
        results = list(pool.map(check, clips))
    kept: list[ManifestClip] = []
    infos: list[VideoInfo | None] = []
    skipped: list[SkippedClip] = []
    for clip, result in zip(clips, results):
        if isinstance(result, str):
            skipped.append(SkippedClip(clip.line, str(clip.video), result))
        else:
            kept.append(clip)
            infos.append(result)
    return kept, infos, skipped


def collate(items: Sequence[dict[str, Any]], mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD) -> Batch:
    """Stack dataset items into a :class:`vlmask.types.Batch`.

    ``video`` stays as the items give it (uint8 from :class:`VideoManifestDataset`);
    ``Batch.to(device)`` normalises it there, with ``mean``/``std`` when they are not ImageNet's
    (kept in ``extra["video_mean"]``/``extra["video_std"]``).

    ``action_box`` is None when no item has one (rows without one are NaN otherwise), ``label``
    None when no item has one (-1 otherwise); ``text_embedding`` stays None (the engine attaches
    cached caption embeddings by ``index``). Load-time failures inside the batch's items go to
    ``extra["load_failures"]`` as (line, video, reason) tuples.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    boxes = torch.stack([item["action_box"] for item in items])
    labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
    failures = [f for item in items for f in item.get("load_failures", [])]
    extra: dict[str, Any] = {"load_failures": failures} if failures else {}
    if tuple(mean) != IMAGENET_MEAN or tuple(std) != IMAGENET_STD:
        extra["video_mean"], extra["video_std"] = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return Batch(
        video=torch.stack([item["video"] for item in items]),
        index=torch.tensor([item["index"] for item in items], dtype=torch.long),
        action_box=None if torch.isnan(boxes).all() else boxes,
        label=None if bool((labels < 0).all()) else labels,
        caption=[item["caption"] for item in items],
        flow=torch.stack([item["flow"] for item in items]) if "flow" in items[0] else None,
        second_video=torch.stack([item["second_video"] for item in items]) if "second_video" in items[0] else None,
        second_flow=torch.stack([item["second_flow"] for item in items]) if "second_flow" in items[0] else None,
        extra=extra,
    )
