"""Pictures of clips, and how they are written: the drawing half of ``vlmask show``.

A picture kind (``vlmask.show``) turns each shown clip into :class:`Panel` s: images (the
clip's frames with something drawn into their pixels: a mask darkened, a heat map blended),
with rectangles and token outlines drawn over them and, for heat maps, the values before
colouring. :func:`write_picture` lays the panels of every run side by side and writes a PNG
grid (matplotlib, Agg) or an animated GIF / MP4 (PyAV), chosen by the file's suffix.

Everything here is pixels and geometry; nothing opens a run. Shapes: F images per panel, T
frames per clip, (t, h, w) the token grid (:class:`vlmask.types.TokenGrid`), H x W pixels.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from vlmask.types import TokenGrid

#: File suffixes :func:`write_picture` writes, and what each is.
STILL_SUFFIXES = (".png",)
ANIMATION_SUFFIXES = (".gif", ".mp4")
SUFFIXES = STILL_SUFFIXES + ANIMATION_SUFFIXES
#: Masked tokens keep this fraction of their brightness (``darken``).
DARKEN = 0.25
#: Heat maps are blended over the frame with this weight (``heat_overlay``).
HEAT_ALPHA = 0.6
#: Colours of what is drawn over the images.
BOX_COLOUR = "lime"
OUTLINE_COLOUR = "yellow"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Scale:
    """A heat map's colour scale: values ``low``..``high`` through the colormap ``cmap``."""

    low: float
    high: float
    label: str
    cmap: str = "inferno"


@dataclass(frozen=True)
class Panel:
    """One row of a picture: ``images`` (F, H, W, 3) uint8, the pixels drawn, one per shown
    frame, each titled by ``labels``.

    Drawn over the pixels (not into them): ``boxes`` (one per image, or empty; fractions
    ``[x0, y0, x1, y1]`` of width and height, None for none) and ``outlines`` (F, h, w) bool
    token cells. ``values`` (F, h, w) is what a heat map shows, before colouring (kept for
    reading back, e.g. in tests); ``scale`` its colour bar.
    """

    title: str
    images: np.ndarray
    labels: tuple[str, ...]
    boxes: tuple[Box | None, ...] = ()
    outlines: np.ndarray | None = None
    values: np.ndarray | None = None
    scale: Scale | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"panel {self.title!r}: images must be (F, H, W, 3) uint8, got {self.images.shape} "
                             f"{self.images.dtype}")
        count = self.images.shape[0]
        if len(self.labels) != count or (self.boxes and len(self.boxes) != count):
            raise ValueError(f"panel {self.title!r}: {count} images need as many labels (and boxes, if any)")
        for name in ("outlines", "values"):
            array = getattr(self, name)
            if array is not None and (array.ndim != 3 or array.shape[0] != count):
                raise ValueError(f"panel {self.title!r}: {name} must be (F={count}, h, w), got {array.shape}")


@dataclass(frozen=True)
class Column:
    """One run's panels, ``clips[c]`` those of the c-th shown clip, under the title ``title``."""

    title: str
    clips: list[list[Panel]] = field(default_factory=list)


# --------------------------------------------------------------------------- pixels and tokens


def clip_frames(video: Tensor) -> np.ndarray:
    """A uint8 clip (C, T, H, W), as datasets give it, as (T, H, W, 3) uint8 images.

    >>> clip_frames(torch.zeros(3, 2, 4, 5, dtype=torch.uint8)).shape
    (2, 4, 5, 3)
    """
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) uint8 clip, got {tuple(video.shape)} {video.dtype}")
    return video.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def token_cells(tokens: Tensor, grid: TokenGrid) -> np.ndarray:
    """(t, h, w) bool: the token indices ``tokens`` (K,) of the (t, h, w) order marked.

    >>> token_cells(torch.tensor([0, 5]), TokenGrid(t=2, h=1, w=3)).astype(int).tolist()
    [[[1, 0, 0]], [[0, 0, 1]]]
    """
    cells = np.zeros(grid.num_tokens, dtype=bool)
    cells[tokens.detach().long().cpu().numpy()] = True
    return cells.reshape(grid.t, grid.h, grid.w)


