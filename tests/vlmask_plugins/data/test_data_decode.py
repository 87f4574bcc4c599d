"""Frame sampling, decoding with decord and PyAV, and clean failures on broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmask_plugins.data.decode import (
    DecodeError,
    FrameSampler,
    decode_clip,
    probe_video,
    segment_frames,
    short_side_size,
)

# ----------------------------------------------------------------------------- sampling


def test_dynamic_sampling_spreads_frames_over_the_segment():
    sampler = FrameSampler(4, "dynamic")
    assert sampler.indices(0, 16, train=False).tolist() == [2, 6, 10, 14]  # centred in each quarter
    assert sampler.indices(10, 26, train=False).tolist() == [12, 16, 20, 24]
    seen = set()
    for seed in range(20):
        idx = sampler.indices(0, 16, train=True, generator=torch.Generator().manual_seed(seed))
        assert np.all(np.diff(idx) == 4) and 0 <= idx[0] < 4  # evenly spread, random phase
        seen.add(int(idx[0]))
    assert len(seen) > 1
    # The stride adapts to the length: 4 frames over 100 vs over 8.
    assert FrameSampler(4, "dynamic").indices(0, 100, train=False).tolist() == [12, 37, 62, 87]
    assert FrameSampler(4, "dynamic").indices(0, 8, train=False).tolist() == [1, 3, 5, 7]
    # Shorter than N: frames repeat, never leave the segment.
    assert FrameSampler(4, "dynamic").indices(0, 2, train=False).tolist() == [0, 0, 1, 1]


def test_fixed_stride_sampling():
    sampler = FrameSampler(4, "fixed", stride=3)  # span 10
    assert sampler.indices(0, 20, train=False).tolist() == [5, 8, 11, 14]  # centred
    starts = set()
    for seed in range(30):
        idx = sampler.indices(0, 20, train=True, generator=torch.Generator().manual_seed(seed))
        assert np.all(np.diff(idx) == 3) and 0 <= idx[0] <= 10
        starts.add(int(idx[0]))
    assert len(starts) > 3
    # Segment shorter than the span: the last frame repeats (VideoMAE's loader does the same).
    assert sampler.indices(0, 7, train=True).tolist() == [0, 3, 6, 6]


def test_sampler_validates_its_arguments():
    with pytest.raises(ValueError, match="sampling"):
        FrameSampler(4, "random")
    with pytest.raises(ValueError, match="stride"):
        FrameSampler(4, "fixed", stride=0)


def test_segments_and_sizes():
    assert segment_frames(100, 10.0, None, None) == (0, 100)
    assert segment_frames(100, 10.0, 1.0, 2.5) == (10, 25)
    assert segment_frames(100, 10.0, 9.0, 20.0) == (90, 100)
    assert short_side_size(176, 144, 72) == (88, 72)
    assert short_side_size(144, 176, 72) == (72, 88)
    assert short_side_size(176, 144, None) == (176, 144)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decode_to_reduced_size_with_start_and_end(synth, read_rows, backend):
    path = synth[0].parent / read_rows(synth[0])[0]["video"]
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (16, 8.0, 64, 64)
    frames, idx = decode_clip(path, FrameSampler(4), short_side=32, start=1.0, end=2.0, decoder=backend, info=info)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert idx.tolist() == [9, 11, 13, 15]  # frames 8..15 are the second second at 8 fps


def test_backends_agree(synth, read_rows):
    # Short side 48 also exercises decord 0.6's resize bug at width 48 (resized in torch instead).
    path = synth[0].parent / read_rows(synth[0])[1]["video"]
    a, ia = decode_clip(path, FrameSampler(8, "fixed", stride=2), short_side=48, decoder="decord")
    b, ib = decode_clip(path, FrameSampler(8, "fixed", stride=2), short_side=48, decoder="pyav")
    assert ia.tolist() == ib.tolist()
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 4.0  # same frames, different scalers


def test_real_sample_videos_decode(sample_videos):
    for path in sample_videos:
        info = probe_video(path)
        frames, _ = decode_clip(path, FrameSampler(4, "fixed", stride=2), short_side=32, info=info)
        assert frames.shape[0] == 4 and min(frames.shape[1:3]) == 32, path.name
        assert frames.std() > 5, f"{path.name} decoded to a flat image"


@pytest.fixture
def broken(synth, read_rows, tmp_path) -> dict[str, Path]:
    good = synth[0].parent / read_rows(synth[0])[0]["video"]
    data = good.read_bytes()
    files = {
        "truncated": tmp_path / "truncated.mp4",
        "empty": tmp_path / "empty.mp4",
        "text": tmp_path / "text.mp4",
        "garbage": tmp_path / "garbage.mp4",
        "corrupt": tmp_path / "corrupt.mp4",  # intact header, scrambled H.264 payload
    }
    payload, index = data.find(b"mdat") + 4 + 100, data.find(b"moov")
    assert 0 < payload < index
    scrambled = bytes(np.random.default_rng(1).integers(0, 256, index - payload, dtype=np.uint8))
    files["corrupt"].write_bytes(data[:payload] + scrambled + data[index:])
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is a text file, renamed\n" * 30)
    files["garbage"].write_bytes(data[:64] + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    return files


def test_probe_rejects_broken_files_with_a_reason(broken):
    for name, path in broken.items():
        with pytest.raises(DecodeError) as caught:
            probe_video(path)
        assert caught.value.path == str(path) and caught.value.reason, name
    with pytest.raises(DecodeError, match="empty file"):
        probe_video(broken["empty"])


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_decode_raises_decode_error_on_broken_files(broken, backend):
    for name, path in broken.items():
        with pytest.raises(DecodeError):
            decode_clip(path, FrameSampler(4), short_side=32, decoder=backend)


def test_decode_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(DecodeError("/x.mp4", "bad")))
    assert (error.path, error.reason) == ("/x.mp4", "bad")
