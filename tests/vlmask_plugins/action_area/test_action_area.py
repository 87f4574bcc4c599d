"""Action-area detection (MoFo's action area) against the synthetic set's true boxes, and
``fill_boxes`` (kept boxes and fields, skipped lines, the per-clip cache)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlmask_plugins.action_area import register_plugins
from vlmask_plugins.action_area.boxes import boxes_for_training, default_boxes_cache, fill_boxes
from vlmask_plugins.action_area.flow import ActionArea, FlowActionArea
from vlmask_plugins.action_area.measure import box_iou, read_rows
from vlmask_plugins.data.manifest import read_manifest
from vlmask_plugins.data.synthetic import clip_spec, generate, render_clip

#: 12 clips of seed 7: 6 with a camera pan, so both groups hold several clips.
SEED, CLIPS = 7, 12


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("action-area-synth")
    generate(root, clips=CLIPS, seed=SEED, progress=False)
    return root


@pytest.fixture(scope="module")
def rows(synthetic: Path) -> list[dict[str, Any]]:
    return read_rows(synthetic)


def mean_iou_by_pan(detector: FlowActionArea, rows: list[dict[str, Any]]) -> dict[bool, float]:
    ious: dict[bool, list[float]] = {False: [], True: []}
    for row in rows:
        ious[bool(row["camera_pan"])].append(box_iou(detector.detect_file(row["video"]), row["action_box"]))
    return {pan: float(np.mean(values)) for pan, values in ious.items()}


class CountingDetector:
    """Wraps a real detector and counts the clips it is asked to detect (thread-safe)."""

    def __init__(self, inner: FlowActionArea) -> None:
        self.inner = inner
        self.calls = 0
        self._lock = threading.Lock()

    def params(self) -> dict[str, Any]:
        return self.inner.params()

    def detect_file(self, path: str | Path, start: float | None = None, end: float | None = None) -> tuple:
        return self.detect_file_area(path, start, end).box

    def detect_file_area(self, path: str | Path, start: float | None = None, end: float | None = None) -> ActionArea:
        with self._lock:
            self.calls += 1
        return self.inner.detect_file_area(path, start, end)


# ---------------------------------------------------------------------- the detector


def test_register_plugins_registers_flow() -> None:
    seen: list[tuple[str, str, Any]] = []
    register_plugins(lambda kind, name, factory: seen.append((kind, name, factory)))
    assert seen == [("action_area", "flow", FlowActionArea)]


def test_default_method_finds_the_true_boxes_with_and_without_pan(rows: list[dict[str, Any]]) -> None:
    assert 2 <= sum(r["camera_pan"] for r in rows) <= CLIPS - 2, "the test set must hold both groups"
    scores = mean_iou_by_pan(FlowActionArea(), rows)
    assert scores[False] >= 0.8, scores
    assert scores[True] >= 0.8, scores


def test_camera_compensation_matters_under_pan(rows: list[dict[str, Any]]) -> None:
    """Without compensation a pan changes every textured pixel, so the box swells and IoU
    drops; without a pan the two agree (there is no camera motion to remove)."""
    default = mean_iou_by_pan(FlowActionArea(), rows)
    plain = mean_iou_by_pan(FlowActionArea(camera="none"), rows)
    assert plain[True] < default[True] - 0.05, (plain, default)
    assert plain[False] == pytest.approx(default[False], abs=0.05)


def test_a_pan_over_texture_swells_the_uncompensated_box() -> None:
    """The strongest pan over a striped or checkered background among 40 clips (rendered, no
    codec): the plain frame difference boxes the moving texture, the compensated one the object."""
    specs = [clip_spec(SEED, i) for i in range(40)]
    spec = max((s for s in specs if s.background in ("stripes", "checker")),
               key=lambda s: float(np.hypot(*np.subtract(s.camera[-1], s.camera[0]))))
    frames, truth = render_clip(spec)
    plain = FlowActionArea(camera="none").detect(frames)
    compensated = FlowActionArea(camera="dominant").detect(frames)
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    assert area(plain) > 1.5 * area(truth)
    assert box_iou(compensated, truth) > box_iou(plain, truth) + 0.2


def test_detect_on_frames_matches_the_rendered_object() -> None:
    spec = next(clip_spec(SEED, i) for i in range(100)
                if clip_spec(SEED, i).verb == "move right" and not clip_spec(SEED, i).camera_pan)
    frames, truth = render_clip(spec)
    detector = FlowActionArea()
    box = detector.detect(frames)
    assert box_iou(box, truth) >= 0.8, (box, truth)
    # Any input size: frames are brought to a short side of `size` first.
    big = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)
    assert box_iou(detector.detect(big), box) >= 0.9


def test_nothing_moving_falls_back_and_says_so() -> None:
    frames, _ = render_clip(clip_spec(SEED, 0))
    still = np.repeat(frames[:1], 8, axis=0)
    area = FlowActionArea().detect_area(still)
    assert area.fallback and area.box == (0.0, 0.0, 1.0, 1.0) and area.moving_pairs == 0
    assert FlowActionArea(fallback="centre").detect(still) == (0.25, 0.25, 0.75, 0.75)


def test_detection_is_deterministic(rows: list[dict[str, Any]]) -> None:
    detector = FlowActionArea()
    assert detector.detect_file(rows[0]["video"]) == detector.detect_file(rows[0]["video"])


def test_pairs_span_the_segment() -> None:
    detector = FlowActionArea(pairs=4, pair_gap=0.25)
    firsts, seconds = detector.pair_indices(0, 16, fps=8.0)
    assert firsts[0] == 0 and seconds[-1] == 15 and np.all(seconds - firsts == 2)
    firsts, seconds = detector.pair_indices(10, 12, fps=8.0)  # shorter than the gap
    assert firsts.tolist() == [10] and seconds.tolist() == [11]


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"camera": "gyro"}, "camera"),
    ({"evidence": "colour"}, "evidence"),
    ({"camera": "boundaries", "evidence": "intensity"}, "evidence 'intensity'"),
    ({"preset": "slow"}, "preset"),
    ({"pairs": 0}, "pairs"),
    ({"margin": 0.5}, "margin"),
    ({"component_ratio": 1.5}, "component_ratio"),
    ({"min_intensity": -1.0}, "min_intensity"),
])
def test_bad_arguments_are_named(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        FlowActionArea(**kwargs)


# ---------------------------------------------------------------------- fill_boxes


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def manifest(synthetic: Path, tmp_path: Path) -> Path:
    """Four clips without a box (relative paths), one with its own box and unknown fields, an
    invalid JSON line, a missing file and a file that is not a video."""
    folder = tmp_path / "in"
    clips = [json.loads(line) for line in (synthetic / "train.jsonl").read_text().splitlines()][:5]
    lines = []
    for row in clips[:4]:
        row = {k: v for k, v in row.items() if k != "action_box"}
        row["video"] = os.path.relpath(synthetic / row["video"], folder)
        lines.append(json.dumps(row))
    lines.append(json.dumps({"video": str(synthetic / clips[4]["video"]), "action_box": [0.1, 0.2, 0.3, 0.4],
                             "my_field": {"nested": [1, 2]}, "caption": "kept as it is"}))
    lines.append('{"video": "broken.mp4", ')
    lines.append(json.dumps({"video": "missing.mp4"}))
    (folder / "notes.mp4").parent.mkdir(parents=True, exist_ok=True)
    (folder / "notes.mp4").write_text("not a video\n" * 50)
    lines.append(json.dumps({"video": "notes.mp4", "caption": "text"}))
    return write_lines(folder / "manifest.jsonl", lines)


def test_fill_boxes_keeps_boxes_and_fields_and_skips_bad_lines(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "boxes.jsonl"
    stats = fill_boxes(manifest, out, FlowActionArea(), workers=2, cache_dir=tmp_path / "cache", progress=False)
    assert (stats.lines, stats.kept, stats.detected, stats.cached, stats.written) == (8, 1, 4, 0, 5)
    assert [s.line for s in stats.skipped] == [6, 7, 8]
    assert "not a readable video" in stats.skipped[2].reason or "decode" in stats.skipped[2].reason
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[4]["action_box"] == [0.1, 0.2, 0.3, 0.4]
    assert written[4]["my_field"] == {"nested": [1, 2]} and written[4]["caption"] == "kept as it is"
    assert all("camera_pan" in row for row in written[:4])  # unknown fields of detected lines too
    report = read_manifest(out)  # relative paths were rewritten for the new folder
    assert len(report.clips) == 5 and not report.skipped
    assert all(clip.action_box is not None for clip in report.clips)


def test_fill_boxes_caches_per_clip(manifest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # 4 good clips plus the text file named .mp4, which is tried, fails and is not cached.
    first = CountingDetector(FlowActionArea())
    stats = fill_boxes(manifest, tmp_path / "a.jsonl", first, workers=2, cache_dir=cache, progress=False)
    assert first.calls == 5 and stats.detected == 4
    assert len(list(cache.glob("*.json"))) == 4

    second = CountingDetector(FlowActionArea())
    stats = fill_boxes(manifest, tmp_path / "b.jsonl", second, workers=2, cache_dir=cache, progress=False)
    assert second.calls == 1 and (stats.cached, stats.detected) == (4, 0)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()

    other_params = CountingDetector(FlowActionArea(pairs=5))
    fill_boxes(manifest, tmp_path / "c.jsonl", other_params, workers=1, cache_dir=cache, progress=False)
    assert other_params.calls == 5

    row = json.loads(manifest.read_text().splitlines()[0])
    video = (manifest.parent / row["video"]).resolve()
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    third = CountingDetector(FlowActionArea())
    stats = fill_boxes(manifest, tmp_path / "d.jsonl", third, workers=2, cache_dir=cache, progress=False)
    assert third.calls == 2 and (stats.cached, stats.detected) == (3, 1)


def test_fill_boxes_default_cache_is_under_vlmask_cache(isolated_cache: Path) -> None:
    assert default_boxes_cache() == isolated_cache / "boxes"


def test_boxes_for_training_fills_a_cached_copy_with_every_line_at_its_number(manifest: Path, tmp_path: Path) -> None:
    """What the built-in plugin's ``vlmask_fill_requirement`` does before training: the source is
    left alone, the copy lives in the cache, and a run's skipped-line report names the source's
    line numbers (the dataset reads the copy)."""
    import warnings

    from vlmask_plugins.data.dataset import VideoManifestDataset

    source_text = manifest.read_text()
    cache = tmp_path / "cache"
    filled = boxes_for_training(manifest, cache, progress=False)
    assert manifest.read_text() == source_text
    assert filled.path.parent == cache / "boxes" / "manifests" and filled.path.name.startswith("manifest-")
    counts = filled.counts
    assert [counts[k] for k in ("lines", "kept", "detected", "from_cache", "failed")] == [6, 1, 4, 0, 1]
    assert "4 detected, 0 from cache, 1 failed" in filled.summary
    lines = filled.path.read_text().splitlines()
    assert len(lines) == 8 and lines[5] == '{"video": "broken.mp4", '
    assert json.loads(lines[6])["video"] == str(manifest.parent / "missing.mp4")  # the reason names the real file
    assert "action_box" not in json.loads(lines[7])  # detection failed: kept unfilled, the probe skips it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = [VideoManifestDataset(str(path), num_frames=4, size=32, train=False) for path in (manifest, filled.path)]
    assert [s.line for s in read[0].skipped] == [s.line for s in read[1].skipped] == [6, 7, 8]
    assert len(read[1]) == 5 and all(clip.action_box is not None for clip in read[1].clips)

    again = boxes_for_training(manifest, cache, progress=False)  # a second run detects nothing
    assert again.path == filled.path and (again.counts["detected"], again.counts["from_cache"]) == (0, 4)
    assert again.path.read_text() == "\n".join(lines) + "\n"
    other = boxes_for_training(manifest, cache, progress=False, detector=FlowActionArea(pairs=5))
    assert other.path != filled.path and other.counts["detected"] == 4  # keyed by the detector's settings
