"""``vlmask show WHAT RUN_DIR [RUN_DIR ...] --out FILE``: pictures of what runs learned.

``WHAT`` is a picture kind. vlmask's own: ``curves`` (a run's ``metrics.jsonl`` against step,
and against training FLOPs where ``summary.json`` has them) and ``similarity`` (FILS Figure 4:
the cosine between every token's feature in the text space and a text). Plugins add kinds
through the hook ``vlmask_picture_kinds``; the built-in plugin adds ``masks``,
``reconstruction`` and ``attention`` (FILS Figure 3).

A clip picture is made per run: the run is reopened read-only (:func:`vlmask.runs.open_run`),
the chosen clips (``--clip N``: the N-th line of the manifest, 0-based; default 0) of its
validation manifest (``data.val``, the default data's val split, or ``--manifest``) are decoded
with the recipe's dataset in evaluation mode, and the kind returns, per clip, rows of images
(:class:`vlmask.pictures.Panel`). Several runs stand side by side under their names.
:func:`vlmask.pictures.write_picture` writes a PNG grid, or a GIF / MP4 animation, by the
suffix of ``--out``. A picture that cannot be made raises :class:`ShowError` (one line naming
the run, the clip or the file) before anything is written.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from vlmask.caches import _progress_bar
from vlmask.checkpoint import CheckpointError
from vlmask.config import RecipeError
from vlmask.data_loading import collate_of
from vlmask.evaluate import val_manifest
from vlmask.kinds import WITHOUT_TRAINING_VIEWS, LabelledDataset, ManifestLinesDataset
from vlmask.pictures import (
    STILL_SUFFIXES,
    Column,
    Panel,
    Scale,
    animation_length,
    check_suffix,
    clip_frames,
    figure_pixels,
    grid_figure,
    heat_overlay,
    slot_of_frames,
    token_map,
    write_figure,
    write_picture,
)
from vlmask.plugins import Plugins, default_plugins
from vlmask.runs import OpenRun, open_run
from vlmask.schema import build, settings, top_settings
from vlmask.step import mask_generator
from vlmask.types import Batch, Mask, TokenGrid

#: The kind drawn from ``metrics.jsonl`` alone (no checkpoint, no clips; a still picture).
CURVES = "curves"


class ShowError(Exception):
    """A picture that cannot be made; the message is one line naming what and where."""


@dataclass
class ShownClips:
    """What a clip picture kind gets: one reopened run and the clips to draw.

    ``batch`` holds the clips on the run's device, normalised (``Batch.to``), with their
    ``action_box`` where the manifest gives one; ``frames`` (B, T, H, W, 3) uint8 are the same
    clips as decoded (what pictures draw on); ``clips`` their numbers (``--clip``), ``texts``
    per clip ``--text``, else its caption, else its label (None when it has none); ``layer``
    the ``--layer`` asked for (None: the kind's default); ``mask_device`` where the run drew
    its masks; ``titles`` one per clip (its number and caption or label).
    """

    run: OpenRun
    name: str
    batch: Batch
    frames: np.ndarray
    clips: tuple[int, ...]
    texts: tuple[str | None, ...]
    layer: int | None = None
    mask_device: torch.device | None = None
    titles: tuple[str, ...] = ()

    @property
    def grid(self) -> TokenGrid:
        return self.run.parts.grid

    def frame_labels(self, frames: Sequence[int]) -> tuple[str, ...]:
        return tuple(f"frame {f}" for f in frames)

    def training_mask(self) -> Mask:
        """The run's masker on these clips, seeded as at training step 1 (:func:`mask_generator`
        of step 0, rank 0) and given a batch of ``train.batch_size`` rows (the clips, repeated),
        so row i is the mask the run's first step drew for row i of its batch."""
        recipe = self.run.recipe
        rows = max(settings(recipe, "train").batch_size, self.batch.size)
        take = torch.arange(rows, device=self.batch.video.device) % self.batch.size
        batch = _take(self.batch, take)
        device = self.mask_device or self.batch.video.device
        generator = mask_generator(top_settings(recipe).seed, step=0, rank=0, device=device)
        with torch.no_grad():
            mask = self.run.parts.masker(batch.to(device), self.grid, generator)
        return Mask(mask.visible[: self.batch.size].to(self.batch.video.device),
                    mask.predict[: self.batch.size].to(self.batch.video.device))


