"""A synthetic video-caption dataset written as real H.264 video.

Every clip shows one *acting* object (a coloured shape doing one action) on a textured
background, with one or two still distractor shapes, and in about 30% of the clips a camera
pan that translates the whole frame. The pan makes "everything that moves" differ from the
action area, so a method that uses the action box (FILS's ActCLIP, MoFo's action-area masking)
has something to gain over motion-based guesses.

Vocabulary (the label space)
    verb: one of :data:`VERBS` ("move left", "move right", "move up", "move down", "rotate",
    "grow", "shrink", "bounce"). noun: the *shape* of the acting object, one of :data:`SHAPES`
    ("square", "circle", "triangle", "cross"). The colour is not part of the noun: it appears
    in the caption (and in the ``colour`` field), so text matters beyond the class label while
    the class count stays small (31 = 8 x 4 classes, "rotate circle" is excluded because a
    spinning disc looks still). ``label`` is ``"<verb> <noun>"``, e.g. ``"move left square"``.

Manifest lines (docs/contract.md, "Data manifest") carry ``video``, ``caption``, ``verb``,
``noun``, ``label``, ``action_box`` (the union over frames of the acting object's pixel
bounding box, as fractions ``[x0, y0, x1, y1]`` with x1/y1 exclusive), and the extra fields
``camera_pan``, ``colour``, ``background`` and ``distractors``.

Each clip is a pure function of ``(seed, clip index, frames, size)``: :func:`clip_spec` draws
its parameters from ``numpy.random.default_rng([seed, index])`` and :func:`render_clip` turns
them into frames, so the same seed gives the same frames and manifests. The H.264 files
decode to the same pixels up to compression noise; their bytes have matched in repeated
generations here, but twice differed inside a full test run (on two machines, cause not
found: the colour conversion is now numpy's and x264 runs single-threaded), so nothing may
rely on byte equality. A generated set is cached and read, never regenerated, by the runs.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vlmask.paths import cache_dir as vlmask_cache_dir
from vlmask_plugins.data.manifest import write_manifest

#: Actions, as the manifest's ``verb``.
VERBS: tuple[str, ...] = ("move left", "move right", "move up", "move down", "rotate", "grow", "shrink", "bounce")
#: Shapes, as the manifest's ``noun``.
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
#: Object colours (saturated, so they stand out on the muted backgrounds).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (165, 50, 210),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
}
#: Background textures (the caption word for each).
BACKGROUNDS: dict[str, str] = {"noise": "noisy", "stripes": "striped", "gradient": "shaded", "checker": "checkered"}
#: Combinations left out because the action is invisible.
EXCLUDED: frozenset[tuple[str, str]] = frozenset({("rotate", "circle")})
#: Fraction of clips with a camera pan.
PAN_FRACTION: float = 0.3
#: Version tag of the generator; part of the built-in cache folder's name.
VERSION: str = "v2"

_VERB_PHRASES: dict[str, tuple[str, ...]] = {
    "move left": ("slides to the left", "moves left", "travels to the left", "drifts leftward", "is gliding left"),
    "move right": ("slides to the right", "moves right", "travels to the right", "drifts rightward", "is gliding right"),
    "move up": ("moves up", "rises", "floats upward", "climbs up", "is drifting upward"),
    "move down": ("moves down", "sinks", "falls downward", "drops down", "is sliding downward"),
    "rotate": ("is spinning", "rotates", "turns around in place", "spins", "is rotating"),
    "grow": ("grows", "gets bigger", "expands", "is growing larger", "swells up"),
    "shrink": ("shrinks", "gets smaller", "contracts", "is shrinking", "becomes tiny"),
    "bounce": ("bounces", "is bouncing up and down", "hops", "jumps up and down", "keeps bouncing"),
}


def classes(verbs: Sequence[str] | None = None) -> list[str]:
    """Every label the generator can produce (with only ``verbs``, when given), in a fixed order."""
    chosen = check_verbs(verbs)
    return [f"{verb} {shape}" for verb in VERBS if verb in chosen for shape in SHAPES if (verb, shape) not in EXCLUDED]


def check_verbs(verbs: Sequence[str] | None) -> tuple[str, ...]:
    """``verbs`` (a subset of :data:`VERBS`, the difficulty knob for the class count) as a tuple
    in :data:`VERBS` order; None means all of them."""
    if verbs is None:
        return VERBS
    if isinstance(verbs, str) or not verbs:
        raise ValueError(f"verbs must be a non-empty list of {VERBS}, got {verbs!r}")
    unknown = [v for v in verbs if v not in VERBS]
    if unknown:
        raise ValueError(f"verbs: unknown {unknown}; choose from {VERBS}")
    if len(set(verbs)) != len(verbs):
        raise ValueError(f"verbs: each verb at most once, got {list(verbs)}")
    return tuple(v for v in VERBS if v in verbs)


@dataclass(frozen=True)
class Distractor:
    """A still shape, fixed in the scene (it moves in the frame only when the camera pans)."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    centre: tuple[float, float]  # world pixels (x, y)
    radius: float
    angle: float


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; drawn by :func:`clip_spec`."""

    index: int
    frames: int
    size: int
    verb: str
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    background: str
    background_params: tuple[Any, ...]
    centres: tuple[tuple[float, float], ...]  # acting object centre per frame, FRAME pixels
    radii: tuple[float, ...]
    angles: tuple[float, ...]
    camera: tuple[tuple[int, int], ...]  # top-left of the view in the world, per frame
    margin: int  # world = frame size + 2 * margin on each axis
    distractors: tuple[Distractor, ...]
    caption: str

    @property
    def camera_pan(self) -> bool:
        return self.camera[0] != self.camera[-1]

    @property
    def label(self) -> str:
        return f"{self.verb} {self.shape}"


# --------------------------------------------------------------------------- shapes


def _shape_alpha(shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Coverage in [0, 1] of a shape over a (height, width) pixel grid, 2x2 supersampled."""
    height, width = size
    offsets = (0.25, 0.75)
    alpha = np.zeros((height, width), dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    cos, sin = math.cos(angle), math.sin(angle)
    for oy in offsets:
        for ox in offsets:
            dx = (xs + ox - centre[0]) / radius
            dy = (ys + oy - centre[1]) / radius
            u = cos * dx + sin * dy
            v = -sin * dx + cos * dy
            alpha += _inside(shape, u, v)
    return alpha / 4.0


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "square":
        return ((np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)).astype(np.float32)
    if shape == "circle":
        return (u * u + v * v <= 1.0).astype(np.float32)
    if shape == "triangle":  # equilateral, apex up, circumradius 1.1
        inside = v <= 0.55  # bottom edge (image y grows downward)
        for theta in (math.radians(210.0), math.radians(330.0)):
            inside &= (u * math.cos(theta) + v * math.sin(theta)) <= 0.55
        return inside.astype(np.float32)
    if shape == "cross":
        au, av_ = np.abs(u), np.abs(v)
        return (((au <= 1.0) & (av_ <= 0.33)) | ((au <= 0.33) & (av_ <= 1.0))).astype(np.float32)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


#: Half-extent of each shape in units of its radius, over any rotation (for keeping it in view).
_EXTENT: dict[str, float] = {"square": 0.8 * math.sqrt(2.0), "circle": 1.0, "triangle": 1.1, "cross": 1.06}


# --------------------------------------------------------------------------- backgrounds


def _background(kind: str, params: tuple[Any, ...], height: int, width: int) -> np.ndarray:
    """A muted textured background, (height, width, 3) float32 in [0, 255]."""
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    xs = np.arange(width, dtype=np.float32)[None, :, None]
    base_a = np.asarray(params[0], dtype=np.float32)
    base_b = np.asarray(params[1], dtype=np.float32)
    if kind == "gradient":
        angle = params[2]
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "stripes":
        angle, period = params[2], params[3]
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    elif kind == "checker":
        cell = params[2]
        t = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)
    elif kind == "noise":  # a smooth "plasma": sum of random low-frequency waves
        t = _waves(params[2], xs, ys)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        raise ValueError(f"background must be one of {tuple(BACKGROUNDS)}, got {kind!r}")
    # Fine grain on every texture, so a camera pan visibly moves flat regions too.
    amplitude, waves = params[-1]
    return base_a * (1 - t) + base_b * t + amplitude * _waves(waves, xs, ys) / len(waves)


