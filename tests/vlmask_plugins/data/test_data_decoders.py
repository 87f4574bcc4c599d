"""The three decoders (PyAV with seeking, decord, torchcodec) pick the same frames by one rule.

Videos are encoded at test time with PyAV (H.264 and VP9, constant and variable frame rate, a
long file with a keyframe every 2 s) and every frame shows its own number
(``vlmask_plugins.data.numbered``), so the test reads back which frame each decoder returned and
compares it with the rule computed here from the known presentation times. The real sample
videos of the test extras are compared pixel for pixel at their own size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmask_plugins.data.decode import (
    DECODERS,
    DecoderUnavailableError,
    FrameSampler,
    _decode_pyav,
    decode_clip,
    decord_available,
    probe_video,
    resolve_decoder,
    segment_frames,
    slot_times,
    torchcodec_available,
)
from vlmask_plugins.data.numbered import read_frame_numbers

ROOT = Path(__file__).resolve().parents[3]
AVAILABLE = ["pyav"] + [name for name, ok in (("decord", decord_available()), ("torchcodec", torchcodec_available())) if ok]
FPS = 10
#: Irregular presentation times (seconds) of the variable-frame-rate files: steps of 30-170 ms.
VFR_PTS = np.round(np.cumsum(np.r_[0.0, np.random.default_rng(5).choice([0.03, 0.07, 0.1, 0.13, 0.17], 79)]), 3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, encode_videos) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, presentation time of each frame in seconds)."""
    root = tmp_path_factory.mktemp("numbered")
    cfr = np.arange(120) / FPS
    jobs = {
        "h264": (dict(path=str(root / "cfr.mp4"), frames=120, fps=FPS), cfr),
        "vp9": (dict(path=str(root / "cfr.webm"), frames=120, fps=FPS, codec="vp9"), cfr),
        "vfr-mp4": (dict(path=str(root / "vfr.mp4"), frames=len(VFR_PTS), fps=FPS, pts_seconds=VFR_PTS.tolist()), VFR_PTS),
        # Matroska keeps the first pts as written: the stream starts at 2.5 s.
        "vfr-mkv-offset": (dict(path=str(root / "vfr.mkv"), frames=len(VFR_PTS), fps=FPS,
                                pts_seconds=(VFR_PTS + 2.5).tolist()), VFR_PTS + 2.5),
        # 90 s, a keyframe every 2 s.
        "long": (dict(path=str(root / "long.mp4"), frames=90 * FPS, fps=FPS, gop_seconds=2.0), np.arange(900) / FPS),
    }
    encode_videos([job for job, _ in jobs.values()])
    return {name: (Path(job["path"]), pts) for name, (job, pts) in jobs.items()}


def expected_frames(pts: np.ndarray, indices: np.ndarray, info) -> list[int]:
    """The rule, computed independently: the last frame whose pts is at or before the slot time."""
    times = info.start + (indices + 0.5) / info.fps
    return [int(max(0, np.searchsorted(pts, t + 1e-9, side="right") - 1)) for t in times]


SEGMENTS = [(None, None), (1.0, 3.0), (3.3, None), (0.0, 0.4)]


@pytest.mark.parametrize("decoder", AVAILABLE)
@pytest.mark.parametrize("name", ["h264", "vp9", "vfr-mp4", "vfr-mkv-offset"])
def test_every_decoder_picks_the_frames_of_the_rule(videos, name, decoder):
    path, pts = videos[name]
    info = probe_video(path)
    for start, end in SEGMENTS:
        for sampler in (FrameSampler(8), FrameSampler(4, "fixed", stride=3)):
            frames, indices = decode_clip(path, sampler, start=start, end=end, decoder=decoder, info=info)
            assert read_frame_numbers(frames) == expected_frames(pts, indices, info), (name, decoder, start, end)


@pytest.mark.parametrize("decoder", AVAILABLE)
def test_late_segment_of_a_long_file(videos, decoder):
    path, pts = videos["long"]
    info = probe_video(path)
    assert (info.num_frames, info.fps) == (900, 10.0)
    frames, indices = decode_clip(path, FrameSampler(16), start=80.0, end=82.0, decoder=decoder, info=info,
                                  short_side=16)
    assert indices.min() >= 800 and indices.max() < 820
    assert read_frame_numbers(frames) == expected_frames(pts, indices, info) == indices.tolist()


