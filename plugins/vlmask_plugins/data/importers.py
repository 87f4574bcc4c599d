"""``vlmask data import``: contract manifests from datasets' own annotation files.

Formats (the official files, read as they are distributed):

``epic-kitchens-100``
    ``EPIC_100_train.csv`` / ``EPIC_100_validation.csv`` (Damen et al., "Rescaling Egocentric
    Vision", IJCV 2022): one action segment per row with ``narration_id, participant_id,
    video_id, narration_timestamp, start_timestamp, stop_timestamp`` (``HH:MM:SS.ff``),
    ``start_frame, stop_frame, narration, verb, verb_class, noun, noun_class, all_nouns,
    all_noun_classes``. Videos at ``<videos>/P01/videos/P01_01.MP4`` (also ``.mp4``, or
    ``<videos>/P01/P01_01.MP4``). A line gets ``start``/``end`` in seconds, ``verb``, ``noun``,
    ``label`` = ``"<verb> <noun>"``, ``caption`` = the narration, and keeps ``narration_id``,
    ``participant_id``, ``video_id``, ``verb_class``, ``noun_class`` (unknown fields are kept and
    ignored by readers). The test split's file (no verb/noun) imports without labels.
``ssv2``
    ``something-something-v2-train.json`` / ``-validation.json`` (Goyal et al., ICCV 2017): a
    JSON list of ``{"id", "label", "template", "placeholders"}``; videos ``<videos>/<id>.webm``.
    The class is the template with its brackets dropped (``"Putting [something] on a surface"``
    -> ``"Putting something on a surface"``: the 174-class protocol); the caption is the
    filled-in ``label``.
``kinetics``
    ``train.csv`` / ``validate.csv`` / ``test.csv`` (Kay et al., 2017) with ``label, youtube_id,
    time_start, time_end, split``; files named ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4``
    as the common downloaders write them (already trimmed: no start/end), looked for directly
    under ``<videos>``, under a class sub-folder (the label as written, or with ``_`` for spaces)
    and under a split folder; ``.mp4``, ``.mkv`` or ``.webm``. ``label`` and ``caption`` are the
    class name.
``folders``
    ``<videos>/<class>/<clip>.<ext>``: one sub-folder per class, ``label`` = folder name,
    ``caption`` = folder name with ``_`` read as a space.

A line that cannot be written (a missing video, a bad timestamp, an empty segment, a missing
value, a value that is not what its column holds, such as a class ``'²'`` or a time ``inf``) is
dropped, counted and named in the :class:`ImportReport`; never fatal, and never written half
(a labelled file's line without its label or caption is dropped, not written bare). A repeated
entry (EPIC ``narration_id``, SSv2 ``id``, Kinetics clip, one video reached from two class
folders) is written once, at its first place; every later one is dropped as ``duplicate``,
naming that first place. A file that is not in its format at all (unparseable JSON, nested too
deeply, a CSV without the required columns) raises :class:`AnnotationError`, one line naming
the file and line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from vlmask_plugins.data.manifest import JSONValueError, decode_json, write_manifest, write_text_atomic

FORMATS: tuple[str, ...] = ("epic-kitchens-100", "ssv2", "kinetics", "folders")
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}


class AnnotationError(ValueError):
    """An annotation file not in its format (the message is one line: file, line, problem)."""


@dataclass(frozen=True)
class DroppedLine:
    """One annotation entry that was not written: where (file and line, or entry) and why."""

    where: str
    reason: str
    kind: str  # short category for the counts: "missing file", "bad timestamp", ...

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class ImportReport:
    """What an import did: ``written`` manifest lines in ``out``, and every dropped entry."""

    format: str
    out: Path
    written: int = 0
    dropped: list[DroppedLine] = field(default_factory=list)

    @property
    def dropped_counts(self) -> dict[str, int]:
        return dict(Counter(d.kind for d in self.dropped).most_common())

    def summary(self, first: int = 10) -> str:
        lines = [f"{self.format}: wrote {self.written} lines to {self.out}; dropped {len(self.dropped)}"
                 + (" (" + ", ".join(f"{kind}: {n}" for kind, n in self.dropped_counts.items()) + ")" if self.dropped else "")]
        lines += [f"  {d}" for d in self.dropped[:first]]
        if len(self.dropped) > first:
            lines.append(f"  ... and {len(self.dropped) - first} more")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "out": str(self.out), "written": self.written,
                "dropped": len(self.dropped), "dropped_counts": self.dropped_counts,
                "dropped_lines": [{"where": d.where, "reason": d.reason} for d in self.dropped]}


class _Drop(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# --------------------------------------------------------------------------- helpers

_TIMESTAMP = re.compile(r"^\s*(\d+):([0-5]\d):(\d\d(?:\.\d+)?)\s*$", re.ASCII)


def parse_timestamp(text: str) -> float:
    """EPIC-KITCHENS ``HH:MM:SS.ff`` -> seconds.

    >>> parse_timestamp("00:01:02.50")
    62.5
    >>> parse_timestamp("01:00:00.00")
    3600.0
    """
    match = _TIMESTAMP.match(text or "")
    if match is None or float(match.group(3)) >= 60:
        raise ValueError(f"not HH:MM:SS.ff: {text!r}")
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _value(row: dict[str, Any], key: str) -> str:
    """The stripped text of ``row[key]``; a missing or blank one drops the entry, naming the key."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Drop("missing value", f"no value in column {key!r}")
    return str(value).strip()


