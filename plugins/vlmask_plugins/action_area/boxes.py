"""Filling a manifest's ``action_box`` fields once per data set (``vlmask data boxes``).

:func:`fill_boxes` reads a JSONL manifest, detects the action area of every clip that has no
``action_box`` (MoFo's action area, Huang et al. 2023, by default through
:class:`~vlmask_plugins.action_area.flow.FlowActionArea`) and writes the manifest with the
boxes filled in. Lines that already have a box are kept as they are; unknown fields are kept;
bad lines (invalid JSON, a missing file, a file that does not decode) are skipped and counted,
as :func:`vlmask_plugins.data.manifest.read_manifest` does. Clips are processed by a thread
pool (OpenCV and the decoders release the GIL) behind a rich progress bar, and every result is
cached as a small JSON file per clip, keyed by the file's absolute path, size and mtime, the
segment and the detector's parameters, so a second run over the same data detects nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import cv2

from vlmask.paths import cache_dir as default_cache_root
from vlmask_plugins.data.decode import DecodeError
from vlmask_plugins.data.manifest import ManifestClip, SkippedClip, parse_line, write_manifest

Box = tuple[float, float, float, float]


@runtime_checkable
class ActionAreaDetector(Protocol):
    """What :func:`fill_boxes` needs from a detector: ``detect_file``. Optional extras:
    ``detect_file_area(path, start, end)`` returning an object with ``box`` and ``fallback``
    (fallbacks are then counted), and ``params() -> dict`` (JSON-able; without it the results
    are not cached, since nothing would tell two detectors' boxes apart)."""

    def detect_file(self, path: str | Path, start: float | None = None, end: float | None = None) -> Box: ...


@dataclass
class FillStats:
    """What :func:`fill_boxes` did. ``lines``: non-blank lines read; ``kept``: lines that
    already had a box; ``detected``: boxes computed now; ``cached``: boxes read from the
    cache; ``fallbacks``: boxes (detected or cached) where nothing moved and the detector
    returned its fallback; ``skipped``: bad lines left out, with reasons; ``written``: lines
    in the output manifest."""

    manifest_in: Path
    manifest_out: Path
    lines: int = 0
    kept: int = 0
    detected: int = 0
    cached: int = 0
    fallbacks: int = 0
    written: int = 0
    cache_dir: Path | None = None
    skipped: list[SkippedClip] = field(default_factory=list)

    def summary(self, first: int = 5) -> str:
        """One line for logs."""
        text = (f"{self.manifest_out}: {self.written} of {self.lines} lines written; boxes: {self.kept} kept, "
                f"{self.detected} detected, {self.cached} from cache, {self.fallbacks} fallbacks (nothing moved); "
                f"{len(self.skipped)} skipped")
        if self.skipped:
            shown = "; ".join(str(s) for s in self.skipped[:first])
            more = f"; ... {len(self.skipped) - first} more" if len(self.skipped) > first else ""
            text += f" ({shown}{more})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifest_in": str(self.manifest_in), "manifest_out": str(self.manifest_out), "lines": self.lines,
            "kept": self.kept, "detected": self.detected, "cached": self.cached, "fallbacks": self.fallbacks,
            "written": self.written, "skipped": len(self.skipped),
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
        }


def default_boxes_cache() -> Path:
    """``$VLMASK_CACHE/boxes`` (or ``~/.cache/vlmask/boxes``)."""
    return default_cache_root() / "boxes"


@dataclass(frozen=True)
class _Result:
    box: Box
    fallback: bool
    from_cache: bool


class BoxCache:
    """One small JSON file per (file, segment, detector parameters) under ``folder``."""

    def __init__(self, folder: Path, detector_params: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.detector_params = detector_params

    def key(self, clip: ManifestClip) -> dict[str, Any]:
        path = clip.video.resolve()
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "start": clip.start, "end": clip.end, "detector": self.detector_params}

    def _file(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        return self.folder / f"{digest[:40]}.json"

    def get(self, key: dict[str, Any]) -> tuple[Box, bool] | None:
        try:
            entry = json.loads(self._file(key).read_text(encoding="utf-8"))
            if entry["key"] != json.loads(json.dumps(key)):  # a hash collision or a stale format
                return None
            x0, y0, x1, y1 = (float(v) for v in entry["box"])
            return (x0, y0, x1, y1), bool(entry["fallback"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: dict[str, Any], box: Box, fallback: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._file(key)
        handle, scratch = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"key": key, "box": list(box), "fallback": fallback}, out)
            os.replace(scratch, target)  # atomic: a reader sees the old file or the whole new one
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)


