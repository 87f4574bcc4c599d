"""``vlmask data import``: EPIC-KITCHENS-100, Something-Something v2, Kinetics and class folders.

Annotation files are written in exactly the distributed formats (EPIC_100_*.csv columns,
something-something-v2-*.json entries, Kinetics CSV columns and downloader file names); the
videos are real files encoded at test time. Each manifest is then loaded by the dataset plugin.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
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


# --------------------------------------------------------------------------- bad values, duplicates (issue 22)
# Every case goes through the real command line (``vlmask data import``) with annotation files
# written here in the distributed formats; the videos are one real encoded clip, copied under
# the names each format looks for (the importer checks that a video exists, the dataset decodes).


@pytest.fixture(scope="module")
def clip(tmp_path_factory, encode_videos) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    encode_videos([dict(path=str(path), frames=8, fps=8, width=32, height=32)])
    return path


def place(clip: Path, *paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, path)


def import_command(capsys, *argv: str) -> tuple[int, str, str]:
    """``vlmask data import ...``: (exit code, stdout, stderr)."""
    from vlmask.cli import main

    code = main(["data", "import", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def epic_line(narration_id: str, verb_class: str = "3", noun_class: str = "8", verb: str = "open",
              narration: str = "open drawer") -> str:
    return (f"{narration_id},P01,P01_01,00:00:00.560,00:00:01.00,00:00:02.50,60,150,{narration},{verb},{verb_class},"
            f"drawer,{noun_class},\"['drawer']\",[8]")


def test_epic_a_class_that_is_not_an_integer_drops_its_line(tmp_path, clip, capsys):
    """'²'.isdigit() is True and int('²') fails: the whole import ended in
    ``invalid literal for int() with base 10: '²'``. Now that line is dropped, named, and the rest written."""
    place(clip, tmp_path / "videos" / "P01" / "videos" / "P01_01.MP4")
    annotations = tmp_path / "EPIC_100_train.csv"
    annotations.write_text("\n".join([
        EPIC_HEADER,
        epic_line("P01_01_0"),
        epic_line("P01_01_1", verb_class="²"),
        epic_line("P01_01_2", noun_class="٣"),       # an Arabic-Indic digit: int() takes it, it is no class number
        epic_line("P01_01_3", verb_class="-1"),
        epic_line("P01_01_4", verb_class=""),
        epic_line("P01_01_5", verb=""),                # a labelled file: a line without its verb has no label
        epic_line("P01_01_6", narration=""),           # ... and one without its narration no caption
        epic_line("P01_01_7", verb_class="12"),
    ]) + "\n")
    out, report = tmp_path / "epic.jsonl", tmp_path / "report.json"
    code, printed, err = import_command(capsys, "epic-kitchens-100", "--annotations", str(annotations),
                                        "--videos", str(tmp_path / "videos"), "--out", str(out), "--report", str(report))
    assert (code, err) == (0, "")
    assert [(r["narration_id"], r["verb_class"], r["noun_class"]) for r in rows(out)] == [("P01_01_0", 3, 8), ("P01_01_7", 12, 8)]
    assert all(r["label"] == "open drawer" and r["caption"] == "open drawer" for r in rows(out))
    expected = ["EPIC_100_train.csv line 3: verb_class '²' is not an integer >= 0",
                "EPIC_100_train.csv line 4: noun_class '٣' is not an integer >= 0",
                "EPIC_100_train.csv line 5: verb_class '-1' is not an integer >= 0",
                "EPIC_100_train.csv line 6: no value in column 'verb_class'",
                "EPIC_100_train.csv line 7: no value in column 'verb'",
                "EPIC_100_train.csv line 8: no value in column 'narration'"]
    assert [f"{d['where']}: {d['reason']}" for d in json.loads(report.read_text())["dropped_lines"]] == expected
    assert f"wrote 2 lines to {out}; dropped 6 (bad value: 3, missing value: 3)" in printed
    assert all(line in printed for line in expected)


def test_epic_test_split_without_label_columns_imports_without_labels(tmp_path, clip, capsys):
    place(clip, tmp_path / "videos" / "P01" / "videos" / "P01_01.MP4")
    annotations = tmp_path / "EPIC_100_test_timestamps.csv"
    annotations.write_text("narration_id,participant_id,video_id,start_timestamp,stop_timestamp,start_frame,stop_frame\n"
                           "P01_101_0,P01,P01_01,00:00:00.50,00:00:01.50,30,90\n")
    out = tmp_path / "test.jsonl"
    code, printed, _ = import_command(capsys, "epic-kitchens-100", "--annotations", str(annotations),
                                     "--videos", str(tmp_path / "videos"), "--out", str(out))
    assert code == 0 and "dropped 0" in printed
    assert rows(out) == [{"video": "videos/P01/videos/P01_01.MP4", "start": 0.5, "end": 1.5, "narration_id": "P01_101_0",
                          "participant_id": "P01", "video_id": "P01_01"}]


def test_epic_a_repeated_narration_id_is_written_once(tmp_path, clip, capsys):
    """Written twice with "dropped 0", a repeated segment was trained on and evaluated twice."""
    place(clip, tmp_path / "videos" / "P01" / "videos" / "P01_01.MP4")
    annotations = tmp_path / "EPIC_100_validation.csv"
    annotations.write_text("\n".join([EPIC_HEADER, epic_line("P01_01_0"), epic_line("P01_01_1"),
                                      epic_line("P01_01_0", narration="open the drawer"), epic_line("P01_01_0")]) + "\n")
    out, report = tmp_path / "epic.jsonl", tmp_path / "report.json"
    code, printed, _ = import_command(capsys, "epic-kitchens-100", "--annotations", str(annotations), "--videos",
                                      str(tmp_path / "videos"), "--out", str(out), "--report", str(report))
    assert code == 0
    assert [(r["narration_id"], r["caption"]) for r in rows(out)] == [("P01_01_0", "open drawer"), ("P01_01_1", "open drawer")]
    assert f"wrote 2 lines to {out}; dropped 2 (duplicate: 2)" in printed
    assert json.loads(report.read_text())["dropped_lines"] == [
        {"where": "EPIC_100_validation.csv line 4", "reason": "duplicate narration_id 'P01_01_0' (first at line 2)"},
        {"where": "EPIC_100_validation.csv line 5", "reason": "duplicate narration_id 'P01_01_0' (first at line 2)"}]


def test_kinetics_times_that_are_not_whole_seconds_drop_their_line(tmp_path, clip, capsys):
    """``time_start`` = inf ended the import in OverflowError; nan in ValueError; 417.5 was cut to
    417 and -3 written into a file name. Each is now one dropped, named line."""
    videos = tmp_path / "kinetics" / "train"
    place(clip, videos / "abseiling" / "good0000001_000010_000020.mp4")
    annotations = tmp_path / "train.csv"
    annotations.write_text("label,youtube_id,time_start,time_end,split\n"
                           "abseiling,inf00000001,inf,10,train\n"
                           "abseiling,nan00000001,nan,10,train\n"
                           "abseiling,neg00000001,-3,7,train\n"
                           "abseiling,half0000001,417.5,427,train\n"
                           "abseiling,huge0000001,10,1e400,train\n"
                           "abseiling,empty000001,20,20,train\n"
                           "abseiling,backwards01,30,20,train\n"
                           "abseiling,good0000001,10.0,20,train\n")
    out, report = tmp_path / "k.jsonl", tmp_path / "report.json"
    code, printed, err = import_command(capsys, "kinetics", "--annotations", str(annotations), "--videos", str(videos),
                                        "--out", str(out), "--report", str(report))
    assert (code, err) == (0, "")
    assert [r["video"] for r in rows(out)] == ["kinetics/train/abseiling/good0000001_000010_000020.mp4"]
    assert [f"{d['where']}: {d['reason']}" for d in json.loads(report.read_text())["dropped_lines"]] == [
        "train.csv line 2: time_start 'inf' is not a whole number of seconds >= 0",
        "train.csv line 3: time_start 'nan' is not a whole number of seconds >= 0",
        "train.csv line 4: time_start '-3' is not a whole number of seconds >= 0",
        "train.csv line 5: time_start '417.5' is not a whole number of seconds >= 0",
        "train.csv line 6: time_end '1e400' is not a whole number of seconds >= 0",
        "train.csv line 7: time_end 20 is not after time_start 20",
        "train.csv line 8: time_end 20 is not after time_start 30"]
    assert "dropped 7 (bad time: 5, empty segment: 2)" in printed


def test_kinetics_a_clip_listed_twice_is_written_once_and_labels_are_required(tmp_path, clip, capsys):
    videos = tmp_path / "kinetics"
    place(clip, videos / "0wR5jVB-WPk_000417_000427.mp4", videos / "test" / "3caPS4FHFF8_000036_000046.mp4")
    annotations = tmp_path / "validate.csv"
    annotations.write_text("label,youtube_id,time_start,time_end,split\n"
                           "abseiling,0wR5jVB-WPk,417,427,val\n"
                           "air drumming,0wR5jVB-WPk,417.0,427,val\n"   # the same clip under a second class
                           ",-0xfPR6VKO8,10,20,val\n"                 # no label on a labelled split
                           ",3caPS4FHFF8,36,46,test\n")                 # the test split: no label needed
    out, report = tmp_path / "k.jsonl", tmp_path / "report.json"
    code, printed, _ = import_command(capsys, "kinetics", "--annotations", str(annotations), "--videos", str(videos),
                                      "--out", str(out), "--report", str(report))
    assert code == 0
    assert rows(out) == [{"video": "kinetics/0wR5jVB-WPk_000417_000427.mp4", "youtube_id": "0wR5jVB-WPk",
                          "label": "abseiling", "caption": "abseiling"},
                         {"video": "kinetics/test/3caPS4FHFF8_000036_000046.mp4", "youtube_id": "3caPS4FHFF8"}]
    assert [f"{d['where']}: {d['reason']}" for d in json.loads(report.read_text())["dropped_lines"]] == [
        "validate.csv line 3: duplicate clip (youtube_id_start_end) '0wR5jVB-WPk_000417_000427' (first at line 2)",
        "validate.csv line 4: no value in column 'label'"]
    assert "dropped 2 (duplicate: 1, missing value: 1)" in printed


def ssv2_entry(video_id, label="putting pen on table", template="Putting [something] on a surface", **more) -> dict:
    return {"id": video_id, "label": label, "template": template, "placeholders": ["pen"], **more}


def test_ssv2_entries_it_cannot_use_are_dropped_not_written_bare(tmp_path, clip, capsys):
    """A numeric template with a list label was written without label or caption and not counted."""
    videos = tmp_path / "ssv2"
    place(clip, *(videos / f"{n}.webm" for n in range(1, 11)))
    annotations = tmp_path / "something-something-v2-train.json"
    annotations.write_text(json.dumps([
        ssv2_entry("1"),
        ssv2_entry("2", template=5, label=["pen"]),
        ssv2_entry("3", label=["pen"]),
        {"id": "4", "template": "Putting [something] on a surface"},      # a class but no caption
        ssv2_entry("5", placeholders="pen"),
        ssv2_entry(["6"]),
        ssv2_entry("../ssv2/7"),
        ssv2_entry("8", template="[]"),
        ssv2_entry(9),                                                    # a numeric id is an id
        {"id": "10"},                                                     # the test split: an id alone
    ]))
    out, report = tmp_path / "ssv2.jsonl", tmp_path / "report.json"
    code, printed, err = import_command(capsys, "ssv2", "--annotations", str(annotations), "--videos", str(videos),
                                        "--out", str(out), "--report", str(report))
    assert (code, err) == (0, "")
    assert [(r["id"], r.get("label"), r.get("caption")) for r in rows(out)] == [
        ("1", "Putting something on a surface", "putting pen on table"),
        ("9", "Putting something on a surface", "putting pen on table"),
        ("10", None, None)]
    name = annotations.name
    assert [f"{d['where']}: {d['reason']}" for d in json.loads(report.read_text())["dropped_lines"]] == [
        f"{name} entry 2: template 5 is not text",
        f"{name} entry 3: label [\"pen\"] is not text",
        f"{name} entry 4: no value for key 'label'",
        f"{name} entry 5: placeholders \"pen\" is not a list of text",
        f"{name} entry 6: id [\"6\"] is not a video id",
        f"{name} entry 7: id \"../ssv2/7\" is not a video id",
        f"{name} entry 8: template \"[]\" is only brackets"]
    assert "dropped 7 (bad value: 6, missing value: 1)" in printed


def test_ssv2_a_video_under_two_classes_is_written_once(tmp_path, clip, capsys):
    videos = tmp_path / "ssv2"
    place(clip, videos / "78687.webm", videos / "42326.webm")
    annotations = tmp_path / "something-something-v2-validation.json"
    annotations.write_text(json.dumps([ssv2_entry("78687"), ssv2_entry("42326"),
                                       ssv2_entry("78687", template="Holding [something]", label="holding pen")]))
    out, report = tmp_path / "ssv2.jsonl", tmp_path / "report.json"
    code, printed, _ = import_command(capsys, "ssv2", "--annotations", str(annotations), "--videos", str(videos),
                                      "--out", str(out), "--report", str(report))
    assert code == 0 and [r["id"] for r in rows(out)] == ["78687", "42326"]
    assert rows(out)[0]["label"] == "Putting something on a surface"
    assert json.loads(report.read_text())["dropped_lines"] == [
        {"where": f"{annotations.name} entry 3", "reason": "duplicate id '78687' (first at entry 1)"}]
    assert "dropped 1 (duplicate: 1)" in printed


@pytest.mark.parametrize("text, reason", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                          ('[{"id": ' + "1" * 5000 + "}]", "Exceeds the limit (4300 digits)")])
def test_ssv2_json_too_deep_or_too_long_is_one_line_naming_the_file(tmp_path, capsys, text, reason):
    """json.loads raised RecursionError (or a plain ValueError for a 5,000-digit number) that named no file."""
    annotations = tmp_path / "something-something-v2-train.json"
    annotations.write_text(text)
    code, printed, err = import_command(capsys, "ssv2", "--annotations", str(annotations), "--videos", str(tmp_path),
                                        "--out", str(tmp_path / "out.jsonl"))
    assert code == 2 and printed == ""
    assert err.count("\n") == 1 and err.startswith(f"vlmask data import: {annotations}: invalid JSON ({reason}")
    assert not (tmp_path / "out.jsonl").exists()


def test_folders_a_video_linked_into_two_classes_is_written_once(tmp_path, clip, capsys):
    videos = tmp_path / "clips"
    place(clip, videos / "close_drawer" / "a.mp4")
    (videos / "open_drawer").mkdir()
    (videos / "open_drawer" / "a.mp4").symlink_to(videos / "close_drawer" / "a.mp4")
    out = tmp_path / "folders.jsonl"
    code, printed, _ = import_command(capsys, "folders", "--videos", str(videos), "--out", str(out))
    assert code == 0 and [r["label"] for r in rows(out)] == ["close_drawer"]
    assert f"open_drawer/a.mp4: duplicate video '{(videos / 'close_drawer' / 'a.mp4').resolve()}' (first at close_drawer/a.mp4)" in printed


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, clip, capsys):
    videos = tmp_path / "clips"
    place(clip, videos / "wave" / "a.mp4")
    code, _, err = import_command(capsys, "folders", "--videos", str(videos), "--out", str(videos))
    assert code == 2 and err == f"vlmask data import: --out {videos}: is a folder; name the manifest file to write\n"
    (tmp_path / "report.json").mkdir()
    code, _, err = import_command(capsys, "folders", "--videos", str(videos), "--out", str(tmp_path / "m.jsonl"),
                                  "--report", str(tmp_path / "report.json"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"vlmask data import: --report {tmp_path / 'report.json'}: cannot write (")
    assert len(rows(tmp_path / "m.jsonl")) == 1