_ASCII_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def _class_index(row: dict[str, str], key: str) -> int:
    """A class number (EPIC ``verb_class``): ASCII digits only. ``str.isdigit`` is true for
    ``'²'``, which ``int`` refuses, and ``int`` takes ``'٣'``; neither is a class number."""
    text = _value(row, key)
    if not _ASCII_DIGITS.fullmatch(text):
        raise _Drop("bad value", f"{key} {text!r} is not an integer >= 0")
    return int(text)


def _whole_seconds(row: dict[str, str], key: str) -> int:
    """A Kinetics ``time_start``/``time_end``: a whole number of seconds >= 0 (``417`` or
    ``417.0``). ``int(float(...))`` would raise OverflowError on ``inf``, ValueError on ``nan``,
    and silently truncate ``417.5`` or accept ``-3`` into a file name that is never found."""
    text = _value(row, key)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0 and seconds.is_integer()):
        raise _Drop("bad time", f"{key} {text!r} is not a whole number of seconds >= 0")
    return int(seconds)


class _FirstSeen:
    """The entries written so far, by the key that makes an entry unique in its format (EPIC's
    ``narration_id``, SSv2's ``id``, ...): a later entry with a key already written is a
    duplicate. Written twice, a clip would be trained on twice and counted twice by evaluation,
    or sit under two classes; so the first is kept and every other one dropped, naming it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._first: dict[str, str] = {}

    def check(self, key: str) -> None:
        """Drop the entry when ``key`` was written before (call before the costlier checks)."""
        if key in self._first:
            raise _Drop("duplicate", f"duplicate {self.what} {key!r} (first at {self._first[key]})")

    def add(self, key: str, place: str) -> None:
        """Record ``key`` as written at ``place`` (``line 7``, ``entry 3``): call last, when
        nothing can drop the entry any more."""
        self._first.setdefault(key, place)


def _first_existing(candidates: list[Path]) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise _Drop("missing file", f"video not found (looked for {candidates[0]}" + (f" and {len(candidates) - 1} other places)" if len(candidates) > 1 else ")"))


def _relative(video: Path, out_dir: Path) -> str:
    """The video's path relative to the manifest's folder (absolute when on another drive)."""
    try:
        return os.path.relpath(video.resolve(), out_dir.resolve())
    except ValueError:
        return str(video.resolve())


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with a header holding ``required``; AnnotationError when
    the header lacks them or the file is not text."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read ({error.strerror or error})") from None
    with handle:
        try:
            reader = csv.DictReader(handle)
            header = reader.fieldnames
        except (UnicodeDecodeError, csv.Error) as error:
            raise AnnotationError(f"{path} line 1: not a CSV file ({_one_line(error)})") from None
        if not header:
            raise AnnotationError(f"{path} line 1: empty file, expected a header with {', '.join(required)}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise AnnotationError(f"{path} line 1: header lacks column(s) {', '.join(missing)} (has: {', '.join(header[:12])})")
        reader.fieldnames = header
        try:
            for row in reader:
                yield reader.line_num, row
        except (UnicodeDecodeError, csv.Error) as error:
            raise AnnotationError(f"{path} line {reader.line_num}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


# --------------------------------------------------------------------------- formats


def _epic(annotations: Path, videos: Path) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """EPIC_100_*.csv. A column the file has must hold a value on every line: ``verb``/``noun``
    (the label), ``narration`` (the caption) and ``verb_class``/``noun_class`` (integers); the
    test split's file has none of them and imports without labels."""
    required = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp")
    seen = _FirstSeen("narration_id")
    for line, row in _read_csv(annotations, required):

        def make(row: dict[str, str] = row, line: int = line) -> dict[str, Any]:
            narration_id = _value(row, "narration_id")
            seen.check(narration_id)
            participant, video_id = _value(row, "participant_id"), _value(row, "video_id")
            times = {}
            for key in ("start_timestamp", "stop_timestamp"):
                try:
                    times[key] = parse_timestamp(_value(row, key))
                except ValueError:
                    raise _Drop("bad timestamp", f"{key} {row.get(key)!r} is not HH:MM:SS.ff") from None
            start, end = times["start_timestamp"], times["stop_timestamp"]
            if end <= start:
                raise _Drop("empty segment", f"stop_timestamp {row['stop_timestamp']} is not after start_timestamp {row['start_timestamp']}")
            labels: dict[str, Any] = {}
            if "verb" in row or "noun" in row:  # a labelled split: both, on every line
                verb, noun = _value(row, "verb"), _value(row, "noun")
                labels.update(verb=verb, noun=noun, label=f"{verb} {noun}")
            if "narration" in row:
                labels["caption"] = _value(row, "narration")
            classes = {key: _class_index(row, key) for key in ("verb_class", "noun_class") if key in row}
            folder = videos / participant
            path = _first_existing([folder / "videos" / f"{video_id}.MP4", folder / "videos" / f"{video_id}.mp4",
                                    folder / f"{video_id}.MP4", folder / f"{video_id}.mp4"])
            seen.add(narration_id, f"line {line}")
            return {"video": path, "start": start, "end": end, **labels, "narration_id": narration_id,
                    "participant_id": participant, "video_id": video_id, **classes}

        yield f"{annotations.name} line {line}", make