def token_map(values: Tensor, grid: TokenGrid) -> np.ndarray:
    """A value per token (N,) of the (t, h, w) order as a float64 (t, h, w) array."""
    if values.numel() != grid.num_tokens:
        raise ValueError(f"expected {grid.num_tokens} values (one per token of {grid}), got {values.numel()}")
    return values.detach().double().cpu().numpy().reshape(grid.t, grid.h, grid.w)


def slot_of_frames(frames: Sequence[int], grid: TokenGrid) -> list[int]:
    """The temporal slot (tubelet) of each frame index: ``frame // tubelet``."""
    return [int(f) // grid.tubelet for f in frames]


def ends_and_middle(num_frames: int) -> list[int]:
    """The first, middle and last frame (FILS Figure 3 shows these three), without repeats.

    >>> ends_and_middle(8), ends_and_middle(2)
    ([0, 4, 7], [0, 1])
    """
    return sorted({0, num_frames // 2, num_frames - 1})


def upsample(cells: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """Per-token-cell values (F, h, w) spread over their patch x patch pixels: (F, H, W)."""
    return cells.repeat(grid.patch, axis=1).repeat(grid.patch, axis=2)


def darken(images: np.ndarray, cells: np.ndarray, grid: TokenGrid, factor: float = DARKEN) -> np.ndarray:
    """The pixels of the marked cells (F, h, w) of ``images`` (F, H, W, 3) at ``factor`` of their
    brightness (rounded); the other pixels unchanged.

    >>> grid = TokenGrid(t=1, h=1, w=2, tubelet=1, patch=1)
    >>> darken(np.full((1, 1, 2, 3), 200, np.uint8), np.array([[[True, False]]]), grid)[0, 0, :, 0].tolist()
    [50, 200]
    """
    dark = upsample(cells, grid)[..., None]
    return np.where(dark, np.rint(images * factor), images).astype(np.uint8)


def heat_overlay(images: np.ndarray, values: np.ndarray, grid: TokenGrid, scale: Scale,
                 alpha: float = HEAT_ALPHA) -> np.ndarray:
    """``values`` (F, h, w) coloured by ``scale`` and blended over ``images`` (F, H, W, 3) with
    weight ``alpha``, each token cell one colour."""
    from matplotlib import colormaps

    span = scale.high - scale.low
    normed = np.clip((values - scale.low) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    colours = colormaps[scale.cmap](upsample(normed, grid))[..., :3] * 255.0
    return np.rint((1 - alpha) * images + alpha * colours).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- drawing


def _matplotlib() -> tuple[Any, Any]:
    """pyplot on the Agg backend (no display), and matplotlib.patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    return plt, patches


def draw_image(ax: Any, panel: Panel, index: int, title: str) -> None:
    """Image ``index`` of ``panel`` on the axes ``ax``, with its box and token outlines."""
    _, patches = _matplotlib()
    image = panel.images[index]
    ax.imshow(image, interpolation="nearest")
    height, width = image.shape[:2]
    if panel.outlines is not None:
        rows, cols = panel.outlines.shape[1:]
        cell_h, cell_w = height / rows, width / cols
        for y, x in zip(*np.nonzero(panel.outlines[index])):
            ax.add_patch(patches.Rectangle((x * cell_w - 0.5, y * cell_h - 0.5), cell_w, cell_h, fill=False,
                                           edgecolor=OUTLINE_COLOUR, linewidth=0.8))
    box = panel.boxes[index] if panel.boxes else None
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(patches.Rectangle((x0 * width - 0.5, y0 * height - 0.5), (x1 - x0) * width,
                                       (y1 - y0) * height, fill=False, edgecolor=BOX_COLOUR, linewidth=1.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def _colour_bar(figure: Any, ax: Any, scale: Scale) -> None:
    from matplotlib import cm, colors

    mappable = cm.ScalarMappable(norm=colors.Normalize(scale.low, scale.high), cmap=scale.cmap)
    bar = figure.colorbar(mappable, ax=ax, fraction=0.08, pad=0.03)
    bar.ax.tick_params(labelsize=6)
    bar.set_label(scale.label, fontsize=6)


def _rows(column: Column, clip_titles: Sequence[str]) -> list[tuple[str, Panel]]:
    """(row title, panel) for every panel of every clip of a column, in order."""
    return [(f"{title}: {panel.title}", panel) for title, panels in zip(clip_titles, column.clips) for panel in panels]


def wrap(text: str, width: int, lines: int = 2) -> str:
    """``text`` on at most ``lines`` lines of ``width`` characters (the last one shortened).

    >>> print(wrap("one two three four five", 12))
    one two
    three [...]
    """
    return textwrap.fill(text, width, max_lines=lines, placeholder=" [...]")


CELL_INCHES = 1.35
#: Characters of a 7-point title per inch of width (where titles wrap).
CHARACTERS_PER_INCH = 15


def grid_figure(columns: Sequence[Column], clip_titles: Sequence[str]) -> Any:
    """A still picture: one block per run (titled by its name), in it one row per panel of
    every clip (titled by the clip and the panel) and one column per image of the panel."""
    plt, _ = _matplotlib()
    rows = [_rows(c, clip_titles) for c in columns]
    widths = [max(p.images.shape[0] for _, p in r) + (0.5 if any(p.scale for _, p in r) else 0) for r in rows]
    height = max(len(r) for r in rows)
    size = (CELL_INCHES * sum(widths) + 0.3 * len(columns), (CELL_INCHES + 0.3) * height + 0.4)
    figure = plt.figure(figsize=size, layout="constrained")
    blocks = figure.subfigures(1, len(columns), width_ratios=widths, squeeze=False)[0]
    for block, column, column_rows, width in zip(blocks, columns, rows, widths):
        block.suptitle(column.title, fontsize=9, fontweight="bold")
        images = max(p.images.shape[0] for _, p in column_rows)
        for line, (row_title, panel) in zip(np.atleast_1d(block.subfigures(height, 1)), column_rows):
            line.suptitle(wrap(row_title, int(CELL_INCHES * width * CHARACTERS_PER_INCH)), fontsize=7)
            axes = line.subplots(1, images, squeeze=False)[0]
            for i, ax in enumerate(axes):
                if i < panel.images.shape[0]:
                    draw_image(ax, panel, i, panel.labels[i])
                else:
                    ax.axis("off")
            if panel.scale is not None:
                _colour_bar(line, list(axes[: panel.images.shape[0]]), panel.scale)
    return figure


def animation_length(columns: Sequence[Column]) -> int:
    """Frames of an animation: the most images any panel has."""
    return max(p.images.shape[0] for c in columns for panels in c.clips for p in panels)


def animation_figure(columns: Sequence[Column], clip_titles: Sequence[str], step: int, steps: int) -> Any:
    """Frame ``step`` of ``steps`` of an animation: one block per run, in it one row per clip
    and its panels side by side, each at the image ``step * F // steps`` of its F."""
    plt, _ = _matplotlib()
    width = max(max(len(panels) for panels in c.clips) for c in columns)
    clips = len(clip_titles)
    size = (CELL_INCHES * 1.3 * width * len(columns) + 0.4, CELL_INCHES * 1.3 * clips + 0.5)
    figure = plt.figure(figsize=size, layout="constrained")
    blocks = figure.subfigures(1, len(columns), squeeze=False)[0]
    for block, column in zip(blocks, columns):
        block.suptitle(column.title, fontsize=9, fontweight="bold")
        axes = block.subplots(clips, width, squeeze=False)
        for c, (clip_title, panels) in enumerate(zip(clip_titles, column.clips)):
            for p in range(width):
                ax = axes[c][p]
                if p >= len(panels):
                    ax.axis("off")
                    continue
                panel = panels[p]
                index = step * panel.images.shape[0] // steps
                title = textwrap.fill(panel.title, int(CELL_INCHES * 1.3 * CHARACTERS_PER_INCH))
                draw_image(ax, panel, index, f"{title}\n{panel.labels[index]}")
                if p == 0:
                    ax.set_ylabel(textwrap.fill(clip_title, int(CELL_INCHES * 1.3 * CHARACTERS_PER_INCH)), fontsize=7)
    return figure


def figure_pixels(figure: Any) -> np.ndarray:
    """A drawn figure's pixels (H, W, 3) uint8; the figure is closed."""
    plt, _ = _matplotlib()
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return pixels


# --------------------------------------------------------------------------- files


def check_suffix(path: Path) -> str:
    """``path``'s suffix, lower-cased; a ValueError naming the path unless it is one of
    :data:`SUFFIXES`."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown picture type {suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}")
    return suffix


def _scratch(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_figure(figure: Any, path: Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG at ``path`` atomically (a scratch file, then a rename);
    the figure is closed."""
    plt, _ = _matplotlib()
    scratch = _scratch(path)
    try:
        figure.savefig(scratch, format="png", dpi=dpi)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
        plt.close(figure)
    return path


def _even(image: np.ndarray) -> np.ndarray:
    """Pad an image to even height and width (H.264's 4:2:0 needs them) with white."""
    height, width = image.shape[:2]
    return np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), constant_values=255)


def _palette(images: Sequence[np.ndarray]) -> tuple[object, np.ndarray]:
    """One 256-colour palette for every image of a GIF (median cut over them all, with Pillow,
    matplotlib's own image library): the Pillow palette image and its (256, 4) ARGB table."""
    from PIL import Image

    sample = np.concatenate([image[::2, ::2] for image in images], axis=0)
    reference = Image.fromarray(sample).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    rgb = np.asarray(reference.getpalette()[:768], dtype=np.uint8).reshape(-1, 3)
    rgb = np.concatenate([rgb, np.zeros((256 - len(rgb), 3), np.uint8)])
    return reference, np.concatenate([np.full((256, 1), 255, np.uint8), rgb], axis=1)


def write_animation(images: Sequence[np.ndarray], path: Path, fps: int = 4) -> Path:
    """Encode ``images`` (each (H, W, 3) uint8, one size) with PyAV at ``path``: a GIF (one
    shared 256-colour palette) or an H.264 MP4 (yuv420p), by the suffix; written atomically."""
    import av
    from PIL import Image

    suffix = check_suffix(path)
    height, width = images[0].shape[:2]
    scratch = _scratch(path)
    try:
        with av.open(str(scratch), "w", format="gif" if suffix == ".gif" else "mp4") as container:
            if suffix == ".gif":
                stream = container.add_stream("gif", rate=fps)
                stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
                reference, argb = _palette(images)
                frames: Iterator[object] = (
                    av.VideoFrame.from_ndarray((np.asarray(Image.fromarray(image).quantize(
                        palette=reference, dither=Image.Dither.NONE)), argb), format="pal8") for image in images)
            else:
                images = [_even(image) for image in images]
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = images[0].shape[:2]
                stream.pix_fmt = "yuv420p"
                frames = (av.VideoFrame.from_ndarray(image, format="rgb24") for image in images)
            for frame in frames:
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return path


def write_picture(columns: Sequence[Column], clip_titles: Sequence[str], path: Path,
                  advance: Callable[[int], None] = lambda n: None, fps: int = 4) -> Path:
    """Write the panels of ``columns`` (one per run, each with one list of panels per clip of
    ``clip_titles``) at ``path``: a PNG grid (:func:`grid_figure`), or a GIF / MP4 animation
    (:func:`animation_figure` per frame; ``advance(1)`` after each)."""
    path = Path(path)
    if check_suffix(path) in STILL_SUFFIXES:
        write_figure(grid_figure(columns, clip_titles), path)
        advance(1)
        return path
    steps = animation_length(columns)
    images = []
    for step in range(steps):
        images.append(figure_pixels(animation_figure(columns, clip_titles, step, steps)))
        advance(1)
    height = max(i.shape[0] for i in images)
    width = max(i.shape[1] for i in images)
    images = [np.pad(i, ((0, height - i.shape[0]), (0, width - i.shape[1]), (0, 0)), constant_values=255)
              for i in images]
    return write_animation(images, path, fps)
