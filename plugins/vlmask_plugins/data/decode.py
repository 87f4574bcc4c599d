"""Decoding a clip to N frames at a reduced size (decord, with a PyAV fallback).

Two lessons shape this module. AVION (Zhao & Kraehenbuehl, CVPR 2023): CPU decoding is the
bottleneck of video pretraining, so decode straight to the size the augmentation needs (a short
side at the resize target) instead of full resolution and resizing afterwards. The issue
trackers of decord-based loaders: one corrupt file must not crash (or hang) a run, so every
failure becomes a :class:`DecodeError` naming the file and the reason, and files are checked
once, up front, with PyAV (:func:`probe_video`) rather than on the hot path.

Frame sampling follows VideoMAE (Tong et al., NeurIPS 2022) and FILS (BMVC 2024):
``dynamic`` spreads the N frames evenly over the whole segment (the stride adapts to its
length; a random phase in training, centred in evaluation); ``fixed`` takes every ``stride``-th
frame from a random start in training (centred in evaluation), repeating the last frame when
the segment is shorter than the span (VideoMAE's loader does the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Backend = Literal["auto", "decord", "pyav"]
BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav")
SAMPLINGS: tuple[str, ...] = ("dynamic", "fixed")


class DecodeError(RuntimeError):
    """A file that cannot be decoded: ``path`` and a human-readable ``reason``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # survive pickling out of DataLoader workers
        return (DecodeError, (self.path, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """What a probe learns about a file: frame count (exact or estimated from the duration),
    frames per second, and the coded size in pixels."""

    num_frames: int
    fps: float
    width: int
    height: int


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class FrameSampler:
    """Which frames of a segment to decode (see the module docstring for the two rules).

    >>> FrameSampler(4, "dynamic").indices(0, 16, train=False).tolist()
    [2, 6, 10, 14]
    >>> FrameSampler(4, "fixed", stride=2).indices(0, 16, train=False).tolist()
    [4, 6, 8, 10]
    """

    num_frames: int
    sampling: str = "dynamic"
    stride: int = 4

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")

    def indices(self, first: int, stop: int, train: bool, generator: torch.Generator | None = None) -> np.ndarray:
        """Frame indices in [first, stop), ascending (repeats when the segment is short)."""
        length = stop - first
        if length < 1:
            raise ValueError(f"empty segment [{first}, {stop})")
        steps = np.arange(self.num_frames)
        if self.sampling == "dynamic":
            step = length / self.num_frames
            phase = float(torch.rand((), generator=generator)) * step if train else step / 2
            offsets = np.floor(phase + steps * step).astype(np.int64)
        else:
            span = (self.num_frames - 1) * self.stride + 1
            start = 0
            if length > span:
                room = length - span
                start = int(torch.randint(0, room + 1, (), generator=generator)) if train else room // 2
            offsets = start + steps * self.stride
        return first + np.clip(offsets, 0, length - 1)


def segment_frames(num_frames: int, fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """The frames [first, stop) of a file showing the time segment [start, end) seconds
    (frame k is shown at k / fps)."""
    first = 0 if start is None else math.ceil(start * fps - 1e-6)
    stop = num_frames if end is None else min(num_frames, math.ceil(end * fps - 1e-6))
    return max(first, 0), stop


def short_side_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``short_side``, aspect kept (even sizes
    are not required); the original size when ``short_side`` is None."""
    if short_side is None:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


# --------------------------------------------------------------------------- probing (validation time only)


def probe_video(path: str | Path, decode: bool = True, full_decode_below: int = 64) -> VideoInfo:
    """Open ``path`` with PyAV and read its video stream's header. With ``decode``, also decode
    frames: all of them when the header says there are at most ``full_decode_below``, else the
    first two and two about two seconds before the end (catches truncated files and streams the
    decoder rejects after the first frame). Raises DecodeError.

    Used when a manifest is validated (dataset construction, ``vlmask data``), never per item:
    PyAV fails cleanly on broken files where decord has been seen to hang.
    """
    import av

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DecodeError(path, f"cannot stat file: {error.strerror or error}") from None
    if size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except Exception as error:  # av.error.* (InvalidDataError, ...) or OSError
        raise DecodeError(path, f"not a readable video container ({type(error).__name__}: {_first_line(error)})") from None
    try:
        if not container.streams.video:
            raise DecodeError(path, "no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise DecodeError(path, f"video stream has no frame size ({width}x{height})")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not fps or not math.isfinite(fps):
            raise DecodeError(path, "video stream has no frame rate")
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:  # no frame count in the header: estimate it from the duration
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            num_frames = int(round(duration * fps)) if duration else 0
        if decode:
            if num_frames <= full_decode_below:
                decoded = _decode_some(container, stream, path, limit=None)
                num_frames = decoded if num_frames <= 0 else num_frames
            else:
                _decode_some(container, stream, path, limit=2)
                _check_end(path, max(0.0, num_frames / fps - 2.0))
        if num_frames <= 0:
            raise DecodeError(path, "video stream has no frames")
        return VideoInfo(num_frames, fps, width, height)
    finally:
        container.close()


def _check_end(path: Path, seconds: float) -> None:
    """Decode two frames after seeking near the end. A container that refuses the seek itself
    (some RealMedia indexes) is tried at half the time, then given the benefit of the doubt;
    a decoder error after a successful seek is a DecodeError."""
    import av

    for target in (seconds, seconds / 2):
        # A fresh container: some decoders (RealVideo) refuse to resume after an earlier decode.
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0]
            try:
                container.seek((stream.start_time or 0) + int(target / stream.time_base),
                               stream=stream, backward=True, any_frame=False)
            except Exception:
                continue
            _decode_some(container, stream, path, limit=2, where=f"frames near the end ({target:.1f} s; truncated?)")
            return


def _decode_some(container: Any, stream: Any, path: Path, limit: int | None, where: str = "the first frames") -> int:
    """Decode up to ``limit`` frames (all with None) from the container's current position;
    returns how many decoded (at least one, else DecodeError)."""
    count = 0
    try:
        for _frame in container.decode(stream):
            count += 1
            if limit is not None and count >= limit:
                break
    except Exception as error:
        raise DecodeError(path, f"cannot decode {where} ({type(error).__name__}: {_first_line(error)})") from None
    if count == 0:
        raise DecodeError(path, f"no decodable frame among {where}")
    return count


# --------------------------------------------------------------------------- decoding (hot path)


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


def decode_clip(
    path: str | Path,
    sampler: FrameSampler,
    train: bool = False,
    short_side: int | None = None,
    start: float | None = None,
    end: float | None = None,
    backend: str = "auto",
    info: VideoInfo | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``sampler.num_frames`` frames of the segment [start, end) of ``path``.

    Returns (frames (T, H, W, 3) uint8 RGB with the shorter side at ``short_side``, the frame
    indices used). ``backend="auto"`` tries decord and falls back to PyAV when decord is not
    importable or fails on the file. ``info`` (from :func:`probe_video`) saves reading the
    header again. Raises DecodeError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    if info is None:
        info = probe_video(path, decode=False)
    width, height = short_side_size(info.width, info.height, short_side)
    errors: list[str] = []
    if backend in ("auto", "decord") and (backend == "decord" or decord_available()):
        try:
            return _decode_decord(path, sampler, train, width, height, start, end, generator)
        except DecodeError as error:
            if backend == "decord":
                raise
            errors.append(f"decord: {error.reason}")
    try:
        return _decode_pyav(path, sampler, train, width, height, start, end, info, generator)
    except DecodeError as error:
        errors.append(f"pyav: {error.reason}")
        raise DecodeError(path, "; ".join(errors)) from None


#: Output sizes decord 0.6 cannot resize to (its copy fails with "The size must exactly match",
#: e.g. width 48 or 24); learnt per process, then decoded at full size and resized in torch.
_DECORD_BAD_SIZES: set[tuple[int, int]] = set()


def _decode_decord(
    path: Path, sampler: FrameSampler, train: bool, width: int, height: int,
    start: float | None, end: float | None, generator: torch.Generator | None,
) -> tuple[np.ndarray, np.ndarray]:
    try:
        import decord
    except Exception as error:
        raise DecodeError(path, f"decord is not importable ({error})") from None

    def open_reader(w: int, h: int) -> Any:
        try:
            return decord.VideoReader(str(path), width=w, height=h, num_threads=1)
        except Exception as error:
            raise DecodeError(path, f"cannot open ({type(error).__name__}: {_first_line(error)})") from None

    resize_in_decord = (width, height) not in _DECORD_BAD_SIZES
    reader = open_reader(width, height) if resize_in_decord else open_reader(-1, -1)
    count, fps = len(reader), float(reader.get_avg_fps())
    if count <= 0:
        raise DecodeError(path, "no frames")
    first, stop = segment_frames(count, fps, start, end)
    if stop <= first:
        raise DecodeError(path, f"segment [{start}, {end}) s holds no frame of {count} at {fps:g} fps")
    indices = sampler.indices(first, stop, train, generator)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as error:
        if not (resize_in_decord and "size must exactly match" in str(error)):
            raise DecodeError(path, f"cannot decode frames ({type(error).__name__}: {_first_line(error)})") from None
        _DECORD_BAD_SIZES.add((width, height))
        reader = open_reader(-1, -1)
        resize_in_decord = False
        try:
            frames = reader.get_batch(indices.tolist()).asnumpy()
        except Exception as error:
            raise DecodeError(path, f"cannot decode frames ({type(error).__name__}: {_first_line(error)})") from None
    if frames.shape[0] != len(indices) or frames.ndim != 4:
        raise DecodeError(path, f"decoded {frames.shape} for {len(indices)} frames")
    if frames.shape[1:3] != (height, width):
        frames = resize_frames(frames, width, height)
    return frames, indices


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 frames (bilinear, antialiased), in torch."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    video = torch.nn.functional.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return video.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _decode_pyav(
    path: Path, sampler: FrameSampler, train: bool, width: int, height: int,
    start: float | None, end: float | None, info: VideoInfo, generator: torch.Generator | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sequential decode from the first frame up to the last needed one (simple and exact;
    slower than decord's seeking on long files, which is why it is the fallback)."""
    import av

    first, stop = segment_frames(info.num_frames, info.fps, start, end)
    if stop <= first:
        raise DecodeError(path, f"segment [{start}, {end}) s holds no frame of {info.num_frames} at {info.fps:g} fps")
    indices = sampler.indices(first, stop, train, generator)
    wanted = set(indices.tolist())
    last_wanted = int(indices.max())
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0]
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted:
                    got[number] = frame.to_ndarray(width=width, height=height, format="rgb24")
                if number >= last_wanted:
                    break
    except Exception as error:
        raise DecodeError(path, f"{type(error).__name__}: {_first_line(error)}") from None
    if not got:
        raise DecodeError(path, "no decodable frame in the segment")
    # A file shorter than its header says: repeat the last frame decoded before each index.
    known = sorted(got)
    out = []
    for index in indices.tolist():
        if index in got:
            out.append(got[index])
        else:
            earlier = [k for k in known if k <= index]
            out.append(got[earlier[-1]] if earlier else got[known[0]])
    return np.stack(out), indices


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
