"""What the once-per-data-set manifest fillers share (``vlmask data boxes``, ``vlmask data captions``).

A filler reads a JSONL manifest line by line (:func:`read_manifest_rows`), skips and counts bad
lines (invalid JSON, a missing file, a file that does not decode) as
:func:`vlmask_plugins.data.manifest.read_manifest` does, rewrites relative ``video`` paths to
stay correct from the output folder (:func:`relocate_row`), runs a per-clip job in a thread pool
behind a rich progress bar (:func:`run_per_clip`; OpenCV and the decoders release the GIL),
records the clips whose job failed as skipped, and writes the output manifest in input order.
:func:`fill_manifest` is that driver; the producer (MoFo's action area, Ahmadian, Guerin & Gilbert 2023; the
offline captions of FILS, BMVC 2024) gives it callbacks. :class:`ClipJsonCache` keeps one small
JSON file per clip, keyed by the file's absolute path, size and mtime, the segment and the
producer's parameters, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, TypeVar

import cv2

from vlmask_plugins.data.decode import DecodeError
from vlmask_plugins.data.manifest import ManifestClip, SkippedClip, read_manifest_rows, write_manifest, write_text_atomic

T = TypeVar("T")


class FillCounts(Protocol):
    """The counters :func:`fill_manifest` updates on a filler's stats object."""

    lines: int
    written: int
    skipped: list[SkippedClip]


@dataclass
class ManifestLine:
    """A good manifest line: its 1-based ``number``, the ``row`` as read, the ``out`` row to write
    (relative ``video`` relocated; fill it in place) and the parsed ``clip``."""

    number: int
    row: dict[str, Any]
    out: dict[str, Any]
    clip: ManifestClip


def manifest_paths(manifest_in: str | Path, manifest_out: str | Path) -> tuple[Path, Path]:
    """The input and output manifests, ``~`` expanded; FileNotFoundError when the input is not a file."""
    source, target = Path(manifest_in).expanduser(), Path(manifest_out).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"manifest {source} does not exist" if not source.exists() else f"manifest {source} is not a file")
    return source, target


def fill_manifest(
    source: Path,
    target: Path,
    stats: FillCounts,
    select: Callable[[ManifestLine], bool],
    work: Callable[[ManifestLine], T],
    store: Callable[[ManifestLine, T], None],
    label: str,
    verb: str,
    workers: int,
    progress: bool,
    keep_lines: bool = False,
) -> None:
    """Write ``target``: every good line of ``source``, in order, filled by the callbacks.

    ``select(line)`` is called per good line in reading order: True queues the line for
    ``work(line)``, run by ``workers`` threads behind a progress bar labelled
    ``"{label} -> {target.name}"``; False means the line is done (kept as it is, or filled on the
    spot). ``store(line, result)`` fills ``line.out`` from a result, in completion order. A line
    whose work raised a decode, OpenCV or file error is skipped with its reason (the
    :class:`DecodeError`'s, else "``{verb}`` failed (...)"); any other exception propagates. Updates
    ``stats.lines``, ``stats.skipped`` (sorted by line) and ``stats.written``.

    The output is written beside ``target`` and renamed over it (atomic). When ``target`` is
    ``source`` itself (``--out`` equal to the input), nothing of the source is lost: skipped and
    blank lines stay where they were, byte for byte, and only good lines are rewritten, so the line
    numbers do not move either. Otherwise the output holds the good lines only, unless
    ``keep_lines``: then every line keeps its number too (what a training run reads, so that its
    skipped-line report names the source's line numbers): good lines filled, lines whose work
    failed as read (relocated, unfilled), bad lines as they were with a relative ``video`` made
    absolute (so the reason names the right file), blank lines blank.
    """
    in_place = target.exists() and os.path.samefile(source, target)
    lines: dict[int, ManifestLine] = {}
    jobs: list[int] = []
    for number, row, clip, reason in read_manifest_rows(source):
        stats.lines += 1
        if reason is not None or clip is None:
            video = row.get("video") if isinstance(row, dict) and isinstance(row.get("video"), str) else None
            stats.skipped.append(SkippedClip(number, video, reason or "bad line"))
            continue
        line = lines[number] = ManifestLine(number, row, relocate_row(row, clip, target.parent), clip)
        if select(line):
            jobs.append(number)

    failed: set[int] = set()
    for number, outcome in run_per_clip(jobs, lambda n: work(lines[n]), workers, progress, f"{label} -> {target.name}"):
        if isinstance(outcome, Exception):
            failed.add(number)
            reason = (outcome.reason if isinstance(outcome, DecodeError)
                      else f"{verb} failed ({type(outcome).__name__}: {str(outcome).strip().splitlines()[0][:300]})")
            stats.skipped.append(SkippedClip(number, str(lines[number].out["video"]), reason))
            continue
        store(lines[number], outcome)
    stats.skipped.sort(key=lambda s: s.line)
    out_rows = [lines[n].out for n in sorted(lines) if n not in failed]
    if in_place:  # every line of the source stays: filled where good, as it was where skipped (or blank)
        with source.open("r", encoding="utf-8-sig", errors="surrogateescape") as handle:
            raw = list(handle)
        text = "".join(json.dumps(lines[n].out) + "\n" if n in lines and n not in failed
                       else (line if line.endswith("\n") else line + "\n")
                       for n, line in enumerate(raw, start=1))
        write_text_atomic(target, text)
    elif keep_lines:  # every line at its number: filled, unfilled where the work failed, bad lines re-anchored
        with source.open("r", encoding="utf-8-sig", errors="surrogateescape") as handle:
            raw = list(handle)
        text = "".join(json.dumps(lines[n].out) + "\n" if n in lines else _anchored(line, source.parent)
                       for n, line in enumerate(raw, start=1))
        write_text_atomic(target, text)
    else:
        write_manifest(target, out_rows)
    stats.written = len(out_rows)


