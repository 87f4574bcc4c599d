"""Action-area detection from motion with the camera's motion removed (MoFo's action area).

MoFo (Ahmadian, Guerin & Gilbert, "MoFo: Motion-focused self-supervision for video understanding", 2023)
finds the action area of a clip from dense optical flow: the camera's motion is removed, the
remaining motion magnitude is thresholded, and the box of the moving region, united over the
clip, is the area its masking and loss focus on. :class:`FlowActionArea` does this on the CPU
with OpenCV's DIS flow (Kroeger et al., ECCV 2016) on a few frame pairs at low resolution.

Per frame pair (a, b), a *motion map* is computed, thresholded, cleaned and boxed:

``camera`` (how the camera's motion is removed)
    ``"none"``: nothing removed (the baseline: under a pan, the whole frame moves).
    ``"dominant"``: the dominant motion of the pair, a similarity transform fitted with RANSAC
    to a grid of flow correspondences (``cv2.estimateAffinePartial2D``), is subtracted; pixels
    whose content left the frame are ignored.
    ``"boundaries"``: motion boundaries, the magnitude of the flow's spatial derivatives, which
    a camera translation leaves at zero (no explicit fit).

``evidence`` (what is thresholded)
    ``"flow"``: the magnitude of the flow with the camera's motion removed (MoFo's map), or the
    motion-boundary strength, counted only where the intensity changed (see below).
    ``"intensity"``: the intensity change between frame a and frame b warped by the fitted
    camera motion (``none``: plain frame difference).

Why ``"intensity"`` is the default (measured by ``python -m vlmask_plugins.action_area.measure``):
DIS's flow is unconstrained on textureless surfaces (flat or shaded backgrounds, the inside of
a uniformly coloured object) and its variational smoothing fills them with the motion of nearby
edges, so the flow magnitude bleeds far outside small moving objects and underestimates their
motion. The camera's motion is estimated well from the flow (RANSAC ignores those regions),
and once it is removed the intensity change marks exactly the pixels where something moved: the
object's leading and trailing edges, which a morphological closing joins. The ``"flow"``
evidence uses the same intensity test as a gate (a pixel whose intensity did not change carries
no evidence of motion, whatever the flow says there).

Thresholds are robust: ``max(floor, median + mad_k * 1.4826 * MAD)`` of each map, so a clip's
own noise level (compression, flicker) raises them above the absolute floor. After a closing,
the largest connected component of each pair (with any other at least ``component_ratio`` of
its area) gives a box; pairs whose moving area is below ``pair_ratio`` of the clip's largest
(a bounce at its apex, a pause: only compression and misregistration specks remain) are
dropped, and the union of the rest is the clip's action area. When nothing moves anywhere the whole frame (or a centre box) is returned and reported as a
fallback. Sub-pixel misregistration and 4:2:0 chroma edges are tamed by a light Gaussian blur
before differencing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from vlmask_plugins.data.decode import DECODERS, decode_clip, probe_video, segment_frames

Box = tuple[float, float, float, float]
CAMERAS: tuple[str, ...] = ("none", "dominant", "boundaries")
EVIDENCE: tuple[str, ...] = ("intensity", "flow")
PRESETS: dict[str, int] = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
FALLBACKS: tuple[str, ...] = ("frame", "centre")
#: Bumped whenever the algorithm changes what it returns for the same arguments (cache keys).
ALGORITHM_VERSION: str = "1"
_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class ActionArea:
    """A detected action area: ``box`` [x0, y0, x1, y1] in fractions of width and height
    (x1, y1 exclusive); ``fallback`` is True when no pair showed motion and ``box`` is the
    fallback box; ``moving_pairs`` of ``pairs`` analysed frame pairs contributed a box."""

    box: Box
    fallback: bool
    moving_pairs: int
    pairs: int


class _Sampled:
    """A frame sampler for ``decode_clip`` that returns fixed frame indices (clipped to the
    segment), so the pairs chosen by :meth:`FlowActionArea.pair_indices` are decoded."""

    def __init__(self, indices: np.ndarray) -> None:
        self._indices = indices

    def indices(self, first: int, stop: int, train: bool, generator: Any = None) -> np.ndarray:
        return np.clip(self._indices, first, stop - 1)


class FlowActionArea:
    """MoFo's action area (Ahmadian, Guerin & Gilbert, "MoFo: Motion-focused self-supervision for video
    understanding", 2023) from OpenCV DIS optical flow with the camera's motion removed.

    ``detect(frames)`` takes (T, H, W, 3) uint8 RGB frames; ``detect_file(path, start, end)``
    decodes ``pairs`` pairs of frames ``pair_gap`` seconds apart, spread over the segment, at a
    short side of ``size`` pixels. Every pixel argument (``blur``, ``close``, ``min_area``,
    ``ransac_px``, ``min_flow``) is in pixels of frames whose short side is ``size``
    (``detect`` resizes its input to that first). See the module docstring for ``camera`` and
    ``evidence``.
    """

    def __init__(
        self,
        camera: Literal["none", "dominant", "boundaries"] = "dominant",
        evidence: Literal["intensity", "flow"] = "intensity",
        preset: Literal["ultrafast", "fast", "medium"] = "medium",
        finest_scale: int = 0,
        pairs: int = 7,
        pair_gap: float = 0.375,
        size: int = 64,
        min_intensity: float = 25.0,
        min_flow: float = 0.3,
        min_boundary: float = 0.1,
        mad_k: float = 6.0,
        blur: float = 0.7,
        close: int = 5,
        min_area: int = 4,
        component_ratio: float = 0.5,
        pair_ratio: float = 0.2,
        ransac_px: float = 0.5,
        margin: float = 0.0,
        fallback: Literal["frame", "centre"] = "frame",
        backend: Literal["auto", "pyav", "decord", "torchcodec"] = "auto",
    ) -> None:
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
        if evidence not in EVIDENCE:
            raise ValueError(f"evidence must be one of {EVIDENCE}, got {evidence!r}")
        if camera == "boundaries" and evidence == "intensity":
            raise ValueError("evidence 'intensity' needs a camera warp: use camera 'none' or 'dominant', "
                             "or evidence 'flow' with camera 'boundaries'")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        if not 0 <= finest_scale <= 4:
            raise ValueError(f"finest_scale must be in [0, 4], got {finest_scale}")
        if pairs < 1:
            raise ValueError(f"pairs must be >= 1, got {pairs}")
        if not pair_gap > 0:
            raise ValueError(f"pair_gap must be > 0 seconds, got {pair_gap}")
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        for name, value in (("min_intensity", min_intensity), ("min_flow", min_flow),
                            ("min_boundary", min_boundary), ("mad_k", mad_k), ("blur", blur)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if close < 0:
            raise ValueError(f"close must be >= 0 pixels, got {close}")
        if min_area < 1:
            raise ValueError(f"min_area must be >= 1 pixel, got {min_area}")
        for name, value in (("component_ratio", component_ratio), ("pair_ratio", pair_ratio)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not ransac_px > 0:
            raise ValueError(f"ransac_px must be > 0, got {ransac_px}")
        if not -0.25 <= margin <= 0.25:
            raise ValueError(f"margin must be in [-0.25, 0.25] (a fraction of the frame), got {margin}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if backend not in DECODERS:
            raise ValueError(f"backend must be one of {DECODERS}, got {backend!r}")
        self.camera = camera
        self.evidence = evidence
        self.preset = preset
        self.finest_scale = finest_scale
        self.pairs = pairs
        self.pair_gap = pair_gap
        self.size = size
        self.min_intensity = min_intensity
        self.min_flow = min_flow
        self.min_boundary = min_boundary
        self.mad_k = mad_k
        self.blur = blur
        self.close = close
        self.min_area = min_area
        self.component_ratio = component_ratio
        self.pair_ratio = pair_ratio
        self.ransac_px = ransac_px
        self.margin = margin
        self.fallback = fallback
        self.backend = backend

    # ------------------------------------------------------------------ public API

    def params(self) -> dict[str, Any]:
        """The arguments that determine the output (the cache key of ``fill_boxes``)."""
        return {"detector": "flow", "version": ALGORITHM_VERSION, **{
            name: getattr(self, name) for name in (
                "camera", "evidence", "preset", "finest_scale", "pairs", "pair_gap", "size", "min_intensity",
                "min_flow", "min_boundary", "mad_k", "blur", "close", "min_area", "component_ratio", "pair_ratio",
                "ransac_px", "margin", "fallback",
            )}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k not in ("detector", "version"))
        return f"FlowActionArea({args})"

    def detect(self, frames: np.ndarray) -> Box:
        """The action box [x0, y0, x1, y1] (fractions) of (T, H, W, 3) uint8 RGB frames in
        time order; consecutive frames (after spreading ``pairs + 1`` of them over the clip,
        first and last kept) form the pairs."""
        return self.detect_area(frames).box

    def detect_area(self, frames: np.ndarray) -> ActionArea:
        """Like :meth:`detect`, with whether the fallback was used."""
        frames = _check_frames(frames)
        keep = np.unique(np.round(np.linspace(0, len(frames) - 1, min(len(frames), self.pairs + 1))).astype(int))
        picked = frames[keep]
        return self.detect_pairs(picked[:-1], picked[1:])

    def detect_file(self, path: str | Path, start: float | None = None, end: float | None = None) -> Box:
        """The action box of the segment [start, end) seconds of a video file."""
        return self.detect_file_area(path, start, end).box

    def detect_file_area(self, path: str | Path, start: float | None = None, end: float | None = None) -> ActionArea:
        """Like :meth:`detect_file`, with whether the fallback was used. Raises
        ``vlmask_plugins.data.decode.DecodeError`` for a file that does not decode."""
        info = probe_video(path, decode=False)
        first, stop = segment_frames(info.num_frames, info.fps, start, end)
        if stop <= first:
            stop = first + 1  # let decode_clip report the empty segment
        firsts, seconds = self.pair_indices(first, stop, info.fps)
        wanted = np.unique(np.concatenate([firsts, seconds]))
        frames, _ = decode_clip(path, _Sampled(wanted), train=False, short_side=self.size,  # type: ignore[arg-type]
                                start=start, end=end, decoder=self.backend, info=info)
        row = {int(index): k for k, index in enumerate(wanted)}
        return self.detect_pairs(frames[[row[int(i)] for i in firsts]], frames[[row[int(i)] for i in seconds]])

    def pair_indices(self, first: int, stop: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
        """Frame indices (first frames, second frames) of the pairs analysed in [first, stop):
        ``pairs`` anchors spread evenly so that the first pair starts at the first frame and
        the last ends at the last, each paired with the frame ``pair_gap`` seconds later."""
        length = stop - first
        if length < 2:
            return np.array([first]), np.array([first])
        gap = int(min(max(1, round(self.pair_gap * fps)), length - 1))
        anchors = np.unique(np.round(np.linspace(first, stop - 1 - gap, self.pairs)).astype(int))
        return anchors, anchors + gap

    def detect_pairs(self, firsts: np.ndarray, seconds: np.ndarray) -> ActionArea:
        """The action area from frame pairs: (P, H, W, 3) uint8 RGB first and second frames."""
        firsts, seconds = _check_frames(firsts), _check_frames(seconds)
        if firsts.shape != seconds.shape:
            raise ValueError(f"first and second frames must have the same shape, got {firsts.shape} and {seconds.shape}")
        firsts, seconds = self._resize(firsts), self._resize(seconds)
        height, width = firsts.shape[1:3]
        flow_engine = cv2.DISOpticalFlow_create(PRESETS[self.preset])
        flow_engine.setFinestScale(self.finest_scale)
        found: list[tuple[tuple[int, int, int, int], int]] = []
        for first, second in zip(firsts, seconds):
            for motion in self._pair_maps(first, second, flow_engine):
                moving = self._moving_region(motion)
                if moving is not None:
                    found.append(moving)
        if not found:
            fallback = (0.0, 0.0, 1.0, 1.0) if self.fallback == "frame" else (0.25, 0.25, 0.75, 0.75)
            return ActionArea(fallback, True, 0, len(firsts))
        largest = max(area for _, area in found)
        boxes = [box for box, area in found if area >= self.pair_ratio * largest]
        union = np.array(boxes)
        x0, y0 = int(union[:, 0].min()), int(union[:, 1].min())
        x1, y1 = int(union[:, 2].max()), int(union[:, 3].max())
        return ActionArea(self._to_fractions((x0, y0, x1, y1), width, height), False, len(boxes), len(firsts))

    # ------------------------------------------------------------------ motion maps

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        height, width = frames.shape[1:3]
        short = min(height, width)
        if short == self.size:
            return frames
        scale = self.size / short
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        return np.stack([cv2.resize(f, size, interpolation=interpolation) for f in frames])

    def _pair_maps(self, first: np.ndarray, second: np.ndarray, flow_engine: Any) -> list[np.ndarray]:
        """Thresholded motion masks (uint8 0/1) of one pair, in the first frame's coordinates
        (and, for flow evidence, also the reverse direction in the second frame's)."""
        grey_a = cv2.cvtColor(first, cv2.COLOR_RGB2GRAY)
        grey_b = cv2.cvtColor(second, cv2.COLOR_RGB2GRAY)
        smooth_a, smooth_b = self._smooth(first), self._smooth(second)
        if self.evidence == "intensity":
            warp = _IDENTITY
            if self.camera == "dominant":
                warp = dominant_motion(flow_engine.calc(grey_a, grey_b, None), self.ransac_px)
            change, valid = intensity_change(smooth_a, smooth_b, warp, self._border)
            return [self._threshold(change, valid, self.min_intensity)]
        masks = []
        for (grey_1, grey_2, smooth_1, smooth_2) in ((grey_a, grey_b, smooth_a, smooth_b),
                                                     (grey_b, grey_a, smooth_b, smooth_a)):
            flow = flow_engine.calc(grey_1, grey_2, None)
            warp = dominant_motion(flow, self.ransac_px) if self.camera == "dominant" else _IDENTITY
            if self.camera == "boundaries":
                motion, floor = motion_boundaries(flow), self.min_boundary
            else:
                motion, floor = residual_flow(flow, warp), self.min_flow
            change, valid = intensity_change(smooth_1, smooth_2, warp, self._border)
            gated = np.where(change > self.min_intensity, motion, 0.0).astype(np.float32)
            masks.append(self._threshold(gated, valid, floor))
        return masks

    @property
    def _border(self) -> float:
        """Pixels next to the edges ignored where the camera moved (blur reach plus one)."""
        return 1.0 + math.ceil(2.0 * self.blur)

    def _smooth(self, frame: np.ndarray) -> np.ndarray:
        image = frame.astype(np.float32)
        return cv2.GaussianBlur(image, (0, 0), self.blur) if self.blur > 0 else image

    def _threshold(self, motion: np.ndarray, valid: np.ndarray, floor: float) -> np.ndarray:
        values = motion[valid]
        if values.size == 0:
            return np.zeros(motion.shape, dtype=np.uint8)
        median = float(np.median(values))
        spread = 1.4826 * float(np.median(np.abs(values - median)))
        threshold = max(floor, median + self.mad_k * spread)
        return ((motion > threshold) & valid).astype(np.uint8)

    def _moving_region(self, mask: np.ndarray) -> tuple[tuple[int, int, int, int], int] | None:
        """(pixel box (x0, y0, x1, y1), x1/y1 exclusive, moving area) of one pair's mask: a
        closing joins a uniform object's leading- and trailing-edge blobs, then the largest
        connected component is kept with every component at least ``component_ratio`` of its
        area (a growing ring broken into arcs); None when the largest is below ``min_area``."""
        if self.close > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (self.close, self.close))
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if count <= 1:
            return None
        areas = stats[1:, cv2.CC_STAT_AREA]
        largest = int(areas.max())
        if largest < self.min_area:
            return None
        kept = stats[1:][areas >= self.component_ratio * largest]
        x0, y0 = int(kept[:, cv2.CC_STAT_LEFT].min()), int(kept[:, cv2.CC_STAT_TOP].min())
        x1 = int((kept[:, cv2.CC_STAT_LEFT] + kept[:, cv2.CC_STAT_WIDTH]).max())
        y1 = int((kept[:, cv2.CC_STAT_TOP] + kept[:, cv2.CC_STAT_HEIGHT]).max())
        return (x0, y0, x1, y1), int(kept[:, cv2.CC_STAT_AREA].sum())

    def _to_fractions(self, box: tuple[int, int, int, int], width: int, height: int) -> Box:
        x0, y0, x1, y1 = box
        mx, my = self.margin * width, self.margin * height
        fx0, fx1 = (x0 - mx) / width, (x1 + mx) / width
        fy0, fy1 = (y0 - my) / height, (y1 + my) / height
        if fx1 <= fx0:  # a negative margin never inverts a box: keep its centre line
            fx0 = fx1 = (x0 + x1) / 2 / width
        if fy1 <= fy0:
            fy0 = fy1 = (y0 + y1) / 2 / height
        clip = lambda v: float(min(1.0, max(0.0, v)))  # noqa: E731
        return (clip(fx0), clip(fy0), clip(fx1), clip(fy1))


