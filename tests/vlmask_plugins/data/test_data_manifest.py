"""Reading manifests: line numbers, defaults, resolution, and every kind of bad line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmask_plugins.data.manifest import SkippedClip, clip_to_row, read_manifest


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "clips" / "a.mp4"
    path.parent.mkdir()
    path.write_bytes(b"not checked here")  # decoding is the probe's job, not the parser's
    return path


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_good_lines_resolve_paths_and_default_the_label(tmp_path, video):
    manifest = write(tmp_path / "m.jsonl", [
        json.dumps({"video": "clips/a.mp4", "verb": "open", "noun": "drawer", "start": 1, "end": 2.5,
                    "action_box": [0.1, 0.2, 0.5, 0.9], "camera_pan": True}),
        "",
        json.dumps({"video": str(video), "label": "given", "verb": "open", "noun": "drawer", "caption": "hi"}),
    ])
    report = read_manifest(manifest)
    assert report.skipped == []
    first, second = report.clips
    assert first.line == 1 and second.line == 3
    assert first.video == video and second.video == video
    assert first.label == "open drawer" and second.label == "given"
    assert (first.start, first.end) == (1.0, 2.5) and first.action_box == (0.1, 0.2, 0.5, 0.9)
    assert first.extra == {"camera_pan": True} and second.caption == "hi"
    assert clip_to_row(first, tmp_path)["video"] == "clips/a.mp4"


def test_bad_lines_are_skipped_with_line_numbers_and_reasons(tmp_path, video):
    manifest = write(tmp_path / "m.jsonl", [
        json.dumps({"video": "clips/a.mp4"}),                       # 1 good
        "{not json",                                                 # 2
        json.dumps({"caption": "no video"}),                         # 3
        json.dumps(["clips/a.mp4"]),                                 # 4
        json.dumps({"video": "clips/missing.mp4"}),                  # 5
        json.dumps({"video": "clips/a.mp4", "start": 3, "end": 2}),  # 6
        json.dumps({"video": "clips/a.mp4", "action_box": [0.5, 0, 0.2, 1]}),  # 7
        json.dumps({"video": "clips/a.mp4", "caption": 5}),          # 8
        json.dumps({"video": "clips/a.mp4", "start": -1}),           # 9
        json.dumps({"video": "clips"}),                              # 10: a folder
    ])
    report = read_manifest(manifest)
    assert [c.line for c in report.clips] == [1]
    reasons = {s.line: s.reason for s in report.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert "invalid JSON" in reasons[2]
    assert "missing required field 'video'" in reasons[3]
    assert "JSON object" in reasons[4]
    assert "file not found" in reasons[5] and "missing.mp4" in reasons[5]
    assert "start" in reasons[6] and "before end" in reasons[6]
    assert "action_box" in reasons[7]
    assert "caption must be a string" in reasons[8]
    assert ">= 0" in reasons[9]
    assert "not a file" in reasons[10]
    assert SkippedClip(5, "clips/missing.mp4", reasons[5]) in report.skipped
    assert "9 skipped" in report.summary() and "line 2" in report.summary()


def test_a_missing_manifest_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_manifest(tmp_path / "nowhere.jsonl")


def test_a_line_nested_100k_deep_is_one_bad_line(tmp_path, video):
    """json.loads recurses: without a guard one hostile line ends the whole run in RecursionError."""
    manifest = write(tmp_path / "m.jsonl", [
        json.dumps({"video": "clips/a.mp4"}),
        "[" * 100_000 + "]" * 100_000,
        '{"video": "clips/a.mp4", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        json.dumps({"video": "clips/a.mp4"}),
    ])
    report = read_manifest(manifest)
    assert [c.line for c in report.clips] == [1, 4]
    assert [(s.line, s.reason) for s in report.skipped] == [(2, "invalid JSON: nested too deeply"),
                                                            (3, "invalid JSON: nested too deeply")]



def test_a_number_of_5000_digits_is_one_bad_line(tmp_path, video):
    """json.loads raises a plain ValueError (not JSONDecodeError) for an integer over 4,300 digits:
    it escaped the reader and ended the run."""
    manifest = write(tmp_path / "m.jsonl", [json.dumps({"video": "clips/a.mp4"}),
                                            '{"video": "clips/a.mp4", "frames": ' + "1" * 5000 + "}",
                                            json.dumps({"video": "clips/a.mp4"})])
    report = read_manifest(manifest)
    assert [c.line for c in report.clips] == [1, 3]
    assert [(s.line, s.reason) for s in report.skipped] == [
        (2, "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion")]

def test_a_utf8_byte_order_mark_keeps_the_first_line(tmp_path, video):
    manifest = tmp_path / "bom.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"video": "clips/a.mp4", "caption": "first"}) + "\n"
                                              + json.dumps({"video": "clips/a.mp4", "caption": "second"}) + "\n").encode())
    report = read_manifest(manifest)
    assert report.skipped == []
    assert [(c.line, c.caption) for c in report.clips] == [(1, "first"), (2, "second")]
