"""Reading a data manifest (JSON Lines, one clip a line; the contract's "Data manifest").

:func:`read_manifest` never raises for a bad line: it skips the line and records why, with
its 1-based line number, so a run can report "skipped 3 of 400 clips: line 7 (...), ...".
It raises only when the manifest file itself is missing. Whether a file *decodes* is checked
later (``vlmask_plugins.data.decode.probe_video``, at dataset construction), since that needs
the decoder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

#: The fields the contract defines; any other field of a line is kept in ``ManifestClip.extra``.
KNOWN_FIELDS: frozenset[str] = frozenset({"video", "caption", "label", "verb", "noun", "start", "end", "action_box"})


@dataclass(frozen=True)
class ManifestClip:
    """One good line of a manifest. ``video`` is resolved (absolute, or relative to the
    current directory when the manifest path was); ``line`` is the 1-based line number."""

    line: int
    video: Path
    caption: str | None = None
    label: str | None = None
    verb: str | None = None
    noun: str | None = None
    start: float | None = None
    end: float | None = None
    action_box: tuple[float, float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedClip:
    """A line that was left out: its 1-based number, its ``video`` (as written, or None when
    there was none) and why."""

    line: int
    video: str | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" ({self.video})" if self.video else "")
        return f"{where}: {self.reason}"


@dataclass
class ManifestReport:
    """The clips of a manifest that passed, and the lines that did not."""

    path: Path
    clips: list[ManifestClip]
    skipped: list[SkippedClip]

    def summary(self, first: int = 5) -> str:
        """One line for logs: counts and the first few offenders."""
        text = f"{self.path}: {len(self.clips)} clips, {len(self.skipped)} skipped"
        if self.skipped:
            shown = "; ".join(str(s) for s in self.skipped[:first])
            more = f"; ... {len(self.skipped) - first} more" if len(self.skipped) > first else ""
            text += f" ({shown}{more})"
        return text


class _BadLine(ValueError):
    pass


class JSONValueError(ValueError):
    """JSON text that :func:`decode_json` refuses: ``reason`` (one line, e.g. ``nested too
    deeply``) and, when the decoder knows it, the 1-based ``line`` and ``column`` in the text.
    The caller names the file."""

    def __init__(self, reason: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(f"invalid JSON: {reason}")
        self.reason, self.line, self.column = reason, line, column


def decode_json(text: str) -> Any:
    """``json.loads``, with every way it can fail turned into :class:`JSONValueError`.

    ``json.loads`` recurses once per ``[``/``{``, so ``[[[[...]]]]`` 100k deep raises
    RecursionError, which no ``except ValueError`` catches; and an integer of more than 4,300
    digits raises a plain ValueError without a position. Either would end a whole run or import
    for one hostile value; here both are a one-line JSONValueError, for every reader of JSON that
    users write (manifest lines, annotation files).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JSONValueError(error.msg, error.lineno, error.colno) from None
    except RecursionError:
        raise JSONValueError("nested too deeply") from None
    except ValueError as error:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise JSONValueError(str(error).split(":")[0].strip() or "not JSON") from None


def _optional_string(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadLine(f"{key} must be a string, got {type(value).__name__}")
    return value


def _optional_seconds(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadLine(f"{key} must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise _BadLine(f"{key} must be >= 0 seconds, got {value}")
    return float(value)


def _optional_box(row: dict[str, Any]) -> tuple[float, float, float, float] | None:
    value = row.get("action_box")
    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
    if ok:
        x0, y0, x1, y1 = (float(v) for v in value)
        ok = 0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0
    if not ok:
        raise _BadLine(f"action_box must be [x0, y0, x1, y1] fractions with 0 <= x0 <= x1 <= 1 and "
                       f"0 <= y0 <= y1 <= 1, got {value!r}")
    return (x0, y0, x1, y1)


def parse_line(row: Any, line: int, root: Path) -> ManifestClip:
    """Validate one decoded JSON value; raises ValueError with the reason when it is bad."""
    if not isinstance(row, dict):
        raise _BadLine(f"a line must be a JSON object, got {type(row).__name__}")
    video = row.get("video")
    if video is None:
        raise _BadLine("missing required field 'video'")
    if not isinstance(video, str) or not video:
        raise _BadLine(f"video must be a non-empty string, got {video!r}")
    caption = _optional_string(row, "caption")
    verb = _optional_string(row, "verb")
    noun = _optional_string(row, "noun")
    label = _optional_string(row, "label")
    if label is None and verb is not None and noun is not None:
        label = f"{verb} {noun}"
    start, end = _optional_seconds(row, "start"), _optional_seconds(row, "end")
    if start is not None and end is not None and start >= end:
        raise _BadLine(f"start ({start}) must be before end ({end})")
    box = _optional_box(row)
    path = Path(video).expanduser()
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise _BadLine(f"file not found: {path}" if not path.exists() else f"not a file: {path}")
    extra = {k: v for k, v in row.items() if k not in KNOWN_FIELDS}
    return ManifestClip(line, path, caption, label, verb, noun, start, end, box, extra)


def read_manifest_rows(path: Path) -> Iterator[tuple[int, Any, ManifestClip | None, str | None]]:
    """(line number, decoded row or None, parsed clip or None, reason when bad) per non-blank line."""
    root = path.parent
    # utf-8-sig: a byte-order mark some editors put first is dropped, not read as part of line 1
    with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = decode_json(text)
            except JSONValueError as error:  # one bad line (even 100k deep, a 5,000-digit number), not the end
                yield number, None, None, str(error) + (f" at column {error.column}" if error.column else "")
                continue
            try:
                yield number, row, parse_line(row, number, root), None
            except ValueError as error:
                yield number, row, None, str(error)


def read_manifest(path: str | Path) -> ManifestReport:
    """Parse a JSONL manifest. Bad lines are skipped and recorded (blank lines are ignored);
    a missing manifest file raises FileNotFoundError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist" if not path.exists() else f"manifest {path} is not a file")
    clips: list[ManifestClip] = []
    skipped: list[SkippedClip] = []
    for number, row, clip, reason in read_manifest_rows(path):
        if clip is not None:
            clips.append(clip)
        else:
            video = row.get("video") if isinstance(row, dict) and isinstance(row.get("video"), str) else None
            skipped.append(SkippedClip(number, video, reason or "bad line"))
    return ManifestReport(path, clips, skipped)


def write_manifest(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON Lines (e.g. a manifest with ``action_box`` filled in), atomically."""
    return write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` beside ``path`` (``.NAME.tmp-PID``), fsync it, then rename it over ``path``:
    a reader, or a kill at any moment, sees the old file or the whole new one. Undecodable bytes
    kept from an input (``surrogateescape``) are written back as they were."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(scratch, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return path


def clip_to_row(clip: ManifestClip, root: Path | None = None) -> dict[str, Any]:
    """A manifest line for a clip (paths relative to ``root`` when the clip lies under it),
    the inverse of :func:`parse_line` up to path resolution."""
    video = clip.video
    if root is not None:
        try:
            video = clip.video.resolve().relative_to(Path(root).resolve())
        except ValueError:
            video = clip.video.resolve()
    row: dict[str, Any] = {"video": str(video)}
    for key in ("caption", "label", "verb", "noun", "start", "end"):
        value = getattr(clip, key)
        if value is not None:
            row[key] = value
    if clip.action_box is not None:
        row["action_box"] = list(clip.action_box)
    row.update(clip.extra)
    return row
