"""``vlmask show masks``: what the student sees of a clip, and what ActCLIP pools of it."""

from __future__ import annotations

import numpy as np
import torch

from vlmask.pictures import Box, Panel, darken, slot_of_frames, token_cells
from vlmask.show import ShownClips
from vlmask.types import Mask, TokenGrid
from vlmask_plugins.heads.pooling import visible_tokens_inside_box


def hidden_cells(mask: Mask, row: int, grid: TokenGrid) -> np.ndarray:
    """(t, h, w) bool: the tokens of clip ``row`` that the student does not see (not in
    ``mask.visible``; for maskers whose ``predict`` is a subset of them, e.g. Turbo's, still
    every hidden token)."""
    return ~token_cells(mask.visible[row], grid)


def pooled_cells(mask: Mask, row: int, grid: TokenGrid, box: torch.Tensor) -> np.ndarray:
    """(t, h, w) bool: the visible tokens of clip ``row`` whose patch centre lies in ``box``
    (4,): the tokens ActCLIP averages (FILS eq. 3-6, :func:`visible_tokens_inside_box`)."""
    visible = mask.visible[row : row + 1]
    inside = visible_tokens_inside_box(visible, grid, box[None].to(visible.device))[0]
    return token_cells(visible[0][inside], grid)


def box_of(boxes: torch.Tensor | None, row: int) -> Box | None:
    """Clip ``row``'s action box as a tuple, or None when the batch has none for it (NaN)."""
    if boxes is None or bool(torch.isnan(boxes[row]).any()):
        return None
    x0, y0, x1, y1 = (float(v) for v in boxes[row])
    return (x0, y0, x1, y1)


def masks(shown: ShownClips) -> list[list[Panel]]:
    """the clip with the run's step-1 mask darkened, its action box and the visible tokens ActCLIP pools in it.

    The mask is the run's masker drawn as at training step 1 (``ShownClips.training_mask``:
    same seed, step and batch size), so the picture is the mask the run used for the first rows
    of its first batch. Tokens the student does not see keep a quarter of their brightness
    (:func:`vlmask.pictures.darken`); the action box (``batch.action_box``, when the manifest
    gives one) is drawn in green and the visible tokens inside it, those ActCLIP pools (FILS,
    Ahmadian et al., BMVC 2024, eq. 3-6), are outlined in yellow.
    """
    grid = shown.grid
    mask = shown.training_mask()
    frames = list(range(shown.frames.shape[1]))
    slots = slot_of_frames(frames, grid)
    masker = shown.run.recipe.get("masker.name")
    pictures = []
    for row in range(shown.batch.size):
        box = box_of(shown.batch.action_box, row)
        outlines = None
        if box is not None:
            outlines = pooled_cells(mask, row, grid, torch.tensor(box))[slots]
        hidden = hidden_cells(mask, row, grid)
        visible = mask.num_visible
        title = f"masker {masker}: {visible} of {grid.num_tokens} tokens visible ({visible / grid.num_tokens:.0%})"
        if box is not None:
            title += f"; {pooled_count(outlines, slots)} in the box"
        pictures.append([Panel(title, darken(shown.frames[row], hidden[slots], grid), shown.frame_labels(frames),
                               boxes=(box,) * len(frames) if box is not None else (), outlines=outlines)])
    return pictures


def pooled_count(outlines: np.ndarray, slots: list[int]) -> int:
    """Tokens outlined over a clip, each temporal slot counted once."""
    first = {s: i for i, s in reversed(list(enumerate(slots)))}
    return int(sum(outlines[i].sum() for i in first.values()))