# ---------------------------------------------------------------------- building blocks


def dominant_motion(flow: np.ndarray, ransac_px: float = 0.5, grid: int = 16) -> np.ndarray:
    """The dominant motion of a flow field (H, W, 2): a 2x3 similarity transform mapping a
    pixel of the first frame to the second, fitted with RANSAC to a ``grid`` x ``grid`` lattice
    of flow correspondences (identity when the fit fails)."""
    height, width = flow.shape[:2]
    step_y, step_x = max(1, height // grid), max(1, width // grid)
    ys, xs = np.mgrid[step_y // 2:height:step_y, step_x // 2:width:step_x]
    source = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    target = source + flow[ys.ravel(), xs.ravel()]
    transform, _ = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC,
                                               ransacReprojThreshold=ransac_px, maxIters=2000, confidence=0.995)
    return _IDENTITY.copy() if transform is None else transform.astype(np.float64)


def _mapped_grid(warp: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    mapped_x = warp[0, 0] * xs + warp[0, 1] * ys + warp[0, 2]
    mapped_y = warp[1, 0] * xs + warp[1, 1] * ys + warp[1, 2]
    return xs, ys, mapped_x.astype(np.float32), mapped_y.astype(np.float32)


def residual_flow(flow: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """Magnitude (H, W) of the flow minus the motion that ``warp`` predicts."""
    height, width = flow.shape[:2]
    xs, ys, mapped_x, mapped_y = _mapped_grid(warp, height, width)
    return np.hypot(flow[..., 0] - (mapped_x - xs), flow[..., 1] - (mapped_y - ys)).astype(np.float32)


def motion_boundaries(flow: np.ndarray) -> np.ndarray:
    """Motion-boundary strength (H, W): the norm of the flow's spatial Jacobian (Sobel), zero
    wherever the flow is locally constant, e.g. everywhere under a camera translation."""
    total = np.zeros(flow.shape[:2], dtype=np.float32)
    for channel in range(2):
        component = np.ascontiguousarray(flow[..., channel])
        dx = cv2.Sobel(component, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        dy = cv2.Sobel(component, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        total += dx * dx + dy * dy
    return np.sqrt(total)


def intensity_change(first: np.ndarray, second: np.ndarray, warp: np.ndarray,
                     border: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(change, valid): the largest per-channel absolute difference between ``first`` and
    ``second`` sampled where ``warp`` maps each pixel (float (H, W, C) frames), and the pixels
    whose mapped position lies inside the second frame. Along an axis on which a pixel moves
    (by a quarter pixel or more), it must also land ``border`` pixels away from the edges: there
    the blur's border padding and the codec's edge blocks differ between the two frames."""
    height, width = first.shape[:2]
    warped = cv2.warpAffine(second, warp, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    change = np.abs(first - warped.reshape(first.shape))
    change = change.max(axis=2) if change.ndim == 3 else change
    xs, ys, mapped_x, mapped_y = _mapped_grid(warp, height, width)
    margin_x = np.where(np.abs(mapped_x - xs) >= 0.25, border, 0.0) - 0.5
    margin_y = np.where(np.abs(mapped_y - ys) >= 0.25, border, 0.0) - 0.5
    valid = ((mapped_x >= margin_x) & (mapped_x <= width - 1 - margin_x)
             & (mapped_y >= margin_y) & (mapped_y <= height - 1 - margin_y))
    return change.astype(np.float32), valid


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    if frames.shape[0] < 1:
        raise ValueError("frames must hold at least one frame")
    return frames


__all__ = ["ActionArea", "FlowActionArea", "dominant_motion", "residual_flow", "motion_boundaries",
           "intensity_change", "flow_images", "CAMERAS", "EVIDENCE", "PRESETS"]


def flow_images(frames: np.ndarray, preset: str = "ultrafast", bound: float = 20.0) -> np.ndarray:
    """A clip's optical flow as images, CoCLR's flow input (Han et al., NeurIPS 2020): the same
    DIS flow (Kroeger et al., ECCV 2016) the action-area detector uses, between each frame and
    the next, (T, H, W, 3) uint8 in the frames' coordinates. Channels 0 and 1 are the x and y
    displacement clipped to ``[-bound, bound]`` pixels and mapped to [0, 255] (0 px -> 128);
    channel 2 is zero displacement (128), as CoCLR stacks x, y and a zero channel. The last
    frame, which has no next, repeats the flow of the pair before it.

    >>> still = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    >>> images = flow_images(still)
    >>> images.shape, int(images.min()), int(images.max())
    ((3, 16, 16, 3), 128, 128)
    """
    frames = _check_frames(frames)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    count, height, width = frames.shape[:3]
    images = np.full((count, height, width, 3), 128, dtype=np.uint8)
    if count < 2:
        return images
    engine = cv2.DISOpticalFlow_create(PRESETS[preset])
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    for t in range(count - 1):
        flow = engine.calc(grey[t], grey[t + 1], None)
        scaled = np.clip(flow, -bound, bound) * (127.5 / bound) + 127.5
        images[t, ..., :2] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    images[-1] = images[-2]
    return images