def test_pyav_seeks_instead_of_decoding_from_the_start(videos):
    """A 2 s segment at 80 s decodes about one keyframe interval plus the segment, not 800 frames."""
    path, _ = videos["long"]
    info = probe_video(path)
    first, stop = segment_frames(info.num_frames, info.fps, 80.0, 82.0)
    times = slot_times(FrameSampler(16).indices(first, stop, train=False), info)
    stats: dict[str, int] = {}
    frames = _decode_pyav(path, times, 64, 32, stats)
    assert read_frame_numbers(frames) == [int(round((t - 0.05) * FPS)) for t in times]
    assert stats["seeks"] == 1 and stats["decoded"] <= 2 * FPS + 20 + 1, stats  # <= one GOP + the segment
    # Frames far apart (16 over the whole 90 s): seeks again across gaps instead of decoding all 900.
    stats = {}
    times = slot_times(FrameSampler(16).indices(0, info.num_frames, train=False), info)
    frames = _decode_pyav(path, times, 64, 32, stats)
    assert read_frame_numbers(frames) == [int(round((t - 0.05) * FPS)) for t in times]
    assert stats["seeks"] == 16 and stats["decoded"] < 16 * (2 * FPS + 1), stats


def test_real_sample_videos_decode_identically(sample_videos):
    """At the file's own size the decoders return the same pixels (same frames, same colour
    conversion); resized, each uses its own scaler (checked loosely)."""
    if len(AVAILABLE) < 2:
        pytest.skip("only PyAV is installed")
    for path in sample_videos:
        info = probe_video(path)
        for start, end in ((None, None), (0.5, 1.7)):
            decoded = {d: decode_clip(path, FrameSampler(6), start=start, end=end, decoder=d, info=info)[0]
                       for d in AVAILABLE}
            for name, frames in decoded.items():
                difference = np.abs(frames.astype(np.int16) - decoded["pyav"]).mean()
                assert difference < 0.5, f"{path.name} [{start}, {end}): {name} differs from pyav by {difference:.2f}"
            small = {d: decode_clip(path, FrameSampler(6), short_side=32, decoder=d, info=info)[0] for d in AVAILABLE}
            for name, frames in small.items():
                assert np.abs(frames.astype(np.int16) - small["pyav"]).mean() < 4.0, (path.name, name)


def test_resolve_decoder_rules():
    assert resolve_decoder("pyav") == ("pyav", "data.dataset.decoder=pyav")
    assert resolve_decoder("auto") == ("pyav", "auto: pyav, the fastest decoder measured, see benchmarks/README.md")
    with pytest.raises(DecoderUnavailableError, match=r"^data\.dataset\.decoder: unknown decoder 'opencv'; choose one of auto, pyav, decord, torchcodec$"):
        resolve_decoder("opencv")
    assert DECODERS == ("auto", "pyav", "decord", "torchcodec")


