"""``vlmask data import``: EPIC-KITCHENS-100, Something-Something v2, Kinetics and class folders.

Annotation files are written in exactly the distributed formats (EPIC_100_*.csv columns,
something-something-v2-*.json entries, Kinetics CSV columns and downloader file names); the
videos are real files encoded at test time. Each manifest is then loaded by the dataset plugin.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import pytest

from vlmask_plugins.data.dataset import VideoManifestDataset
from vlmask_plugins.data.importers import (
    AnnotationError,
    add_import_command,
    import_manifest,
    parse_timestamp,
    ssv2_class,
)

EPIC_HEADER = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
               "start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes")


def load(manifest: Path, **kwargs) -> VideoManifestDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VideoManifestDataset(str(manifest), num_frames=4, size=32, train=False, **kwargs)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_epic_kitchens_100(tmp_path, encode_videos):
    videos = tmp_path / "EPIC-KITCHENS"
    (videos / "P01" / "videos").mkdir(parents=True)
    (videos / "P04" / "videos").mkdir(parents=True)
    encode_videos([dict(path=str(videos / "P01" / "videos" / "P01_01.MP4"), frames=80, fps=10),
                   dict(path=str(videos / "P04" / "videos" / "P04_02.MP4"), frames=40, fps=10)])
    annotations = tmp_path / "EPIC_100_train.csv"
    annotations.write_text("\n".join([
        EPIC_HEADER,
        'P01_01_0,P01,P01_01,00:00:00.560,00:00:01.00,00:00:02.50,60,150,open drawer,open,3,drawer,8,"[\'drawer\']",[8]',
        'P01_01_1,P01,P01_01,00:00:03.000,00:00:03.20,00:00:06.37,192,382,"take plate, then cup",take,0,plate,2,"[\'plate\', \'cup\']","[2, 13]"',
        "P01_01_2,P01,P01_01,00:00:04.000,00:00:4.5,00:00:05.00,0,0,wash,wash,2,pan,5,[],[]",        # bad timestamp
        "P02_03_0,P02,P02_03,00:00:01.000,00:00:01.00,00:00:02.00,60,120,cut onion,cut,7,onion,9,[],[]",  # no video
        "P04_02_0,P04,P04_02,00:00:01.000,00:00:03.00,00:00:02.00,180,120,close tap,close,4,tap,6,[],[]",  # stop < start
        "P04_02_1,P04,P04_02,00:00:01.000,00:00:00.10,00:00:01.90,6,114,close tap,close,4,tap,6,[],[]",
    ]) + "\n")
    out = tmp_path / "manifests" / "epic_train.jsonl"
    report = import_manifest("epic-kitchens-100", annotations, videos, out)
    assert report.written == 3 and len(report.dropped) == 3
    assert [str(d) for d in report.dropped] == [
        "EPIC_100_train.csv line 4: start_timestamp '00:00:4.5' is not HH:MM:SS.ff",
        f"EPIC_100_train.csv line 5: video not found (looked for {videos / 'P02' / 'videos' / 'P02_03.MP4'} and 3 other places)",
        "EPIC_100_train.csv line 6: stop_timestamp 00:00:02.00 is not after start_timestamp 00:00:03.00",
    ]
    assert report.dropped_counts == {"bad timestamp": 1, "missing file": 1, "empty segment": 1}
    assert "dropped 3 (bad timestamp: 1, missing file: 1, empty segment: 1)" in report.summary()
    written = rows(out)
    assert written[0] == {"video": "../EPIC-KITCHENS/P01/videos/P01_01.MP4", "start": 1.0, "end": 2.5, "verb": "open",
                          "noun": "drawer", "label": "open drawer", "caption": "open drawer", "narration_id": "P01_01_0",
                          "participant_id": "P01", "video_id": "P01_01", "verb_class": 3, "noun_class": 8}
    assert written[1]["caption"] == "take plate, then cup" and (written[1]["start"], written[1]["end"]) == (3.2, 6.37)
    data = load(out)
    assert len(data) == 3 and data.skipped == []
    assert data.labels == ["open drawer", "take plate", "close tap"] and data.verbs == ["open", "take", "close"]
    assert data[0]["video"].shape == (3, 4, 32, 32)


def test_epic_header_without_required_columns_is_one_line_error(tmp_path):
    bad = tmp_path / "EPIC_100_validation.csv"
    bad.write_text("narration_id,video_id,start,stop\nP01_01_0,P01_01,1,2\n")
    with pytest.raises(AnnotationError, match=r"EPIC_100_validation.csv line 1: header lacks column\(s\) participant_id, "
                                              r"start_timestamp, stop_timestamp") as caught:
        import_manifest("epic-kitchens-100", bad, tmp_path, tmp_path / "out.jsonl")
    assert "\n" not in str(caught.value)


def test_something_something_v2(tmp_path, encode_videos):
    videos = tmp_path / "20bn-something-something-v2"
    videos.mkdir()
    encode_videos([dict(path=str(videos / "78687.webm"), frames=30, fps=12, codec="vp9"),
                   dict(path=str(videos / "42326.webm"), frames=30, fps=12, codec="vp9")])
    annotations = tmp_path / "something-something-v2-validation.json"
    annotations.write_text(json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
        {"id": "99999", "label": "putting pen on table", "template": "Putting [something] on a surface", "placeholders": ["pen"]},
        {"id": "42326", "label": "spreading margarine onto bread",
         "template": "Spreading [something] onto [something]", "placeholders": ["margarine", "bread"]},
        {"label": "an entry without an id"},
    ], indent=1))
    out = tmp_path / "ssv2_val.jsonl"
    report = import_manifest("ssv2", annotations, videos, out)
    assert report.written == 2
    assert [(d.where, d.kind) for d in report.dropped] == [
        ("something-something-v2-validation.json entry 2", "missing file"),
        ("something-something-v2-validation.json entry 4", "missing value")]
    written = rows(out)
    assert written[0]["video"] == "20bn-something-something-v2/78687.webm"
    assert written[0]["label"] == "Holding something next to something"
    assert written[0]["caption"] == "holding potato next to vicks vaporub bottle"
    data = load(out)
    assert data.classes == ["Holding something next to something", "Spreading something onto something"]
    assert data[1]["video"].shape == (3, 4, 32, 32)


def test_ssv2_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "something-something-v2-train.json"
    bad.write_text('[\n {"id": "1", "label": "x",\n "template": }\n]')
    with pytest.raises(AnnotationError, match=r"something-something-v2-train.json line 3: invalid JSON"):
        import_manifest("ssv2", bad, tmp_path, tmp_path / "out.jsonl")
    assert ssv2_class("Pretending to pick [something] up") == "Pretending to pick something up"


def test_kinetics(tmp_path, encode_videos):
    videos = tmp_path / "kinetics400" / "val"
    (videos / "abseiling").mkdir(parents=True)
    (videos / "playing_guitar").mkdir()
    encode_videos([dict(path=str(videos / "abseiling" / "0wR5jVB-WPk_000417_000427.mp4"), frames=20, fps=10),
                   dict(path=str(videos / "playing_guitar" / "-0xfPR6VKO8_000010_000020.mp4"), frames=20, fps=10),
                   dict(path=str(videos / "3caPS4FHFF8_000036_000046.mp4"), frames=20, fps=10)])
    annotations = tmp_path / "validate.csv"
    annotations.write_text("label,youtube_id,time_start,time_end,split\n"
                           "abseiling,0wR5jVB-WPk,417,427,val\n"
                           "playing guitar,-0xfPR6VKO8,10,20,val\n"
                           "air drumming,3caPS4FHFF8,36,46,val\n"
                           "air drumming,missingvid01,0,10,val\n"
                           "air drumming,badtimes001,ten,20,val\n")
    out = tmp_path / "kinetics_val.jsonl"
    report = import_manifest("kinetics", annotations, videos, out)
    assert report.written == 3
    assert [(d.where, d.kind) for d in report.dropped] == [("validate.csv line 5", "missing file"),
                                                          ("validate.csv line 6", "bad time")]
    written = rows(out)
    assert [r["video"] for r in written] == ["kinetics400/val/abseiling/0wR5jVB-WPk_000417_000427.mp4",
                                             "kinetics400/val/playing_guitar/-0xfPR6VKO8_000010_000020.mp4",
                                             "kinetics400/val/3caPS4FHFF8_000036_000046.mp4"]
    assert [r["label"] for r in written] == ["abseiling", "playing guitar", "air drumming"]
    assert "start" not in written[0], "Kinetics files are already trimmed"
    assert load(out).classes == ["abseiling", "air drumming", "playing guitar"]


def test_folders_and_the_command(tmp_path, encode_videos, capsys):
    videos = tmp_path / "my_videos"
    (videos / "open_drawer").mkdir(parents=True)
    (videos / "close_drawer").mkdir()
    encode_videos([dict(path=str(videos / "open_drawer" / "a.mp4"), frames=12, fps=6),
                   dict(path=str(videos / "close_drawer" / "b.mp4"), frames=12, fps=6),
                   dict(path=str(videos / "loose.mp4"), frames=12, fps=6)])
    (videos / "open_drawer" / "notes.txt").write_text("not a video")
    parser = argparse.ArgumentParser()
    add_import_command(parser.add_subparsers(dest="data_command"))
    out = tmp_path / "folders.jsonl"
    args = parser.parse_args(["import", "folders", "--videos", str(videos), "--out", str(out),
                              "--report", str(tmp_path / "report.json")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"folders: wrote 2 lines to {out}; dropped 2" in printed
    assert "loose.mp4: not inside a class sub-folder" in printed and "open_drawer/notes.txt: suffix .txt" in printed
    assert json.loads((tmp_path / "report.json").read_text())["dropped_counts"] == {"no class folder": 1, "not a video": 1}
    assert rows(out) == [{"video": "my_videos/close_drawer/b.mp4", "label": "close_drawer", "caption": "close drawer"},
                         {"video": "my_videos/open_drawer/a.mp4", "label": "open_drawer", "caption": "open drawer"}]
    assert load(out).classes == ["close_drawer", "open_drawer"]
    # Bad input through the command: one line on stderr, exit code 2.
    args = parser.parse_args(["import", "ssv2", "--videos", str(videos), "--out", str(out)])
    assert args.func(args) == 2
    assert capsys.readouterr().err.strip() == "vlmask data import: format ssv2 needs --annotations FILE"


def test_timestamps():
    assert parse_timestamp("00:01:02.50") == 62.5 and parse_timestamp("10:00:00.01") == 36000.01
    for bad in ("1:2", "00:61:00.00", "00:00:60.00", "", "00:00:xx"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_an_imported_manifest_validates_and_trains(tmp_path, encode_videos, tiny_scale, monkeypatch, capsys):
    """Through the command line: ``vlmask data import folders``, then ``vlmask validate`` and a tiny
    ``vlmask run`` of FILS, whose ActCLIP needs action boxes the import does not write: they are
    detected before training."""
    from vlmask.cli import main

    monkeypatch.setenv("VLMASK_CACHE", str(tmp_path / "cache"))
    videos = tmp_path / "clips"
    jobs = [dict(path=str(videos / label / f"{label}_{i}.mp4"), frames=16, fps=8, width=64, height=48, seed=i)
            for label in ("wave", "clap") for i in range(3)]
    for label in ("wave", "clap"):
        (videos / label).mkdir(parents=True)
    encode_videos(jobs)
    out = tmp_path / "clips.jsonl"
    assert main(["data", "import", "folders", "--videos", str(videos), "--out", str(out)]) == 0
    assert f"folders: wrote 6 lines to {out}" in capsys.readouterr().out
    assert all("action_box" not in row for row in rows(out))
    recipe = str(Path(__file__).resolve().parents[3] / "recipes" / "fils.yaml")
    overrides = [*tiny_scale, "train.max_steps=2", f"data.train={out}", f"data.val={out}", f"run.dir={tmp_path / 'run'}"]
    assert main(["validate", recipe, *overrides]) == 0
    assert f"6 of 6 lines of {out} lack action_box; they will be detected before training" in " ".join(
        capsys.readouterr().err.split())
    assert main(["run", recipe, *overrides]) == 0
    log = " ".join(capsys.readouterr().err.split())
    assert "boxes: 0 in the manifest, 6 detected, 0 from cache" in log
    # the decoder on the start line, like the attention backend
    assert re.search(r"\| decoder (pyav|decord|torchcodec) \((auto|data\.dataset\.decoder)[^)]*\) \|", log), log
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