def _waves(waves: tuple[tuple[float, float, float], ...], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    total = np.zeros((ys.shape[0], xs.shape[1], 1), dtype=np.float32)
    for fx, fy, phase in waves:
        total += np.cos(2 * math.pi * (fx * xs + fy * ys) + phase)
    return total


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = rng.uniform(70, 160)
    tint = rng.uniform(-25, 25, size=3)
    return tuple(int(np.clip(grey + d, 0, 255)) for d in tint)  # type: ignore[return-value]


def _random_waves(rng: np.random.Generator, cycles: float, size: int, count: int = 4) -> tuple[tuple[float, float, float], ...]:
    return tuple(
        (float(rng.uniform(-cycles, cycles) / size), float(rng.uniform(-cycles, cycles) / size),
         float(rng.uniform(0, 2 * math.pi)))
        for _ in range(count)
    )


def _background_params(kind: str, rng: np.random.Generator, size: int) -> tuple[Any, ...]:
    """(colour a, colour b, texture parameters..., (grain amplitude, grain waves))."""
    a, b = _muted(rng), _muted(rng)
    if kind == "gradient":
        texture: tuple[Any, ...] = (float(rng.uniform(0, 2 * math.pi)),)
    elif kind == "stripes":
        texture = (float(rng.uniform(0, math.pi)), float(rng.uniform(0.12, 0.3) * size))
    elif kind == "checker":
        texture = (float(rng.uniform(0.1, 0.2) * size),)
    else:
        texture = (_random_waves(rng, 3.0, size),)
    grain = (float(rng.uniform(20, 35)), _random_waves(rng, 10.0, size))
    return (a, b, *texture, grain)


# --------------------------------------------------------------------------- clip parameters


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(rng: np.random.Generator, verb: str, shape: str, colour: str, background: str,
             pan: bool, distractors: tuple[Distractor, ...]) -> str:
    phrase = str(rng.choice(_VERB_PHRASES[verb]))
    thing = f"{colour} {shape}"
    determiner = str(rng.choice([_article(colour), "the"]))
    templates = [
        "{D} {T} {P}",
        "{D} {T} {P} on a {B} background",
        "in this clip, {d} {T} {P}",
        "{D} {T} {P} against a {B} backdrop",
    ]
    if distractors:
        other = distractors[0]
        templates.append("{D} {T} {P} next to " + f"{_article(other.colour)} {other.colour} {other.shape}")
        templates.append("{D} {T} {P} while " + f"{_article(other.colour)} {other.colour} {other.shape} stays still")
    if pan:
        templates.append("{D} {T} {P} as the camera pans")
        templates.append("the camera pans while {d} {T} {P}")
    template = str(rng.choice(templates))
    return template.format(D=determiner.capitalize(), d=determiner, T=thing, P=phrase, B=BACKGROUNDS[background])


def clip_class(seed: int, index: int, verbs: Sequence[str] | None = None) -> str:
    """The label of clip ``index``: clips cycle through a seed-shuffled class order, so any
    ``len(classes(verbs))`` consecutive clips hold every class once."""
    labels = classes(verbs)
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(labels))
    return labels[int(order[index % len(order)])]