def _anchored(line: str, root: Path) -> str:
    """A bad line, unchanged but for a relative ``video`` made absolute against ``root``."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        row = None
    if isinstance(row, dict) and isinstance(row.get("video"), str) and row["video"].strip():
        video = Path(row["video"]).expanduser()
        if not video.is_absolute():
            return json.dumps({**row, "video": str((root / video).absolute())}) + "\n"
    return line if line.endswith("\n") else line + "\n"


def relocate_row(row: dict[str, Any], clip: ManifestClip, out_root: Path) -> dict[str, Any]:
    """The row with a relative ``video`` rewritten relative to the output folder (unchanged
    when that is the input folder); every other field kept as is, unknown ones included."""
    out = dict(row)
    if not Path(str(row["video"])).expanduser().is_absolute():
        relative = os.path.relpath(clip.video.resolve(), out_root.resolve())
        if Path(relative) != Path(str(row["video"])):
            out["video"] = relative
    return out


class ClipJsonCache:
    """One small JSON file per (file, segment, producer ``params``) under ``folder``: the entry
    is ``{"key": key, **fields}``, written atomically; a key is the file's absolute path, size,
    mtime and the clip's segment, plus ``params`` (JSON-able)."""

    def __init__(self, folder: Path, params: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.params = params

    def key(self, clip: ManifestClip) -> dict[str, Any]:
        path = clip.video.resolve()
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "start": clip.start, "end": clip.end, **self.params}

    def file(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        return self.folder / f"{digest[:40]}.json"

    def get(self, key: dict[str, Any], parse: Callable[[dict[str, Any]], T | None]) -> T | None:
        """``parse(entry)`` of the stored entry; None when there is none, it is unreadable, its key
        differs (a hash collision or a stale format) or ``parse`` rejects it (None, or a
        ValueError, KeyError or TypeError)."""
        try:
            entry = json.loads(self.file(key).read_text(encoding="utf-8"))
            if entry["key"] != json.loads(json.dumps(key)):
                return None
            return parse(entry)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: dict[str, Any], fields: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.file(key)
        handle, scratch = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"key": key, **fields}, out)
            os.replace(scratch, target)  # atomic: a reader sees the old file or the whole new one
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)

    def get_or_compute(self, clip: ManifestClip, compute: Callable[[], T], parse: Callable[[dict[str, Any]], T | None],
                       dump: Callable[[T], dict[str, Any]]) -> tuple[T, bool]:
        """(value, whether it came from the cache): the cached value of ``clip``, else ``compute()``,
        stored as ``dump(value)`` under the key taken before computing."""
        key = self.key(clip)
        hit = self.get(key, parse)
        if hit is not None:
            return hit, True
        value = compute()
        self.put(key, dump(value))
        return value, False


def run_per_clip(jobs: list[int], work: Callable[[int], T], workers: int, progress: bool,
                 description: str) -> Iterator[tuple[int, T | Exception]]:
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


def _guarded(work: Callable[[int], T], number: int) -> T | Exception:
    try:
        return work(number)
    except (DecodeError, cv2.error, OSError) as error:
        return error


class _ProgressBar:
    """A rich progress bar over the clips to process (thread-safe advance)."""

    def __init__(self, total: int, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._lock = threading.Lock()
        self._progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn())
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self) -> None:
        with self._lock:
            self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()
