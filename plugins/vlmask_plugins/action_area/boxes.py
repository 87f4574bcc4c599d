"""Filling a manifest's ``action_box`` fields once per data set (``vlmask data boxes``).

:func:`fill_boxes` reads a JSONL manifest, detects the action area of every clip that has no
``action_box`` (MoFo's action area, Ahmadian, Guerin & Gilbert 2023, by default through
:class:`~vlmask_plugins.action_area.flow.FlowActionArea`) and writes the manifest with the
boxes filled in. Lines that already have a box are kept as they are; unknown fields are kept;
bad lines (invalid JSON, a missing file, a file that does not decode) are skipped and counted,
as :func:`vlmask_plugins.data.manifest.read_manifest` does. Clips are processed by a thread
pool (OpenCV and the decoders release the GIL) behind a rich progress bar, and every result is
cached as a small JSON file per clip, keyed by the file's absolute path, size and mtime, the
segment and the detector's parameters, so a second run over the same data detects nothing.
The output replaces its file atomically; ``--out`` equal to the input fills the manifest in
place, keeping skipped lines as they were.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmask.hookspecs import FilledManifest
from vlmask.kinds import ActionAreaDetector
from vlmask.paths import cache_dir as default_cache_root
from vlmask_plugins.data.fill import ClipJsonCache, ManifestLine, fill_manifest, manifest_paths
from vlmask_plugins.data.manifest import ManifestClip, SkippedClip

Box = tuple[float, float, float, float]


@dataclass
class FillStats:
    """What :func:`fill_boxes` did. ``lines``: non-blank lines read; ``kept``: lines that
    already had a box; ``detected``: boxes computed now; ``cached``: boxes read from the
    cache; ``fallbacks``: boxes (detected or cached) where nothing moved and the detector
    returned its fallback; ``queued``: good lines without a box (detected, cached or failed);
    ``skipped``: bad lines left out, with reasons; ``written``: lines
    in the output manifest."""

    manifest_in: Path
    manifest_out: Path
    lines: int = 0
    kept: int = 0
    detected: int = 0
    cached: int = 0
    fallbacks: int = 0
    queued: int = 0
    written: int = 0
    cache_dir: Path | None = None
    skipped: list[SkippedClip] = field(default_factory=list)

    def summary(self, first: int = 5) -> str:
        """One line for logs."""
        text = (f"{self.manifest_out}: {self.written} of {self.lines} lines written; boxes: {self.kept} kept, "
                f"{self.detected} detected, {self.cached} from cache, {self.fallbacks} fallbacks (nothing moved); "
                f"{len(self.skipped)} skipped")
        if self.skipped and self.manifest_in.resolve() == self.manifest_out.resolve():
            text += " (kept as they were: the manifest was filled in place)"
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


def fill_boxes(
    manifest_in: str | Path,
    manifest_out: str | Path,
    detector: ActionAreaDetector,
    workers: int = 2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    use_cache: bool = True,
    keep_lines: bool = False,
) -> FillStats:
    """Write ``manifest_out``: every good line of ``manifest_in``, in order, with
    ``action_box`` detected where it was missing. Relative ``video`` paths are rewritten to stay
    correct from the output manifest's folder. Returns what was done (:class:`FillStats`).

    ``workers`` threads detect in parallel; results are cached under ``cache_dir`` (default
    ``$VLMASK_CACHE/boxes``) unless ``use_cache`` is False or the detector has no ``params()``.
    ``keep_lines``: every line keeps its number (see :func:`~vlmask_plugins.data.fill.fill_manifest`).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not isinstance(detector, ActionAreaDetector):
        raise ValueError(f"detector must have a detect_file(path, start, end) method, got {type(detector).__name__}")
    source, target = manifest_paths(manifest_in, manifest_out)
    params = _detector_params(detector) if use_cache else None
    cache = None
    if params is not None:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_boxes_cache()
        cache = ClipJsonCache(folder, {"detector": params})
    stats = FillStats(source, target, cache_dir=None if cache is None else cache.folder)

    def select(line: ManifestLine) -> bool:
        if line.clip.action_box is None:
            stats.queued += 1
            return True
        stats.kept += 1
        return False

    def store(line: ManifestLine, outcome: tuple[tuple[Box, bool], bool]) -> None:
        (box, fallback), from_cache = outcome
        line.out["action_box"] = [round(v, 6) for v in box]
        stats.cached += from_cache
        stats.detected += not from_cache
        stats.fallbacks += fallback

    fill_manifest(source, target, stats, select, lambda line: _detect_one(line.clip, detector, cache), store,
                  label="action boxes", verb="detection", workers=workers, progress=progress, keep_lines=keep_lines)
    return stats