def ssv2_class(template: str) -> str:
    """The 174-class name of a Something-Something v2 template: brackets dropped.

    >>> ssv2_class("Putting [something] on a surface")
    'Putting something on a surface'
    """
    return re.sub(r"\s+", " ", template.replace("[", "").replace("]", "")).strip()


def _ssv2_text(entry: dict[str, Any], key: str) -> str:
    """``entry[key]`` as non-blank text; anything else drops the entry, naming the key and value."""
    value = entry.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Drop("missing value", f"no value for key {key!r}")
    if not isinstance(value, str):
        raise _Drop("bad value", f"{key} {_short(value)} is not text")
    return value.strip()


def _short(value: Any, limit: int = 60) -> str:
    """A value as JSON, cut to ``limit`` characters (a reason stays one short line)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ssv2(annotations: Path, videos: Path) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """something-something-v2-*.json. An entry with a ``template`` or a ``label`` is labelled
    and needs both as text (class and caption); the test split's entries hold an ``id`` alone."""
    try:
        text = annotations.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise AnnotationError(f"{annotations}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{annotations}: not UTF-8 text ({_one_line(error)})") from None
    try:
        entries = decode_json(text)
    except JSONValueError as error:  # the manifest reader's guard: also [[[...]]] 100k deep
        where = f" line {error.line}" if error.line else ""
        raise AnnotationError(f"{annotations}{where}: invalid JSON ({error.reason})") from None
    if not isinstance(entries, list):
        raise AnnotationError(f"{annotations} line 1: expected a JSON list of {{id, label, template, placeholders}}, got {type(entries).__name__}")
    seen = _FirstSeen("id")
    for number, entry in enumerate(entries, start=1):

        def make(entry: Any = entry, number: int = number) -> dict[str, Any]:
            if not isinstance(entry, dict):
                raise _Drop("not an object", f"expected an object with id/label/template, got {type(entry).__name__}")
            raw_id = entry.get("id")
            if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
                raise _Drop("missing value", "no value for key 'id'")
            video_id = str(raw_id).strip()
            if (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))
                    or video_id in (".", "..") or "/" in video_id or "\\" in video_id):
                raise _Drop("bad value", f"id {_short(raw_id)} is not a video id")
            seen.check(video_id)
            out: dict[str, Any] = {"id": video_id}
            if "template" in entry or "label" in entry:
                out["label"] = ssv2_class(_ssv2_text(entry, "template"))
                if not out["label"]:
                    raise _Drop("bad value", f"template {_short(entry['template'])} is only brackets")
                out["caption"] = _ssv2_text(entry, "label")
            if "placeholders" in entry:
                placeholders = entry["placeholders"]
                if not (isinstance(placeholders, list) and all(isinstance(p, str) for p in placeholders)):
                    raise _Drop("bad value", f"placeholders {_short(placeholders)} is not a list of text")
                out["placeholders"] = placeholders
            path = _first_existing([videos / f"{video_id}.webm", videos / f"{video_id}.mp4"])
            seen.add(video_id, f"entry {number}")
            return {"video": path, **out}

        yield f"{annotations.name} entry {number}", make


