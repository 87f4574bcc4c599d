"""The machinery shared by the manifest fillers: ``fill_manifest``, ``ClipJsonCache``, ``run_per_clip``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vlmask_plugins.data.fill import ClipJsonCache, ManifestLine, fill_manifest, manifest_paths, run_per_clip
from vlmask_plugins.data.manifest import SkippedClip, read_manifest


class Counts:
    def __init__(self) -> None:
        self.lines = 0
        self.written = 0
        self.skipped: list[SkippedClip] = []


def test_fill_manifest_relocates_skips_and_fills_in_order(synth: tuple[Path, Path], tmp_path: Path) -> None:
    train = synth[0]
    source = tmp_path / "in" / "source.jsonl"  # relative videos, rewritten relative to this folder
    source.parent.mkdir()
    rows = [json.loads(line) for line in train.read_text().splitlines()][:4]
    for row in rows:
        row["video"] = os.path.relpath(train.parent / row["video"], source.parent)
    lines = [json.dumps(rows[0]), "{not json", json.dumps(rows[1]), "", json.dumps({"video": "gone.mp4"}),
             json.dumps({**rows[2], "size": 7}), json.dumps({**rows[3], "fail": True})]
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out" / "filled.jsonl"
    counts = Counts()

    def select(line: ManifestLine) -> bool:
        return "size" not in line.row

    def work(line: ManifestLine) -> int:
        if line.row.get("fail"):
            raise OSError("disk on fire")
        return line.clip.video.stat().st_size

    def store(line: ManifestLine, size: int) -> None:
        line.out["size"] = size

    fill_manifest(source, target, counts, select, work, store, label="sizes", verb="sizing", workers=2, progress=False)
    assert (counts.lines, counts.written) == (6, 3)
    assert [(s.line, s.video) for s in counts.skipped] == [(2, None), (5, "gone.mp4"), (7, os.path.relpath(
        (source.parent / rows[3]["video"]).resolve(), target.parent.resolve()))]
    assert counts.skipped[2].reason == "sizing failed (OSError: disk on fire)"
    written = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["size"] for row in written] == [(source.parent / rows[0]["video"]).stat().st_size,
                                                (source.parent / rows[1]["video"]).stat().st_size, 7]
    assert [clip.video.resolve() for clip in read_manifest(target).clips] == [
        (source.parent / rows[i]["video"]).resolve() for i in range(3)]


def test_manifest_paths_names_a_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        manifest_paths(tmp_path / "nope.jsonl", tmp_path / "out.jsonl")


def test_clip_json_cache_keys_on_file_segment_and_params(synth: tuple[Path, Path], tmp_path: Path) -> None:
    clip = read_manifest(synth[0]).clips[0]
    cache = ClipJsonCache(tmp_path / "cache", {"model": "a"})
    key = cache.key(clip)
    assert cache.get(key, lambda entry: entry["value"]) is None
    cache.put(key, {"value": 3})
    assert cache.get(key, lambda entry: entry["value"]) == 3
    assert cache.get(key, lambda entry: entry["missing"]) is None  # a parse that rejects the entry is a miss
    assert ClipJsonCache(tmp_path / "cache", {"model": "b"}).get(ClipJsonCache(tmp_path / "cache", {"model": "b"}).key(clip),
                                                                 lambda entry: entry["value"]) is None
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return 5

    def parse(entry: dict[str, Any]) -> int:
        return int(entry["value"])

    assert cache.get_or_compute(clip, compute, parse, lambda v: {"value": v}) == (3, True) and not calls
    other = ClipJsonCache(tmp_path / "cache", {"model": "c"})
    assert other.get_or_compute(clip, compute, parse, lambda v: {"value": v}) == (5, False)
    assert other.get_or_compute(clip, compute, parse, lambda v: {"value": v}) == (5, True) and len(calls) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


@pytest.mark.parametrize("workers", [1, 3])
def test_run_per_clip_returns_file_errors_and_raises_others(workers: int) -> None:
    def work(number: int) -> int:
        if number == 2:
            raise OSError("gone")
        return number * 10

    results = dict(run_per_clip([1, 2, 3], work, workers, progress=False, description="x"))
    assert results[1] == 10 and results[3] == 30 and isinstance(results[2], OSError)

    def broken(number: int) -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        list(run_per_clip([1, 2], broken, workers, progress=False, description="x"))
