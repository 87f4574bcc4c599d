"""Logger ``tensorboard``: scalars of every logged step as TensorBoard events in ``RUN_DIR/tensorboard``,
and, when asked, ``vlmask show`` pictures at every checkpoint."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import vlmask
from vlmask_plugins.loggers.csv_file import check_run_file


class MissingDependencyError(ImportError, ValueError):
    """An optional package a plugin needs is not installed (a ValueError too, so the engine
    reports it against the recipe key that asked for the plugin)."""


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or :class:`MissingDependencyError` naming the package."""
    try:
        import tensorboard  # noqa: F401 (optional dependency)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise MissingDependencyError(
            f"logger 'tensorboard' needs the `tensorboard` package, which is not importable here ({exc}); "
            "install it with `pip install tensorboard`, or use logger 'csv' (metrics.jsonl is always written)",
            name="tensorboard",
        ) from exc
    return SummaryWriter


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class TensorBoardLogger:
    """Writes every logged metric (``loss``, each loss term, ``lr``, ``clips_per_s``, target and
    head statistics) as a TensorBoard scalar at its step, the resolved recipe as text at the
    start, and the summary under ``summary/`` at the end (TensorBoard: Abadi et al., 2016;
    the curves of VideoMAE-style pretraining, Tong et al., NeurIPS 2022).

    Events go to ``RUN_DIR/<subdir>`` through ``torch.utils.tensorboard.SummaryWriter``, which
    needs the ``tensorboard`` package: constructing this logger without it raises an error naming
    the package. On resume, events after the checkpoint's step are purged. The writer is flushed
    at each checkpoint, so an interrupted run keeps its curves. Only rank 0 writes.

    ``pictures`` (e.g. ``[masks, attention]``): at every checkpoint, each ``vlmask show`` picture
    of the run as it is then (the checkpoint just written; the first clip of ``data.val``, else of
    ``data.train``, else of the default data's val split) as the image ``show/<picture>``; the
    training's random state is left as it was. A picture that cannot be drawn is one warning
    line, once, and never fails the run.
    """

    def __init__(self, subdir: str = "tensorboard", flush_secs: int = 30, log_config: bool = True,
                 pictures: list[str] | None = None) -> None:
        check_run_file("subdir", subdir)
        if flush_secs < 1:
            raise ValueError(f"flush_secs must be >= 1, got {flush_secs}")
        self.pictures = list(pictures or [])
        if "curves" in self.pictures:
            raise ValueError("pictures: 'curves' are the scalars this logger writes already; name clip pictures "
                             "(masks, attention, similarity, reconstruction, ...)")
        self.failed: set[str] = set()
        self.writer_class = summary_writer_class()
        self.subdir = subdir
        self.flush_secs = flush_secs
        self.log_config = log_config
        self.writer: Any = None
        self.last_step = 0

    @property
    def log_dir(self) -> Path | None:
        return Path(self.writer.log_dir) if self.writer is not None else None

    @vlmask.hookimpl
    def vlmask_train_start(self, run: Any) -> None:
        if not run.is_main:
            return
        self._open(run)
        if self.log_config and getattr(run, "recipe", None) is not None:
            from vlmask.config import to_yaml

            text = "```yaml\n" + to_yaml(run.recipe.config) + "\n```"
            self.writer.add_text("config", text, global_step=run.start_step)

    @vlmask.hookimpl
    def vlmask_step_end(self, step: int, metrics: dict[str, Any], run: Any) -> None:
        if not run.is_main:
            return
        if self.writer is None:
            self._open(run)
        for key, value in metrics.items():
            number = _scalar(value)
            if key != "step" and number is not None:
                self.writer.add_scalar(key, number, global_step=step)
        self.last_step = step

    @vlmask.hookimpl
    def vlmask_checkpoint_saved(self, step: int, run: Any) -> None:
        if run.is_main and self.writer is not None:
            self._add_pictures(step, run)
            self.writer.flush()

    def _add_pictures(self, step: int, run: Any) -> None:
        """Each of ``pictures`` of the run at its checkpoint of ``step``, as a TensorBoard image."""
        import torch

        from vlmask.show import picture_pixels

        recipe = getattr(run, "recipe", None)
        manifest = (recipe.get("data.val") or recipe.get("data.train")) if recipe is not None else None
        for what in self.pictures:
            if what in self.failed:
                continue
            try:
                with torch.random.fork_rng(devices=[]):  # the training draws what it would have drawn
                    image = picture_pixels(what, run.dir, manifest=manifest)
            except Exception as error:  # a picture must never fail a run
                self.failed.add(what)
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                print(f"warning: logger 'tensorboard': no picture {what!r} ({first}); not tried again", file=sys.stderr)
                continue
            self.writer.add_image(f"show/{what}", image, global_step=step, dataformats="HWC")

    @vlmask.hookimpl
    def vlmask_train_end(self, summary: dict[str, Any], run: Any) -> None:
        if not run.is_main or self.writer is None:
            return
        step = int(summary.get("steps") or self.last_step)
        for key, value in summary.items():
            number = _scalar(value)
            if number is not None:
                self.writer.add_scalar(f"summary/{key}", number, global_step=step)
        self.writer.close()
        self.writer = None

    def _open(self, run: Any) -> None:
        start = int(getattr(run, "start_step", 0))
        self.writer = self.writer_class(
            log_dir=str(Path(run.dir) / self.subdir),
            flush_secs=self.flush_secs,
            purge_step=start + 1 if start > 0 else None,
        )
