"""Filling a manifest's ``caption`` fields once per data set (``vlmask data captions``).

:func:`fill_captions` reads a JSONL manifest and writes it with ``caption`` filled for every
line lacking one (no caption, or an empty one), the offline captioning step FILS (BMVC 2024)
ran with VideoBLIP. Lines that have a caption are kept as they are; unknown fields are kept;
relative ``video`` paths are rewritten to stay correct from the output folder; bad lines
(invalid JSON, a missing file, a file that does not decode) are skipped and counted with their
line numbers, as :func:`vlmask_plugins.data.manifest.read_manifest` does. A line the captioner
gives no caption (a template field missing, a model that wrote nothing) is kept, uncaptioned,
and counted.

Pixel captioners see ``frames_per_clip`` evenly spaced frames of the clip's segment (decoded by
:func:`vlmask_plugins.data.decode.decode_clip`); clips are processed by a thread pool behind a
rich progress bar, and every caption is cached as a small JSON file per clip under
``$VLMASK_CACHE/captions``, keyed by the file's absolute path, size and mtime, the segment,
the frames decoded and the captioner's ``identity``, so a second run captions nothing. Row
captioners (``caption_row``) read the line itself: no decoding, no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmask.paths import cache_dir as default_cache_root
from vlmask_plugins.action_area.boxes import read_manifest_rows, relocate_row, run_per_clip
from vlmask_plugins.captioners.interface import DEFAULT_FRAMES_PER_CLIP
from vlmask_plugins.data.decode import DecodeError, FrameSampler, decode_clip, probe_video
from vlmask_plugins.data.manifest import ManifestClip, SkippedClip, write_manifest
from vlmask_plugins.text.cache import is_missing


@dataclass
class CaptionStats:
    """What :func:`fill_captions` did. ``lines``: non-blank lines read; ``kept``: lines that
    already had a caption; ``captioned``: captions computed now; ``cached``: captions read from
    the cache; ``uncaptioned``: lines written without a caption because the captioner gave
    none (with reasons); ``skipped``: bad lines left out (with reasons); ``written``: lines in
    the output manifest."""

    manifest_in: Path
    manifest_out: Path
    captioner: str
    lines: int = 0
    kept: int = 0
    captioned: int = 0
    cached: int = 0
    written: int = 0
    cache_dir: Path | None = None
    uncaptioned: list[SkippedClip] = field(default_factory=list)
    skipped: list[SkippedClip] = field(default_factory=list)

    def summary(self, first: int = 5) -> str:
        """One line for logs."""
        text = (f"{self.manifest_out}: {self.written} of {self.lines} lines written; captions: {self.kept} kept, "
                f"{self.captioned} written now, {self.cached} from cache, {len(self.uncaptioned)} left without; "
                f"{len(self.skipped)} skipped")
        for name, items in (("without caption", self.uncaptioned), ("skipped", self.skipped)):
            if items:
                shown = "; ".join(str(s) for s in items[:first])
                more = f"; ... {len(items) - first} more" if len(items) > first else ""
                text += f" ({name}: {shown}{more})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifest_in": str(self.manifest_in), "manifest_out": str(self.manifest_out), "captioner": self.captioner,
            "lines": self.lines, "kept": self.kept, "captioned": self.captioned, "cached": self.cached,
            "uncaptioned": len(self.uncaptioned), "skipped": len(self.skipped), "written": self.written,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
        }


def default_captions_cache() -> Path:
    """``$VLMASK_CACHE/captions`` (or ``~/.cache/vlmask/captions``)."""
    return default_cache_root() / "captions"


class CaptionCache:
    """One small JSON file per (file, segment, frames decoded, captioner identity) under ``folder``."""

    def __init__(self, folder: Path, identity: str, frames_per_clip: int, short_side: int | None) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.frames_per_clip = frames_per_clip
        self.short_side = short_side

    def key(self, clip: ManifestClip) -> dict[str, Any]:
        path = clip.video.resolve()
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "start": clip.start,
                "end": clip.end, "frames_per_clip": self.frames_per_clip, "short_side": self.short_side,
                "captioner": self.identity}

    def file(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        return self.folder / f"{digest[:40]}.json"

    def get(self, key: dict[str, Any]) -> str | None:
        try:
            entry = json.loads(self.file(key).read_text(encoding="utf-8"))
            if entry["key"] != json.loads(json.dumps(key)) or not isinstance(entry["caption"], str):
                return None  # a hash collision or a stale format
            return entry["caption"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: dict[str, Any], caption: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.file(key)
        handle, scratch = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"key": key, "caption": caption}, out)
            os.replace(scratch, target)  # atomic: a reader sees the old file or the whole new one
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)


def clip_frames(clip: ManifestClip, frames_per_clip: int, short_side: int | None = None) -> list[np.ndarray]:
    """``frames_per_clip`` evenly spaced frames of the clip's segment, (H, W, 3) uint8 RGB, the
    shorter side at ``short_side`` when that is smaller than the file's (never upscaled)."""
    info = probe_video(clip.video, decode=False)
    side = short_side if short_side is not None and short_side < min(info.width, info.height) else None
    frames, _ = decode_clip(clip.video, FrameSampler(frames_per_clip, "dynamic"), train=False, short_side=side,
                            start=clip.start, end=clip.end, info=info)
    return list(frames)