def check_difficulty(pan_fraction: float, distractors: int) -> None:
    """Validate the scene difficulty knobs (see :func:`clip_spec`)."""
    if not 0.0 <= pan_fraction <= 1.0:
        raise ValueError(f"pan_fraction must be in [0, 1], got {pan_fraction}")
    if isinstance(distractors, bool) or not isinstance(distractors, int) or distractors < 0:
        raise ValueError(f"distractors must be an integer >= 0, got {distractors!r}")


def clip_spec(seed: int, index: int, frames: int = 16, size: int = 64, verbs: Sequence[str] | None = None,
              pan_fraction: float = PAN_FRACTION, distractors: int = 2) -> ClipSpec:
    """Draw the parameters of clip ``index`` of the set with ``seed`` (a pure function).

    Difficulty knobs (the defaults give the standard set, clip for clip): ``verbs``, the actions
    used (fewer verbs, fewer classes); ``pan_fraction``, the share of clips with a camera pan;
    ``distractors``, the most still distractor shapes per clip (1 to that many are drawn; 0:
    none, so the only shape in view is the acting one).
    """
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    if size < 24:
        raise ValueError(f"size must be >= 24, got {size}")
    check_difficulty(pan_fraction, distractors)
    rng = np.random.default_rng([seed, index])
    label = clip_class(seed, index, verbs)
    verb = next(v for v in VERBS if label.startswith(v + " "))
    shape = label[len(verb) + 1:]
    colour = str(rng.choice(list(COLOURS)))
    jitter = rng.integers(-15, 16, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    background = str(rng.choice(list(BACKGROUNDS)))
    background_params = _background_params(background, rng, size)
    tau = np.linspace(0.0, 1.0, frames)

    base_radius = rng.uniform(0.11, 0.15) * size
    radii = np.full(frames, base_radius)
    angles = np.full(frames, rng.uniform(0, 2 * math.pi) if shape != "circle" else 0.0)
    motion = np.zeros((frames, 2))  # own displacement in the world, pixels
    if verb.startswith("move"):
        distance = rng.uniform(0.35, 0.5) * size
        direction = {"move left": (-1, 0), "move right": (1, 0), "move up": (0, -1), "move down": (0, 1)}[verb]
        motion = np.outer(tau, direction) * distance
    elif verb == "rotate":
        turn = rng.uniform(0.6, 1.0) * math.pi * rng.choice([-1.0, 1.0])
        angles = angles + turn * tau
    elif verb == "grow":
        radii = base_radius * (0.55 + 0.75 * tau)
    elif verb == "shrink":
        radii = base_radius * (1.3 - 0.75 * tau)
    elif verb == "bounce":
        height = rng.uniform(0.25, 0.35) * size
        bounces = int(rng.integers(2, 4))
        motion[:, 1] = -height * np.abs(np.sin(math.pi * bounces * tau))
    extent = radii * _EXTENT[shape] + 1.0

    # Camera: the view's top-left corner moves linearly through a larger world.
    margin = int(math.ceil(0.2 * size)) + 2
    pan = bool(rng.random() < pan_fraction)
    pan_vector = np.zeros(2)
    if pan:
        theta = rng.uniform(0, 2 * math.pi)
        pan_vector = rng.uniform(0.12, 0.3) * size * np.array([math.cos(theta), math.sin(theta)])
    for _ in range(8):  # shrink the pan until the object's path fits in the view
        camera = np.rint(margin - pan_vector / 2 + np.outer(tau, pan_vector)).astype(int)
        frame_motion = motion - (camera - camera[0])
        low = np.max(extent[:, None] - frame_motion, axis=0)
        high = np.min(size - extent[:, None] - frame_motion, axis=0)
        if np.all(low <= high):
            break
        pan_vector = pan_vector / 2
    else:  # pragma: no cover - motion ranges above always fit without a pan
        raise RuntimeError(f"clip {index}: the action does not fit in a {size}px frame")
    start = np.array([rng.uniform(low[0], high[0]), rng.uniform(low[1], high[1])])
    centres = start + frame_motion
    pan = bool(np.any(camera[0] != camera[-1]))

    # Distractors: still shapes placed in the world, away from the acting object's swept area.
    world_centres = centres + camera  # world pixels
    sweep_lo = np.min(world_centres - extent[:, None], axis=0)
    sweep_hi = np.max(world_centres + extent[:, None], axis=0)
    mid = camera[frames // 2]
    still: list[Distractor] = []
    for _ in range(int(rng.integers(1, distractors + 1)) if distractors else 0):
        for _attempt in range(30):
            radius = rng.uniform(0.08, 0.12) * size
            reach = radius * 1.15 + 1.0
            centre = rng.uniform(reach, size - reach, size=2) + mid
            apart = np.any((centre + reach < sweep_lo) | (centre - reach > sweep_hi))
            clear = all(np.hypot(*(centre - np.array(d.centre))) > reach + d.radius * 1.15 for d in still)
            if apart and clear:
                d_colour, d_shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
                if (d_colour, d_shape) == (colour, shape):  # keep "the <colour> <shape>" unambiguous
                    d_colour = next(c for c in COLOURS if c != colour)
                still.append(Distractor(
                    shape=d_shape, colour=d_colour, rgb=COLOURS[d_colour],
                    centre=(float(centre[0]), float(centre[1])), radius=float(radius),
                    angle=float(rng.uniform(0, 2 * math.pi)),
                ))
                break
    caption = _caption(rng, verb, shape, colour, background, pan, tuple(still))
    return ClipSpec(
        index=index, frames=frames, size=size, verb=verb, shape=shape, colour=colour, rgb=rgb,  # type: ignore[arg-type]
        background=background, background_params=background_params,
        centres=tuple((float(x), float(y)) for x, y in centres),
        radii=tuple(float(r) for r in radii), angles=tuple(float(a) for a in angles),
        camera=tuple((int(x), int(y)) for x, y in camera), margin=margin,
        distractors=tuple(still), caption=caption,
    )


# --------------------------------------------------------------------------- rendering


def object_masks(spec: ClipSpec) -> np.ndarray:
    """Coverage (T, H, W) in [0, 1] of the acting object in every frame (frame pixels)."""
    return np.stack([
        _shape_alpha(spec.shape, (spec.size, spec.size), spec.centres[t], spec.radii[t], spec.angles[t])
        for t in range(spec.frames)
    ])


def action_box(masks: np.ndarray) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] fractions (x1, y1 exclusive) bounding every covered pixel of (T, H, W)
    coverage masks: the union over frames of the object's bounding box."""
    covered = masks.any(axis=0)
    rows, cols = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
    height, width = covered.shape
    if not rows.size:
        raise ValueError("the object covers no pixel")
    return (cols[0] / width, rows[0] / height, (cols[-1] + 1) / width, (rows[-1] + 1) / height)


def render_clip(spec: ClipSpec) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Frames (T, H, W, 3) uint8 RGB and the action box [x0, y0, x1, y1] in fractions.

    The box is the union over frames of the pixels the acting object covers (any coverage),
    with x1 and y1 exclusive, so it bounds the object in every frame.
    """
    size, world = spec.size, spec.size + 2 * spec.margin
    scene = _background(spec.background, spec.background_params, world, world)
    for d in spec.distractors:
        alpha = _shape_alpha(d.shape, (world, world), d.centre, d.radius, d.angle)[..., None]
        scene = scene * (1 - alpha) + np.asarray(d.rgb, dtype=np.float32) * alpha
    colour = np.asarray(spec.rgb, dtype=np.float32)
    masks = object_masks(spec)
    frames = np.empty((spec.frames, size, size, 3), dtype=np.uint8)
    for t in range(spec.frames):
        cx, cy = spec.camera[t]
        view = scene[cy:cy + size, cx:cx + size]
        alpha = masks[t][..., None]
        frames[t] = np.clip(view * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)
    return frames, action_box(masks)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame as a (H * 3 / 2, W) uint8 planar YUV 4:2:0 image.

    BT.601 "limited range" (ITU-R BT.601-7, the default decoders assume for untagged SD video):
    Y in [16, 235], Cb/Cr in [16, 240], chroma from the mean RGB of each 2x2 block. Done here
    in numpy rather than by swscale so that the encoder's input, and hence the file's bytes, is
    a pure function of the frame on every CPU (swscale's SIMD paths differ between machines).
    """
    rgb = frame.astype(np.float32)
    height, width = frame.shape[:2]
    luma = 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0
    block = rgb.reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
    cb = 128.0 + (-37.797 * block[..., 0] - 74.203 * block[..., 1] + 112.0 * block[..., 2]) / 255.0
    cr = 128.0 + (112.0 * block[..., 0] - 93.786 * block[..., 1] - 18.214 * block[..., 2]) / 255.0
    planes = np.empty((height * 3 // 2, width), dtype=np.uint8)
    planes[:height] = np.clip(np.rint(luma), 0, 255)
    planes[height:].reshape(2, height // 2, width // 2)[:] = np.clip(np.rint(np.stack([cb, cr])), 0, 255)
    return planes


def write_video(path: Path, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames as H.264 (yuv420p) in an mp4 with PyAV.

    The colour conversion is :func:`rgb_to_yuv420p` and x264 runs single-threaded (see the
    module docstring on byte equality).
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(array), format="yuv420p")
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------- the data set


def manifest_row(spec: ClipSpec, video: str, box: tuple[float, float, float, float]) -> dict[str, Any]:
    """The manifest line of a rendered clip."""
    return {
        "video": video,
        "caption": spec.caption,
        "verb": spec.verb,
        "noun": spec.shape,
        "label": spec.label,
        "action_box": [round(v, 6) for v in box],
        "camera_pan": spec.camera_pan,
        "colour": spec.colour,
        "background": spec.background,
        "distractors": len(spec.distractors),
    }


def _progress(items: range, enabled: bool, description: str) -> Iterator[int]:
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import track

    # stdout is for results; the description names a user's folder, never markup
    yield from track(items, description=escape(description), console=Console(stderr=True))


def generate(
    out_dir: Path,
    clips: int = 400,
    seed: int = 0,
    frames: int = 16,
    size: int = 64,
    val_fraction: float = 0.25,
    fps: int = 8,
    progress: bool = True,
    verbs: Sequence[str] | None = None,
    pan_fraction: float = PAN_FRACTION,
    distractors: int = 2,
) -> tuple[Path, Path]:
    """Write ``videos/clip_XXXXX.mp4``, ``train.jsonl`` and ``val.jsonl`` into ``out_dir``.

    The last ``round(clips * val_fraction)`` clips form the validation split; since classes
    cycle (:func:`clip_class`), both splits hold every class when each has at least
    ``len(classes())`` clips. Returns ``(train_manifest, val_manifest)``.
    ``verbs``, ``pan_fraction`` and ``distractors`` set the difficulty (:func:`clip_spec`).
    This is what ``vlmask data synth --out DIR --clips N --seed S`` runs.
    """
    if clips < 2:
        raise ValueError(f"clips must be >= 2, got {clips}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    check_verbs(verbs)
    check_difficulty(pan_fraction, distractors)
    num_val = min(max(1, round(clips * val_fraction)), clips - 1)
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for index in _progress(range(clips), progress, f"synthetic clips -> {out_dir}"):
        spec = clip_spec(seed, index, frames, size, verbs=verbs, pan_fraction=pan_fraction, distractors=distractors)
        pixels, box = render_clip(spec)
        name = f"videos/clip_{index:05d}.mp4"
        write_video(out_dir / name, pixels, fps=fps)
        rows.append(manifest_row(spec, name, box))
    train_path, val_path = out_dir / "train.jsonl", out_dir / "val.jsonl"
    write_manifest(train_path, rows[: clips - num_val])
    write_manifest(val_path, rows[clips - num_val:])
    return train_path, val_path


def builtin_name(clips: int = 400, seed: int = 0, frames: int = 16, size: int = 64,
                 val_fraction: float = 0.25, fps: int = 8, verbs: Sequence[str] | None = None,
                 pan_fraction: float = PAN_FRACTION, distractors: int = 2) -> str:
    """The cache folder name of a built-in synthetic set with these parameters (the difficulty
    knobs appear only when they differ from the standard set's, whose name is unchanged)."""
    name = f"synthetic-{VERSION}-c{clips}-s{seed}-t{frames}-r{size}-v{val_fraction:g}-fps{fps}"
    chosen = check_verbs(verbs)
    if chosen != VERBS:
        name += "-verbs" + "".join(str(VERBS.index(v)) for v in chosen)
    if pan_fraction != PAN_FRACTION:
        name += f"-pan{pan_fraction:g}"
    if distractors != 2:
        name += f"-d{distractors}"
    return name


def ensure_builtin(
    cache_dir: Path | None = None,
    clips: int = 400,
    seed: int = 0,
    frames: int = 16,
    size: int = 64,
    val_fraction: float = 0.25,
    fps: int = 8,
    progress: bool = True,
    verbs: Sequence[str] | None = None,
    pan_fraction: float = PAN_FRACTION,
    distractors: int = 2,
) -> tuple[Path, Path]:
    """The built-in synthetic set's ``(train, val)`` manifests, generated on first use.

    Generation writes into a temporary folder beside the final one and renames it into place,
    so an interrupted run never leaves a half-written set that a later run would use; a second
    call (or a concurrent one that lost the race) just returns the existing manifests.
    """
    root = Path(cache_dir) if cache_dir is not None else vlmask_cache_dir()
    final = root / builtin_name(clips, seed, frames, size, val_fraction, fps, verbs, pan_fraction, distractors)
    train, val = final / "train.jsonl", final / "val.jsonl"
    if train.is_file() and val.is_file():
        return train, val
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        generate(scratch, clips=clips, seed=seed, frames=frames, size=size, val_fraction=val_fraction,
                 fps=fps, progress=progress, verbs=verbs, pan_fraction=pan_fraction, distractors=distractors)
        try:
            os.rename(scratch, final)
        except OSError:  # another process finished first (the target exists and is not empty)
            if not (train.is_file() and val.is_file()):
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return train, val