def _kinetics(annotations: Path, videos: Path) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """Kinetics train/validate/test.csv. With a ``label`` column, every line but those of split
    ``test`` needs a label; a clip (``youtube_id`` and time window) is written once."""
    seen = _FirstSeen("clip (youtube_id_start_end)")
    for line, row in _read_csv(annotations, ("youtube_id", "time_start", "time_end")):

        def make(row: dict[str, str] = row, line: int = line) -> dict[str, Any]:
            youtube_id = _value(row, "youtube_id")
            start, end = _whole_seconds(row, "time_start"), _whole_seconds(row, "time_end")
            if end <= start:
                raise _Drop("empty segment",
                            f"time_end {row['time_end'].strip()} is not after time_start {row['time_start'].strip()}")
            name = f"{youtube_id}_{start:06d}_{end:06d}"
            seen.check(name)
            split = (row.get("split") or "").strip()
            label = (row.get("label") or "").strip()
            if not label and "label" in row and split != "test":
                raise _Drop("missing value", "no value in column 'label'")
            folders = [videos]
            if label:
                folders += [videos / label, videos / label.replace(" ", "_")]
            if split:
                folders += [videos / split] + ([videos / split / label, videos / split / label.replace(" ", "_")] if label else [])
            path = _first_existing([folder / f"{name}{suffix}" for folder in folders for suffix in (".mp4", ".mkv", ".webm")])
            seen.add(name, f"line {line}")
            out: dict[str, Any] = {"video": path, "youtube_id": youtube_id}
            if label:
                out.update(label=label, caption=label)
            return out

        yield f"{annotations.name} line {line}", make