@dataclass(frozen=True)
class _Captioned:
    caption: str
    from_cache: bool


def fill_captions(
    manifest_in: str | Path,
    manifest_out: str | Path,
    captioner: Any,
    workers: int = 1,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> CaptionStats:
    """Write ``manifest_out``: every good line of ``manifest_in``, in order, with ``caption``
    filled where it was missing. Returns what was done (:class:`CaptionStats`).

    ``captioner`` has ``identity`` and either ``caption_row(row)`` (reads the line) or
    ``caption(frames)`` (reads ``frames_per_clip`` decoded frames). ``workers`` threads decode
    and caption in parallel; pixel captions are cached under ``cache_dir`` (default
    ``$VLMASK_CACHE/captions``) unless ``use_cache`` is False.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    identity = getattr(captioner, "identity", None)
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"captioner {type(captioner).__name__} has no identity string (got {identity!r})")
    by_row = callable(getattr(captioner, "caption_row", None))
    if not by_row and not callable(getattr(captioner, "caption", None)):
        raise ValueError(f"captioner {type(captioner).__name__} has neither caption(frames) nor caption_row(row)")
    frames_per_clip = getattr(captioner, "frames_per_clip", DEFAULT_FRAMES_PER_CLIP)
    short_side = getattr(captioner, "short_side", None)
    if not isinstance(frames_per_clip, int) or frames_per_clip < 1:
        raise ValueError(f"captioner frames_per_clip must be an integer >= 1, got {frames_per_clip!r}")
    if short_side is not None and (not isinstance(short_side, int) or short_side < 1):
        raise ValueError(f"captioner short_side must be None or an integer >= 1, got {short_side!r}")
    source, target = Path(manifest_in).expanduser(), Path(manifest_out).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"manifest {source} does not exist" if not source.exists() else f"manifest {source} is not a file")
    cache = None
    if use_cache and not by_row:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_captions_cache()
        cache = CaptionCache(folder, identity, frames_per_clip, short_side)
    stats = CaptionStats(source, target, identity, cache_dir=None if cache is None else cache.folder)

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
        if not is_missing(clip.caption):
            stats.kept += 1
        elif by_row:
            caption = captioner.caption_row(dict(row))
            if caption is not None and not isinstance(caption, str):
                raise TypeError(f"captioner {identity!r} caption_row returned {type(caption).__name__}, not str or None")
            _store(stats, rows[number], number, caption, "the captioner gives this row no caption "
                   "(a field it needs is missing or empty)")
            stats.captioned += not is_missing(caption)
        else:
            jobs.append(number)

    def work(number: int) -> _Captioned:
        return _caption_one(clips[number], captioner, frames_per_clip, short_side, cache)

    failed: set[int] = set()
    for number, outcome in run_per_clip(jobs, work, workers, progress, f"captions -> {target.name}"):  # type: ignore[arg-type]
        if isinstance(outcome, Exception):
            failed.add(number)
            reason = (outcome.reason if isinstance(outcome, DecodeError)
                      else f"captioning failed ({type(outcome).__name__}: {str(outcome).strip().splitlines()[0][:300]})")
            stats.skipped.append(SkippedClip(number, str(rows[number]["video"]), reason))
            continue
        assert isinstance(outcome, _Captioned)
        _store(stats, rows[number], number, outcome.caption, "the model wrote an empty caption")
        if not is_missing(outcome.caption):
            stats.cached += outcome.from_cache
            stats.captioned += not outcome.from_cache
    stats.skipped.sort(key=lambda s: s.line)
    stats.uncaptioned.sort(key=lambda s: s.line)
    out_rows = [rows[n] for n in sorted(rows) if n not in failed]
    write_manifest(target, out_rows)
    stats.written = len(out_rows)
    return stats


def _store(stats: CaptionStats, row: dict[str, Any], number: int, caption: str | None, why_not: str) -> None:
    if is_missing(caption):
        stats.uncaptioned.append(SkippedClip(number, str(row["video"]), why_not))
        return
    row["caption"] = " ".join(str(caption).split())


def _caption_one(clip: ManifestClip, captioner: Any, frames_per_clip: int, short_side: int | None,
                 cache: CaptionCache | None) -> _Captioned:
    key = cache.key(clip) if cache is not None else None
    if cache is not None and key is not None:
        hit = cache.get(key)
        if hit is not None:
            return _Captioned(hit, True)
    caption = captioner.caption(clip_frames(clip, frames_per_clip, short_side))
    if not isinstance(caption, str):
        raise TypeError(f"captioner {captioner.identity!r} returned {type(caption).__name__}, not str")
    if cache is not None and key is not None:
        cache.put(key, caption)
    return _Captioned(caption, False)