def _take(batch: Batch, rows: torch.Tensor) -> Batch:
    """The rows ``rows`` of a batch (tensor fields indexed, captions picked)."""

    def pick(value: Any) -> Any:
        return value[rows.to(value.device)] if isinstance(value, torch.Tensor) else value

    return replace(batch, video=pick(batch.video), index=pick(batch.index), text_embedding=pick(batch.text_embedding),
                   action_box=pick(batch.action_box), label=pick(batch.label),
                   caption=[batch.caption[int(r)] for r in rows] if batch.caption is not None else None,
                   flow=None, second_video=None, second_flow=None)


class ClipPicture(Protocol):
    """A picture kind: per shown clip, the panels (rows of images) to draw. Its docstring's
    first line is its help text."""

    def __call__(self, shown: ShownClips) -> list[list[Panel]]: ...


# --------------------------------------------------------------------------- similarity (FILS Figure 4)


def similarity(shown: ShownClips) -> list[list[Panel]]:
    """cosine of every token's feature in the text space with the clip's text, per frame (FILS Figure 4).

    Every token of the clip is encoded by the student, mapped into the text space by the
    student's projection and compared (cosine) with the text encoder's embedding of the text
    (``--text``, else the clip's caption, else its label). FILS Figure 4 uses the action label
    and smooths the maps with a Gaussian; here each token is one cell, unsmoothed. A recipe
    without a text space (``model.projection`` and ``text_encoder``) is a :class:`ShowError`.
    """
    run = shown.run
    if run.student.projection is None or run.text_encoder is None:
        raise ShowError(f"similarity: {shown.name}: recipe {recipe_name(run)} has no text space "
                        "(model.projection and text_encoder): nothing to compare tokens with")
    missing = [c for c, text in zip(shown.clips, shown.texts) if not text]
    if missing:
        raise ShowError(f"similarity: clip {missing[0]} has no caption or label; give the text with --text")
    cosine = token_text_cosine(run, shown.batch.video, [str(t) for t in shown.texts])
    frames = list(range(shown.frames.shape[1]))
    slots = slot_of_frames(frames, shown.grid)
    pictures = []
    for i, text in enumerate(shown.texts):
        values = token_map(cosine[i], shown.grid)[slots]
        scale = Scale(float(values.min()), float(values.max()), "cosine")
        images = heat_overlay(shown.frames[i], values, shown.grid, scale)
        pictures.append([Panel(f"similarity to \"{_shorten(str(text))}\"", images, shown.frame_labels(frames),
                               values=values, scale=scale)])
    return pictures


