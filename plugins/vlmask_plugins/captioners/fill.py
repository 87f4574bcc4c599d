"""Filling a manifest's ``caption`` fields once per data set (``vlmask data captions``).

:func:`fill_captions` reads a JSONL manifest and writes it with ``caption`` filled for every
line lacking one (no caption, or an empty one), the offline captioning step FILS (BMVC 2024)
ran with VideoBLIP. Lines that have a caption are kept as they are; unknown fields are kept;
relative ``video`` paths are rewritten to stay correct from the output folder; bad lines
(invalid JSON, a missing file, a file that does not decode) are skipped and counted with their
line numbers, as :func:`vlmask_plugins.data.manifest.read_manifest` does. A line the captioner
gives no caption (a template field missing, a model that wrote nothing) is kept, uncaptioned,
and counted. The output replaces its file atomically; ``--out`` equal to the input fills the
manifest in place, keeping skipped lines as they were.

Pixel captioners see ``frames_per_clip`` evenly spaced frames of the clip's segment (decoded by
:func:`vlmask_plugins.data.decode.decode_clip`); clips are processed by a thread pool behind a
rich progress bar, and every caption is cached as a small JSON file per clip under
``$VLMASK_CACHE/captions``, keyed by the file's absolute path, size and mtime, the segment,
the frames decoded and the captioner's ``identity``, so a second run captions nothing. Row
captioners (``caption_row``) read the line itself: no decoding, no cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmask.kinds import Captioner, RowCaptioner
from vlmask.paths import cache_dir as default_cache_root
from vlmask_plugins.captioners.interface import DEFAULT_FRAMES_PER_CLIP
from vlmask_plugins.data.decode import FrameSampler, decode_clip, probe_video
from vlmask_plugins.data.fill import ClipJsonCache, ManifestLine, fill_manifest, manifest_paths
from vlmask_plugins.data.manifest import ManifestClip, SkippedClip
from vlmask.caches import is_missing


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
        if self.skipped and self.manifest_in.resolve() == self.manifest_out.resolve():
            text += " (kept as they were: the manifest was filled in place)"
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


def clip_frames(clip: ManifestClip, frames_per_clip: int, short_side: int | None = None) -> list[np.ndarray]:
    """``frames_per_clip`` evenly spaced frames of the clip's segment, (H, W, 3) uint8 RGB, the
    shorter side at ``short_side`` when that is smaller than the file's (never upscaled)."""
    info = probe_video(clip.video, decode=False)
    side = short_side if short_side is not None and short_side < min(info.width, info.height) else None
    frames, _ = decode_clip(clip.video, FrameSampler(frames_per_clip, "dynamic"), train=False, short_side=side,
                            start=clip.start, end=clip.end, info=info)
    return list(frames)


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
    by_row = isinstance(captioner, RowCaptioner)
    if not by_row and not isinstance(captioner, Captioner):
        raise ValueError(f"captioner {type(captioner).__name__} has neither caption(frames) nor caption_row(row)")
    frames_per_clip = getattr(captioner, "frames_per_clip", DEFAULT_FRAMES_PER_CLIP)
    short_side = getattr(captioner, "short_side", None)
    if not isinstance(frames_per_clip, int) or frames_per_clip < 1:
        raise ValueError(f"captioner frames_per_clip must be an integer >= 1, got {frames_per_clip!r}")
    if short_side is not None and (not isinstance(short_side, int) or short_side < 1):
        raise ValueError(f"captioner short_side must be None or an integer >= 1, got {short_side!r}")
    source, target = manifest_paths(manifest_in, manifest_out)
    cache = None
    if use_cache and not by_row:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_captions_cache()
        cache = ClipJsonCache(folder, {"frames_per_clip": frames_per_clip, "short_side": short_side, "captioner": identity})
    stats = CaptionStats(source, target, identity, cache_dir=None if cache is None else cache.folder)

    def select(line: ManifestLine) -> bool:
        if not is_missing(line.clip.caption):
            stats.kept += 1
            return False
        if not by_row:
            return True
        caption = captioner.caption_row(dict(line.row))
        if caption is not None and not isinstance(caption, str):
            raise TypeError(f"captioner {identity!r} caption_row returned {type(caption).__name__}, not str or None")
        _store(stats, line, caption, "the captioner gives this row no caption (a field it needs is missing or empty)")
        stats.captioned += not is_missing(caption)
        return False

    def store(line: ManifestLine, outcome: tuple[str, bool]) -> None:
        caption, from_cache = outcome
        _store(stats, line, caption, "the model wrote an empty caption")
        if not is_missing(caption):
            stats.cached += from_cache
            stats.captioned += not from_cache

    def work(line: ManifestLine) -> tuple[str, bool]:
        return _caption_one(line.clip, captioner, frames_per_clip, short_side, cache)

    fill_manifest(source, target, stats, select, work, store, label="captions", verb="captioning",
                  workers=workers, progress=progress)
    stats.uncaptioned.sort(key=lambda s: s.line)
    return stats


def _store(stats: CaptionStats, line: ManifestLine, caption: str | None, why_not: str) -> None:
    if is_missing(caption):
        stats.uncaptioned.append(SkippedClip(line.number, str(line.out["video"]), why_not))
        return
    line.out["caption"] = " ".join(str(caption).split())


def _caption_one(clip: ManifestClip, captioner: Any, frames_per_clip: int, short_side: int | None,
                 cache: ClipJsonCache | None) -> tuple[str, bool]:
    """(caption, whether it came from the cache)."""

    def caption() -> str:
        text = captioner.caption(clip_frames(clip, frames_per_clip, short_side))
        if not isinstance(text, str):
            raise TypeError(f"captioner {captioner.identity!r} returned {type(text).__name__}, not str")
        return text

    if cache is None:
        return caption(), False
    return cache.get_or_compute(clip, caption, _parse_entry, lambda text: {"caption": text})


def _parse_entry(entry: dict[str, Any]) -> str | None:
    return entry["caption"] if isinstance(entry["caption"], str) else None