def _folders(videos: Path) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """``<videos>/<class>/<clip>``. One video reached twice (a symbolic link in a second class
    folder) is written once, under the first class in sorted order."""
    if not videos.is_dir():
        raise AnnotationError(f"{videos}: not a folder")
    seen = _FirstSeen("video")
    for path in sorted(p for p in videos.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(videos)

        def make(path: Path = path, relative: Path = relative) -> dict[str, Any]:
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                raise _Drop("not a video", f"suffix {path.suffix or '(none)'} is not one of {', '.join(sorted(VIDEO_SUFFIXES))}")
            if len(relative.parts) < 2:
                raise _Drop("no class folder", "not inside a class sub-folder")
            target = str(path.resolve())
            seen.check(target)
            seen.add(target, str(relative))
            label = relative.parts[0]
            return {"video": path, "label": label, "caption": label.replace("_", " ")}

        yield str(relative), make


# --------------------------------------------------------------------------- entry points


def import_manifest(format: str, annotations: str | Path | None, videos: str | Path, out: str | Path) -> ImportReport:
    """Write the manifest ``out`` for ``format`` (one of :data:`FORMATS`) from the annotation
    file ``annotations`` (None for ``folders``) and the video folder ``videos``.

    Video paths are written relative to ``out``'s folder. Returns the report; raises
    AnnotationError (one line) for an annotation file that is not in the format, ValueError for
    an unknown format or a missing argument, OSError naming ``out`` when it cannot be written.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    videos, out = Path(videos).expanduser(), Path(out).expanduser()
    if not videos.is_dir():
        raise ValueError(f"--videos {videos}: not a folder")
    if out.is_dir():  # said before reading, not after a long import
        raise ValueError(f"--out {out}: is a folder; name the manifest file to write")
    if format == "folders":
        entries = _folders(videos)
    else:
        if annotations is None:
            raise ValueError(f"format {format} needs --annotations FILE")
        annotations = Path(annotations).expanduser()
        if not annotations.is_file():
            raise AnnotationError(f"{annotations}: no such annotation file")
        entries = {"epic-kitchens-100": _epic, "ssv2": _ssv2, "kinetics": _kinetics}[format](annotations, videos)
    report = ImportReport(format, out)
    rows: list[dict[str, Any]] = []
    for where, make in entries:  # AnnotationError propagates from the readers
        try:
            row = make()
        except _Drop as drop:
            report.dropped.append(DroppedLine(where, drop.reason, drop.kind))
            continue
        row["video"] = _relative(row["video"], out.parent)
        rows.append(row)
    try:
        write_manifest(out, rows)
    except OSError as error:
        raise OSError(f"--out {out}: cannot write ({error.strerror or _one_line(error)})") from None
    report.written = len(rows)
    return report


def add_import_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``import`` to an argparse sub-parser group (``vlmask data``'s); the parser's ``func``
    default is :func:`run_import_command`, which returns the exit code."""
    parser = subparsers.add_parser(
        "import", help="write a manifest from a dataset's annotation files (epic-kitchens-100, ssv2, kinetics, folders)")
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("--annotations", help="the annotation file (EPIC_100_*.csv, something-something-v2-*.json, "
                        "Kinetics train/validate/test.csv); not for folders")
    parser.add_argument("--videos", required=True, help="the folder holding the videos")
    parser.add_argument("--out", required=True, help="the manifest to write (.jsonl)")
    parser.add_argument("--report", help="also write the import report as JSON here")
    parser.set_defaults(func=run_import_command)
    return parser


def run_import_command(args: argparse.Namespace) -> int:
    """``vlmask data import``: 0 when at least one line was written, 1 otherwise (2: bad input)."""
    if args.format == "folders" and args.annotations:
        print("vlmask data import folders: takes --videos alone (no --annotations)", file=sys.stderr)
        return 2
    try:
        report = import_manifest(args.format, args.annotations, args.videos, args.out)
    except (AnnotationError, ValueError, OSError) as error:
        print(f"vlmask data import: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    if getattr(args, "report", None):
        try:
            write_text_atomic(args.report, json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as error:
            print(f"vlmask data import: --report {args.report}: cannot write ({error.strerror or _one_line(error)}); "
                  f"the manifest {report.out} was written", file=sys.stderr)
            return 2
    return 0 if report.written else 1