def default_detector() -> ActionAreaDetector:
    """The detector of ``vlmask data boxes`` (``--detector flow``, default settings)."""
    from vlmask_plugins.action_area.flow import FlowActionArea

    return FlowActionArea()


def training_manifest_path(manifest: str | Path, cache_root: str | Path, detector: ActionAreaDetector) -> Path:
    """Where :func:`boxes_for_training` writes the filled copy of ``manifest``: under
    ``cache_root/boxes/manifests``, named by a digest of the manifest's bytes, its folder
    (relative ``video`` paths resolve against it) and the detector's parameters."""
    source = Path(manifest).expanduser()
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update(str(source.parent.resolve()).encode("utf-8", "surrogateescape"))
    digest.update(json.dumps(_detector_params(detector), sort_keys=True).encode("utf-8"))
    return Path(cache_root).expanduser() / "boxes" / "manifests" / f"{source.stem}-{digest.hexdigest()[:16]}.jsonl"


def boxes_for_training(manifest: str | Path, cache_root: str | Path, progress: bool = True,
                       detector: ActionAreaDetector | None = None, workers: int = 2) -> FilledManifest:
    """The built-in answer to ``vlmask_fill_requirement("action_box", ...)``: detect the boxes
    a manifest lacks before training, with the detector and settings of ``vlmask data boxes``,
    per-clip results cached in ``cache_root/boxes`` (the second run detects nothing), and the
    filled manifest written to :func:`training_manifest_path` with every line at its own number
    (so the run's skipped-line report names the source's lines). The source is not modified."""
    detector = detector if detector is not None else default_detector()
    source = Path(manifest).expanduser()
    target = training_manifest_path(source, cache_root, detector)
    stats = fill_boxes(source, target, detector, workers=workers, cache_dir=Path(cache_root).expanduser() / "boxes",
                       progress=progress, keep_lines=True)
    good = stats.kept + stats.queued
    counts = {"lines": good, "kept": stats.kept, "detected": stats.detected, "from_cache": stats.cached,
              "failed": stats.queued - stats.detected - stats.cached, "fallbacks": stats.fallbacks}
    summary = (f"boxes: {stats.kept} in the manifest, {stats.detected} detected, {stats.cached} from cache, "
               f"{counts['failed']} failed, {stats.fallbacks} fallbacks (nothing moved); cache {stats.cache_dir}; "
               f"training reads {target}")
    return FilledManifest(path=target, counts=counts, summary=summary)


def _detector_params(detector: Any) -> dict[str, Any] | None:
    method = getattr(detector, "params", None)
    if not callable(method):
        return None
    params = method()
    return json.loads(json.dumps(params, sort_keys=True))  # JSON-able, or a TypeError here


def _detect_one(clip: ManifestClip, detector: Any, cache: ClipJsonCache | None) -> tuple[tuple[Box, bool], bool]:
    """((box, fallback), whether it came from the cache)."""

    def detect() -> tuple[Box, bool]:
        area_method = getattr(detector, "detect_file_area", None)
        if callable(area_method):
            area = area_method(clip.video, clip.start, clip.end)
            box, fallback = tuple(float(v) for v in area.box), bool(area.fallback)
        else:
            box, fallback = tuple(float(v) for v in detector.detect_file(clip.video, clip.start, clip.end)), False
        if len(box) != 4:
            raise ValueError(f"the detector returned {box!r}, not [x0, y0, x1, y1]")
        return box, fallback  # type: ignore[return-value]

    if cache is None:
        return detect(), False
    return cache.get_or_compute(clip, detect, _parse_entry, lambda result: {"box": list(result[0]), "fallback": result[1]})


def _parse_entry(entry: dict[str, Any]) -> tuple[Box, bool]:
    x0, y0, x1, y1 = (float(v) for v in entry["box"])
    return (x0, y0, x1, y1), bool(entry["fallback"])
