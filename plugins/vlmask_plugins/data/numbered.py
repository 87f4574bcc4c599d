"""Videos whose frames show their own index: for checking that decoders pick the right frames.

Frame ``k`` is drawn as ``BITS`` vertical stripes, stripe ``b`` white when bit ``b`` of ``k``
is set and black otherwise; :func:`read_frame_numbers` reads the number back from decoded
frames at any size (each stripe's mean brightness, thresholded at half range), so lossy codecs,
colour conversion and resizing do not change it. Used by the decoding tests and
``benchmarks/decoding.py``; PyAV (its bundled FFmpeg) does the encoding.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

BITS = 16


def numbered_frame(number: int, width: int, height: int, noise: np.random.Generator | None = None) -> np.ndarray:
    """(height, width, 3) uint8 RGB showing ``number`` as BITS stripes (bit 0 leftmost); with
    ``noise``, faint texture is added (it keeps encoders from collapsing frames to nothing)."""
    if width < BITS:
        raise ValueError(f"width must be >= {BITS}, got {width}")
    columns = (np.arange(width) * BITS) // width
    bits = (number >> columns) & 1
    frame = np.broadcast_to((bits * 200 + 28).astype(np.uint8)[None, :, None], (height, width, 3)).copy()
    if noise is not None:
        frame = np.clip(frame.astype(np.int16) + noise.integers(-12, 13, frame.shape), 0, 255).astype(np.uint8)
    return frame


def read_frame_numbers(frames: np.ndarray) -> list[int]:
    """The numbers shown by (T, H, W, 3) uint8 frames drawn by :func:`numbered_frame`."""
    frames = np.asarray(frames, dtype=np.float32)
    width = frames.shape[2]
    numbers = []
    for frame in frames:
        value = 0
        for bit in range(BITS):
            lo, hi = (bit * width) // BITS, ((bit + 1) * width) // BITS
            inner = frame[:, lo + (hi - lo) // 4: hi - (hi - lo) // 4 or hi]
            if inner.mean() > 128:
                value |= 1 << bit
        numbers.append(value)
    return numbers


def write_numbered_video(
    path: str | Path,
    frames: int,
    fps: int = 10,
    width: int = 64,
    height: int = 32,
    codec: str = "h264",
    gop_seconds: float = 2.0,
    pts_seconds: Sequence[float] | None = None,
    seed: int = 0,
) -> Path:
    """Encode ``frames`` numbered frames to ``path`` (the container from its suffix).

    ``codec`` is ``h264`` (libx264, yuv420p) or ``vp9`` (libvpx-vp9, for .webm); a keyframe
    every ``gop_seconds``. ``pts_seconds`` gives each frame's presentation time (a variable
    frame rate file; times must increase), else frame ``k`` is at ``k / fps``.
    """
    import av

    path = Path(path)
    if pts_seconds is not None and len(pts_seconds) != frames:
        raise ValueError(f"pts_seconds has {len(pts_seconds)} times for {frames} frames")
    time_base = Fraction(1, 1000) if pts_seconds is not None else Fraction(1, fps)
    noise = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        if codec == "h264":
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "18", "preset": "ultrafast", "bf": "0"}
        elif codec == "vp9":
            stream = container.add_stream("libvpx-vp9", rate=fps)
            stream.options = {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:
            raise ValueError(f"codec must be 'h264' or 'vp9', got {codec!r}")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = max(1, int(round(gop_seconds * fps)))
        stream.codec_context.time_base = time_base
        if codec == "h264":
            stream.options = {**stream.options, "x264-params": f"keyint={stream.gop_size}:min-keyint={stream.gop_size}:scenecut=0"}
        for number in range(frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number, width, height, noise), format="rgb24")
            frame.time_base = time_base
            frame.pts = int(round(pts_seconds[number] / time_base)) if pts_seconds is not None else number
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