def _without(modules: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python in which ``modules`` cannot be imported."""
    block = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", block + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


AUTO_PROBE = """
import json
from vlmask_plugins.data.decode import resolve_decoder, decode_clip, FrameSampler, DecoderUnavailableError
from vlmask_plugins.data.numbered import read_frame_numbers
out = {{}}
try:
    out["name"], out["reason"] = resolve_decoder("auto")
    frames, idx = decode_clip({path!r}, FrameSampler(8), start=60.0, end=62.0, decoder="auto")
    out["numbers"], out["idx"] = read_frame_numbers(frames), idx.tolist()
except DecoderUnavailableError as error:
    out["auto_error"] = str(error)
out["imported"] = sorted(m for m in ("decord", "torchcodec") if sys.modules.get(m) is not None)
try:
    resolve_decoder("decord")  # imports decord when it can
except DecoderUnavailableError as error:
    out["decord_error"] = str(error)
print(json.dumps(out))
"""


def test_auto_picks_pyav_whatever_else_imports_and_never_imports_decord(videos, tmp_path):
    """Issue 22: ``auto`` is PyAV, the fastest decoder measured on every case of
    benchmarks/decoding.py (decord 0.6 took 1.4-3.4x as long, and its tracker has segfaults and
    hangs), so a run with ``auto`` must not even import decord or torchcodec, installed or not.
    Each case is a fresh Python in which the named modules cannot be imported; without PyAV
    (``av``, which probing needs too) ``auto`` is a one-line error naming the key."""
    path, _ = videos["long"]
    everything = ["decord", "torchcodec", "torchcodec.decoders"]
    for blocked in ([], ["decord"], everything):
        result = _without(blocked, AUTO_PROBE.format(path=str(path)), tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert (out["name"], out["reason"]) == resolve_decoder("auto"), blocked
        assert out["numbers"] == out["idx"] and 600 <= min(out["idx"])
        assert out["imported"] == [], f"auto imported {out['imported']} (blocked: {blocked})"
        if "decord" in blocked:
            assert out["decord_error"].startswith("data.dataset.decoder: 'decord' is not available here (")
            assert "\n" not in out["decord_error"]
    result = _without(["av"], AUTO_PROBE.format(path=str(path)), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["auto_error"].startswith("data.dataset.decoder: auto decodes with PyAV, which does not import here (")
    assert out["auto_error"].endswith("); install av (pip install av), which probing needs too")
    assert "\n" not in out["auto_error"]


FORKED_AFTER_DECODING = """
import json, sys
import torch
from torch.utils.data import DataLoader, Dataset
from vlmask_plugins.data.decode import FrameSampler, decode_clip
from vlmask_plugins.data.numbered import read_frame_numbers

paths = json.loads(sys.argv[1])

class Clips(Dataset):
    def __len__(self):
        return len(paths)
    def __getitem__(self, index):
        frames, indices = decode_clip(paths[index], FrameSampler(4), short_side=32, decoder="pyav")
        return torch.tensor(read_frame_numbers(frames) == indices.tolist())

decode_clip(paths[0], FrameSampler(4), short_side=32, decoder="pyav")  # the parent converts frames first
loader = DataLoader(Clips(), batch_size=2, num_workers=2, multiprocessing_context="fork")
print("right frames", sum(int(batch.sum()) for batch in loader), "of", len(paths), flush=True)
"""


def test_pyav_decodes_in_forked_workers_after_the_parent_decoded(videos, tmp_path):
    """With ``auto`` now PyAV, ``vlmask run`` (default ``num_workers: 2``) hung for ever before
    its first step: the main process had converted frames with PyAV's default multi-threaded
    swscale, and every forked DataLoader worker then blocked in ``sws_scale_frame``. PyAV scales
    on one thread now. A fresh process group, so that hung workers can be killed."""
    paths = [str(videos[name][0]) for name in ("h264", "vp9", "long")]
    run = subprocess.Popen([sys.executable, "-c", FORKED_AFTER_DECODING, json.dumps(paths)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"),
                                                                            os.environ.get("PYTHONPATH", "")])})
    try:
        out, err = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        pytest.fail("the forked DataLoader workers hung decoding with PyAV")
    assert run.returncode == 0, err[-2000:]
    assert out.strip() == "right frames 3 of 3"


def test_fils_runs_without_decord_or_torchcodec(tiny_synth, tiny_scale, tmp_path):
    """The full path (dataset, PyAV decoding, a FILS run) with neither decord nor torchcodec importable."""
    train, val = tiny_synth
    arguments = ["run", str(ROOT / "recipes" / "fils.yaml"), *tiny_scale, "train.max_steps=2",
                 f"data.train={train}", f"data.val={val}", f"run.dir={tmp_path / 'run'}"]
    code = f"""
from vlmask.cli import main
code = main({arguments!r})
assert sys.modules.get("decord") is None, "decord was imported"
raise SystemExit(code)
"""
    result = _without(["decord", "torchcodec", "torchcodec.decoders"], code, tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