def fill_boxes(
    manifest_in: str | Path,
    manifest_out: str | Path,
    detector: ActionAreaDetector,
    workers: int = 2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> FillStats:
    """Write ``manifest_out``: every good line of ``manifest_in``, in order, with
    ``action_box`` detected where it was missing. Relative ``video`` paths are rewritten to stay
    correct from the output manifest's folder. Returns what was done (:class:`FillStats`).

    ``workers`` threads detect in parallel; results are cached under ``cache_dir`` (default
    ``$VLMASK_CACHE/boxes``) unless ``use_cache`` is False or the detector has no ``params()``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not callable(getattr(detector, "detect_file", None)):
        raise ValueError(f"detector must have a detect_file(path, start, end) method, got {type(detector).__name__}")
    source, target = Path(manifest_in).expanduser(), Path(manifest_out).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"manifest {source} does not exist" if not source.exists() else f"manifest {source} is not a file")
    params = _detector_params(detector) if use_cache else None
    cache = None
    if params is not None:
        cache = BoxCache(Path(cache_dir).expanduser() if cache_dir is not None else default_boxes_cache(), params)
    stats = FillStats(source, target, cache_dir=None if cache is None else cache.folder)

    rows: dict[int, dict[str, Any]] = {}  # line number -> output row
    clips: dict[int, ManifestClip] = {}
    jobs: list[int] = []
    for number, row, clip, reason in read_manifest_rows(source):
        stats.lines += 1
        if reason is not None or clip is None:
            video = row.get("video") if isinstance(row, dict) and isinstance(row.get("video"), str) else None
            stats.skipped.append(SkippedClip(number, video, reason or "bad line"))
            continue
        rows[number] = relocate_row(row, clip, target.parent)
        clips[number] = clip
        if clip.action_box is None:
            jobs.append(number)
        else:
            stats.kept += 1

    def work(number: int) -> _Result:
        return _detect_one(clips[number], detector, cache)

    failed: set[int] = set()
    for number, outcome in run_per_clip(jobs, work, workers, progress, f"action boxes -> {target.name}"):
        if isinstance(outcome, Exception):
            failed.add(number)
            reason = (outcome.reason if isinstance(outcome, DecodeError)
                      else f"detection failed ({type(outcome).__name__}: {str(outcome).strip().splitlines()[0][:300]})")
            stats.skipped.append(SkippedClip(number, str(rows[number]["video"]), reason))
            continue
        rows[number]["action_box"] = [round(v, 6) for v in outcome.box]
        stats.cached += outcome.from_cache
        stats.detected += not outcome.from_cache
        stats.fallbacks += outcome.fallback
    stats.skipped.sort(key=lambda s: s.line)
    out_rows = [rows[n] for n in sorted(rows) if n not in failed]
    write_manifest(target, out_rows)
    stats.written = len(out_rows)
    return stats


def _detector_params(detector: Any) -> dict[str, Any] | None:
    method = getattr(detector, "params", None)
    if not callable(method):
        return None
    params = method()
    return json.loads(json.dumps(params, sort_keys=True))  # JSON-able, or a TypeError here


def read_manifest_rows(path: Path) -> Iterator[tuple[int, Any, ManifestClip | None, str | None]]:
    """(line number, decoded row or None, parsed clip or None, reason when bad) per non-blank line."""
    root = path.parent
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                yield number, None, None, f"invalid JSON: {error.msg} at column {error.colno}"
                continue
            try:
                yield number, row, parse_line(row, number, root), None
            except ValueError as error:
                yield number, row, None, str(error)


def relocate_row(row: dict[str, Any], clip: ManifestClip, out_root: Path) -> dict[str, Any]:
    """The row with a relative ``video`` rewritten relative to the output folder (unchanged
    when that is the input folder); every other field kept as is, unknown ones included."""
    out = dict(row)
    if not Path(str(row["video"])).expanduser().is_absolute():
        relative = os.path.relpath(clip.video.resolve(), out_root.resolve())
        if Path(relative) != Path(str(row["video"])):
            out["video"] = relative
    return out


def _detect_one(clip: ManifestClip, detector: Any, cache: BoxCache | None) -> _Result:
    key = cache.key(clip) if cache is not None else None
    if cache is not None and key is not None:
        hit = cache.get(key)
        if hit is not None:
            return _Result(hit[0], hit[1], True)
    area_method = getattr(detector, "detect_file_area", None)
    if callable(area_method):
        area = area_method(clip.video, clip.start, clip.end)
        box, fallback = tuple(float(v) for v in area.box), bool(area.fallback)
    else:
        box, fallback = tuple(float(v) for v in detector.detect_file(clip.video, clip.start, clip.end)), False
    if len(box) != 4:
        raise ValueError(f"the detector returned {box!r}, not [x0, y0, x1, y1]")
    if cache is not None and key is not None:
        cache.put(key, box, fallback)  # type: ignore[arg-type]
    return _Result(box, fallback, False)  # type: ignore[arg-type]


def run_per_clip(jobs: list[int], work: Callable[[int], _Result], workers: int, progress: bool,
         description: str) -> Iterator[tuple[int, _Result | Exception]]:
    """Results of ``work`` over ``jobs`` as they finish; a clip's decode, OpenCV or file error is
    returned (not raised) so the line can be skipped; any other exception propagates."""
    bar = _ProgressBar(len(jobs), description) if progress and jobs else None
    try:
        if workers == 1 or len(jobs) <= 1:
            for number in jobs:
                yield number, _guarded(work, number)
                if bar:
                    bar.advance()
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlmask-clips") as pool:
            futures = {pool.submit(_guarded, work, number): number for number in jobs}
            for future in as_completed(futures):
                yield futures[future], future.result()
                if bar:
                    bar.advance()
    finally:
        if bar:
            bar.close()


def _guarded(work: Callable[[int], _Result], number: int) -> _Result | Exception:
    try:
        return work(number)
    except (DecodeError, cv2.error, OSError) as error:
        return error


class _ProgressBar:
    """A rich progress bar over the clips to detect (thread-safe advance)."""

    def __init__(self, total: int, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._lock = threading.Lock()
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn())
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self) -> None:
        with self._lock:
            self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()