def token_text_cosine(run: OpenRun, video: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """(B, N): cosine between each token's student feature projected into the text space and
    the embedding of its clip's text (``texts``, one per clip of ``video``)."""
    grid = run.parts.grid
    index = torch.arange(grid.num_tokens, device=video.device).expand(video.shape[0], -1)
    with torch.no_grad():
        features = run.encoder(video, index)
        tokens = F.normalize(run.student.projection(features).float(), dim=-1)
        text = F.normalize(run.text_encoder.encode(list(texts)).to(tokens.device).float(), dim=-1)
    return torch.einsum("bnd,bd->bn", tokens, text)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: vlmask's own clip picture kinds (curves, the other one, draws no clips).
ENGINE_KINDS: dict[str, ClipPicture] = {"similarity": similarity}


def picture_kinds(plugins: Plugins) -> dict[str, tuple[ClipPicture, str]]:
    """Every clip picture kind: ``{WHAT: (picture, provider)}``, vlmask's own and those of the
    hook ``vlmask_picture_kinds`` (every plugin's answer). A name given twice is a ShowError
    naming both providers."""
    found: dict[str, tuple[ClipPicture, str]] = {name: (kind, "vlmask") for name, kind in ENGINE_KINDS.items()}
    for impl in plugins.manager.hook.vlmask_picture_kinds.get_hookimpls():  # one by one: each answer's provider
        for name, kind in (impl.function() or {}).items():
            if name in found or name == CURVES:
                taken = found[name][1] if name in found else "vlmask"
                raise ShowError(f"picture kind {name!r} is given by both {taken} and {impl.plugin_name}")
            found[name] = (kind, impl.plugin_name)
    return found


def summary_of(kind: Any) -> str:
    """A picture kind's help text: the first line of its docstring."""
    return ((getattr(kind, "__doc__", None) or "").strip().splitlines() or [""])[0]


# --------------------------------------------------------------------------- curves


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The logged rows of ``RUN_DIR/metrics.jsonl`` (lines that are not JSON objects skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ShowError(f"curves: {run_dir}: no metrics.jsonl (written from a run's first log step)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    if not rows:
        raise ShowError(f"curves: {path}: no logged step")
    return rows


@dataclass(frozen=True)
class Curves:
    """One run's logged values: ``rows`` of metrics.jsonl, the loss ``terms`` (config.yaml's
    ``loss_weights``) and, from summary.json, the training FLOPs of one step (None without)."""

    name: str
    rows: list[dict[str, float]]
    terms: tuple[str, ...]
    flops_per_step: float | None


def read_curves(run_dir: Path, name: str) -> Curves:
    """:class:`Curves` of a run directory; summary.json and config.yaml are optional (an
    unfinished run, a run of an older vlmask): without them no FLOPs axis, no term names."""
    rows = read_metrics(run_dir)
    terms: tuple[str, ...] = ()
    config = run_dir / "config.yaml"
    if config.is_file():
        weights = (yaml.safe_load(config.read_text()) or {}).get("loss_weights") or {}
        terms = tuple(k for k, v in weights.items() if v is not None)
    flops = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        record = json.loads(summary.read_text())
        if record.get("train_flops") and record.get("steps"):
            flops = float(record["train_flops"]) / float(record["steps"])
    return Curves(name, rows, terms, flops)


def curve_keys(curves: Sequence[Curves]) -> list[str]:
    """The logged keys that get their own plot, in first-seen order: every numeric key but
    ``step``, ``loss`` and the loss terms (drawn together)."""
    skip = {"step", "loss", *(t for c in curves for t in c.terms)}
    keys: list[str] = []
    for c in curves:
        for row in c.rows:
            keys += [k for k, v in row.items() if k not in skip and k not in keys and isinstance(v, (int, float))]
    return keys


def curves_figure(curves: Sequence[Curves]) -> object:
    """Loss and its terms against step, the loss against training FLOPs (runs whose
    summary.json gives them), then every other logged value (learning rate, diagnostics, the
    terms' statistics) against step; one colour per run."""
    from vlmask.pictures import _matplotlib

    plt, _ = _matplotlib()
    keys = curve_keys(curves)
    with_flops = [c for c in curves if c.flops_per_step]
    plots = ["loss", *(["flops"] if with_flops else []), *keys]
    columns = min(3, len(plots))
    rows = math.ceil(len(plots) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False,
                                layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, plot in zip(axes.flat, plots):
        for n, c in enumerate(curves):
            colour = colours[n % len(colours)]
            steps = [r["step"] for r in c.rows]
            if plot == "loss":
                ax.plot(steps, [r.get("loss", math.nan) for r in c.rows], color=colour, label=f"{c.name}: loss")
                for style, term in zip(("--", ":", "-.") * 4, c.terms):
                    ax.plot(steps, [r.get(term, math.nan) for r in c.rows], style, color=colour,
                            label=f"{c.name}: {term}")
            elif plot == "flops" and c.flops_per_step:
                ax.plot([s * c.flops_per_step for s in steps], [r.get("loss", math.nan) for r in c.rows], color=colour,
                        label=c.name)
            elif plot not in ("loss", "flops"):
                ax.plot(steps, [r.get(plot, math.nan) for r in c.rows], color=colour, label=c.name)
        ax.set_title({"loss": "loss and its terms", "flops": "loss against training FLOPs"}.get(plot, plot), fontsize=9)
        ax.set_xlabel("training FLOPs" if plot == "flops" else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        if plot == "loss" or len(curves) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(plots):]:
        ax.axis("off")
    return figure


def show_curves(run_dirs: Sequence[Path], out: Path) -> tuple[Path, list[str]]:
    """Write the curves of ``run_dirs`` to ``out`` (a PNG); returns it and notes for the user."""
    if check_suffix(out) not in STILL_SUFFIXES:
        raise ShowError(f"curves: {out}: curves are a still picture; write a {', '.join(STILL_SUFFIXES)}")
    curves = [read_curves(d, n) for d, n in zip(run_dirs, run_names(run_dirs))]
    notes = [f"{d}: no train_flops in summary.json; its curves are against step only"
             for d, c in zip(run_dirs, curves) if c.flops_per_step is None]
    return write_figure(curves_figure(curves), out), notes


# --------------------------------------------------------------------------- clips


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Titles of runs: each folder's name, with its parent's where two names are the same."""
    names = [Path(d).name for d in run_dirs]
    return [f"{Path(d).resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def recipe_name(run: OpenRun) -> str:
    """The recipe a run was made from (``record.recipe`` of its config.yaml, else config.yaml)."""
    return str(settings(run.recipe, "record").recipe or run.recipe.path)


def show_dataset(run: OpenRun, manifest: Path) -> Any:
    """The run's dataset plugin on ``manifest`` in evaluation mode (``train=False``: centre
    crop, no flip), without training-only views; labels stay names (no class list is read)."""
    try:
        return build(run.plugins.registry, run.recipe, "data.dataset", "dataset", manifest=str(manifest), train=False,
                     if_taken={**WITHOUT_TRAINING_VIEWS, "probe_workers": 2})
    except (ValueError, OSError) as error:
        raise ShowError(f"{manifest}: {str(error).splitlines()[0]}") from None


def dataset_row(dataset: Any, clip: int, manifest: Path) -> int:
    """The dataset row of ``--clip clip``: the clip of line ``clip + 1`` of the manifest (when
    the dataset says which line each row came from), else row ``clip``."""
    lines = [int(c.line) for c in dataset.clips] if isinstance(dataset, ManifestLinesDataset) else []
    if lines:
        if clip + 1 in lines:
            return lines.index(clip + 1)
        skipped = {s.line: s for s in dataset.skipped}
        if clip + 1 in skipped:
            raise ShowError(f"clip {clip} (line {clip + 1} of {manifest}) cannot be shown: {skipped[clip + 1].reason}")
        count = max([*lines, *skipped]) if skipped else max(lines)
        raise ShowError(f"clip {clip} is out of range: {manifest} has {count} clips (0-{count - 1})")
    if not 0 <= clip < len(dataset):
        raise ShowError(f"clip {clip} is out of range: {manifest} has {len(dataset)} clips (0-{len(dataset) - 1})")
    return clip


def load_clips(dataset: Any, rows: Sequence[int], clips: Sequence[int], manifest: Path) -> list[dict[str, Any]]:
    """The dataset items of ``rows``; a clip that does not decode (the dataset gave another
    in its place, or reported a failure) is a ShowError naming it."""
    items = []
    for row, clip in zip(rows, clips):
        item = dataset[row]
        failures = item.get("load_failures") or []
        if failures or int(item.get("index", row)) != row:
            reason = f"{failures[0][1]}: {failures[0][2]}" if failures else "the dataset gave another clip"
            raise ShowError(f"clip {clip} of {manifest} does not decode: {reason}")
        items.append(item)
    return items


def clip_texts(dataset: Any, rows: Sequence[int], text: str | None) -> tuple[str | None, ...]:
    """Per row: ``text`` when given, else the clip's caption, else its label, else None."""
    captions = list(dataset.captions or [])  # vlmask.kinds.Dataset declares them
    labels = list(dataset.labels) if isinstance(dataset, LabelledDataset) else []

    def of(row: int) -> str | None:
        if text:
            return text
        caption = captions[row] if row < len(captions) else None
        return caption or (labels[row] if row < len(labels) else None) or None

    return tuple(of(r) for r in rows)


def mask_device_of(run: OpenRun) -> tuple[torch.device, str | None]:
    """Where the run's masks were drawn (``record.device`` of config.yaml; torch generators
    differ between CPU and CUDA), and a note when that device is not available here."""
    trained = str(settings(run.recipe, "record").device or run.device.type)
    kind = trained.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu"), (f"{run.run_dir} trained on {trained}; masks are drawn on the cpu here, "
                                     "so they are not the ones its first step used")
    return (run.device if run.device.type == kind else torch.device(kind)), None


def open_for_show(run_dir: Path, overrides: Sequence[str], plugins: Plugins) -> OpenRun:
    """``open_run`` with its refusals as one-line ShowErrors."""
    try:
        return open_run(run_dir, overrides, plugins)
    except (FileNotFoundError, CheckpointError) as error:
        raise ShowError(str(error).splitlines()[0]) from None
    except RecipeError as error:
        raise ShowError(f"{run_dir}: {error.problems[0]}") from None


def show(what: str, run_dirs: Sequence[str | Path], out: str | Path, *, manifest: str | Path | None = None,
         clips: Sequence[int] | None = None, text: str | None = None, layer: int | None = None,
         overrides: Sequence[str] = (), plugins: Plugins | None = None,
         progress: bool = True) -> tuple[Path, list[str]]:
    """Draw ``what`` for ``run_dirs`` into ``out`` (``.png``, ``.gif`` or ``.mp4``); returns
    the file and notes for the user (e.g. a run without FLOPs). Raises :class:`ShowError`
    before writing anything when the picture cannot be made."""
    out = Path(out)
    run_dirs = [Path(d) for d in run_dirs]
    try:
        check_suffix(out)
    except ValueError as error:
        raise ShowError(str(error)) from None
    if not out.parent.is_dir():
        raise ShowError(f"{out}: the folder {out.parent} does not exist")
    if what == CURVES:
        return show_curves(run_dirs, out)
    progress = progress and sys.stderr.isatty()  # a bar off a terminal is only blank lines
    columns, titles, notes = clip_columns(what, run_dirs, manifest=manifest, clips=clips, text=text, layer=layer,
                                          overrides=overrides, plugins=plugins, progress=progress)
    with _progress_bar(1 if out.suffix.lower() in STILL_SUFFIXES else animation_length(columns), f"write {out.name}",
                       progress) as advance:
        write_picture(columns, titles, out, advance)
    return out, notes


def clip_columns(what: str, run_dirs: Sequence[Path], *, manifest: str | Path | None = None,
                 clips: Sequence[int] | None = None, text: str | None = None, layer: int | None = None,
                 overrides: Sequence[str] = (), plugins: Plugins | None = None,
                 progress: bool = False) -> tuple[list[Column], list[str], list[str]]:
    """The panels of the clip picture ``what`` for every run (one :class:`Column` each), the
    clips' titles and notes for the user; nothing is written."""
    plugins = plugins or default_plugins()
    kinds = picture_kinds(plugins)
    if what not in kinds:
        raise ShowError(f"unknown picture {what!r}; known: {', '.join(sorted([CURVES, *kinds]))}")
    kind = kinds[what][0]
    numbers = tuple(clips) if clips else (0,)
    columns: list[Column] = []
    notes: list[str] = []
    titles: list[str] = []
    with _progress_bar(len(run_dirs), f"show {what}", progress) as advance:
        for run_dir, name in zip(run_dirs, run_names(run_dirs)):
            shown = shown_clips(run_dir, name, numbers, manifest, text, layer, overrides, plugins, notes)
            titles = titles or list(shown.titles)
            with torch.no_grad():
                columns.append(Column(name, kind(shown)))
            advance(1)
    return columns, titles, notes


def picture_pixels(what: str, run_dir: str | Path, *, manifest: str | Path | None = None, clips: Sequence[int] = (0,),
                   plugins: Plugins | None = None, overrides: Sequence[str] = ()) -> np.ndarray:
    """The still picture ``what`` of one run, as ``vlmask show ... --out FILE.png`` draws it,
    as (H, W, 3) uint8 pixels (for loggers: TensorBoard images at checkpoints)."""
    run_dir = Path(run_dir)
    if what == CURVES:
        return figure_pixels(curves_figure([read_curves(run_dir, run_dir.name)]))
    columns, titles, _ = clip_columns(what, [run_dir], manifest=manifest, clips=clips, overrides=overrides,
                                      plugins=plugins)
    return figure_pixels(grid_figure(columns, titles))


def shown_clips(run_dir: Path, name: str, clips: Sequence[int], manifest: str | Path | None, text: str | None,
                layer: int | None, overrides: Sequence[str], plugins: Plugins, notes: list[str]) -> ShownClips:
    """Reopen ``run_dir`` and load ``clips`` of its manifest: a :class:`ShownClips`."""
    run = open_for_show(run_dir, overrides, plugins)
    path = Path(manifest) if manifest else val_manifest(run)
    if path is None:
        raise ShowError(f"{run_dir}: no validation manifest (its recipe sets data.train but no data.val); "
                        "choose clips with --manifest")
    if not path.is_file():
        raise ShowError(f"{path}: no such manifest")
    dataset = show_dataset(run, path)
    rows = [dataset_row(dataset, c, path) for c in clips]
    items = load_clips(dataset, rows, clips, path)
    batch = collate_of(dataset)(items).to(run.device)
    frames = np.stack([clip_frames(item["video"]) for item in items])
    mask_device, note = mask_device_of(run)
    if note:
        notes.append(note)
    own = clip_texts(dataset, rows, None)
    titles = tuple(f"clip {c}" + (f": {_shorten(t, 30)}" if t else "") for c, t in zip(clips, own))
    return ShownClips(run, name, batch, frames, tuple(clips), clip_texts(dataset, rows, text), layer, mask_device,
                      titles)


def comparison_attention(folder: Path, plugins: Plugins | None = None) -> tuple[Path | None, str | None]:
    """``attention.png`` beside a ``vlmask compare`` folder's ``comparison.json``: the attention
    picture (FILS Figure 3) of the first clip for the first-listed run (seed) of every recipe,
    side by side. Returns the file, or None and why it could not be drawn (a recipe whose
    encoder has no attention blocks, the built-in plugin blocked, ...); never raises for that."""
    runs: dict[str, Path] = {}
    for entry in json.loads((folder / "comparison.json").read_text()).get("runs", []):
        runs.setdefault(entry["name"], Path(entry["run_dir"]))
    if not runs:
        return None, f"{folder}: no run was trained, so no attention.png"
    try:
        path, _ = show("attention", list(runs.values()), folder / "attention.png", plugins=plugins, progress=False)
    except ShowError as error:
        return None, f"no attention.png: {error}"
    return path, None
