"""Decoding speed of the decoders (a segment of a long file; whole training clips, which sets the
order of ``data.dataset.decoder: auto``), and the loader with uint8 vs float32 clips.

    python benchmarks/decoding.py [--parts segments,auto,loader] [--reps 7] [--minutes 4]
                                  [--rounds 4] [--auto-rounds 5] [--workdir DIR] [--out FILE.json]

Part 1, decoders. A ``--minutes`` (default 4) long H.264 file at 320 x 240, 25 fps, a keyframe
every 2 s (``vlmask_plugins.data.numbered``: every frame shows its number), written once to
``--workdir``. For an early (2-4 s) and a late (230-232 s: 10 s before the end) 2 s segment, 16 frames (dynamic
sampling, evaluation phase) decoded to a short side of 224 by ``decode_clip`` with each decoder
that imports here (``pyav`` seeks to the keyframe before the segment; ``decord``;
``torchcodec``), plus ``pyav_from_start``, the previous PyAV path (decode sequentially from the
first frame to the last wanted one) for reference. Each case is timed ``--reps`` times,
interleaved, wall clock; the median is reported, and the frames each decoder returned are
checked to be the same frames (their numbers read back).

Part 2, loader. The synthetic set (48 clips of 16 frames at 64 x 64) through a torch DataLoader
with 2 workers (batch 8, evaluation transforms) for ``--epochs`` epochs: ``uint8`` is the
dataset as it is (uint8 clips through shared memory, normalised by ``Batch.to`` in the main
process: on a GPU machine, after the host-to-device copy), ``float32`` normalises in the workers
(the previous behaviour) and ships float32 clips. Clips/s and the ratio, alternating the two
``--rounds`` times; medians.

Part 3, ``auto`` (issue 22: which decoder ``auto`` should prefer, decided by measurement).
Clips/s of ``decode_clip`` exactly as the training dataset calls it (``train=True``, the file's
probed ``info`` passed, one thread, each clip a different file opened afresh) for every decoder
that imports, on real H.264 files encoded here with PyAV as a camera or YouTube file would be
(libx264 ``preset=fast``, ``crf=23``, B-frames, a keyframe every 2 s, 25 fps; a panning texture
with noise, about 300 kb/s at 298 x 224, and a band of stripes showing each frame's number, read
back to check that every decoder returns the same frames). Four cases:

* ``short_224``: 8 files of 2 s at 298 x 224 (short side 224, the paper recipes' size), 16 frames
  spread over the whole clip (``dynamic``);
* ``long_224_dynamic``: 4 files of 60 s at 298 x 224, 16 frames spread over the whole minute;
* ``long_224_fixed``: the same files, 16 frames at stride 4 (VideoMAE's sampling: a 2.4 s window
  at a random place in the minute);
* ``short_64``: 8 files of 2 s at 64 x 64 (the demo recipes and the built-in synthetic set).

Rounds alternate the decoders' order; a round decodes every file of a case with each decoder,
as many passes as ``AUTO_CASES`` says (so that a round lasts about a second; the same random
frames for each decoder: one generator seed per round, pass and file). Medians of the
rounds' clips/s, the ratio of each decoder to PyAV per case, and ``ranking``: the decoders by
the geometric mean over the cases of their clips/s relative to PyAV.

The record goes to ``--out`` (default ``benchmarks/results/decoding-<date>-<time>.json``) and
stdout, with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from vlmask.types import normalize_video  # noqa: E402
from vlmask_plugins.data.dataset import VideoManifestDataset  # noqa: E402
from vlmask_plugins.data.decode import (  # noqa: E402
    FrameSampler,
    decode_clip,
    decord_available,
    probe_video,
    segment_frames,
    short_side_size,
    slot_times,
    torchcodec_available,
)
from vlmask_plugins.data.numbered import numbered_frame, read_frame_numbers, write_numbered_video  # noqa: E402
from vlmask_plugins.data.synthetic import generate  # noqa: E402

FPS = 25



def decode_from_start(path: Path, times: np.ndarray, width: int, height: int) -> np.ndarray:
    """The previous PyAV path: decode from the first frame, keep the frames presented at ``times``."""
    import av

    wanted, chosen = sorted(set(times.tolist())), {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        previous, position = None, 0
        for frame in container.decode(stream):
            now = float(frame.pts * stream.time_base)
            while position < len(wanted) and wanted[position] < now:
                chosen[wanted[position]] = previous
                position += 1
            if position == len(wanted):
                break
            previous = frame
    return np.stack([chosen[t].to_ndarray(width=width, height=height, format="rgb24") for t in times.tolist()])


def bench_decoders(path: Path, reps: int) -> dict[str, Any]:
    info = probe_video(path)
    width, height = short_side_size(info.width, info.height, 224)
    decoders = ["pyav"] + [d for d, ok in (("decord", decord_available()), ("torchcodec", torchcodec_available())) if ok]
    sampler = FrameSampler(16)
    seconds = info.num_frames / info.fps
    segments = {"early": (2.0, 4.0), "late": (seconds - 10.0, seconds - 8.0)}  # 230-232 s of a 4-minute file
    cases: dict[str, Any] = {}
    for segment, (start, end) in segments.items():
        first, stop = segment_frames(info.num_frames, info.fps, start, end)
        indices = sampler.indices(first, stop, train=False)
        times = slot_times(indices, info)
        runs = {d: (lambda d=d: decode_clip(path, sampler, short_side=224, start=start, end=end, decoder=d, info=info)[0])
                for d in decoders}
        runs["pyav_from_start"] = lambda: decode_from_start(path, times, width, height)
        numbers = {name: read_frame_numbers(run()) for name, run in runs.items()}  # warm-up and check
        assert all(n == indices.tolist() for n in numbers.values()), numbers
        timings: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(reps):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                begin = time.perf_counter()
                runs[name]()
                timings[name].append((time.perf_counter() - begin) * 1000)
        cases[segment] = {name: {"median_ms": round(statistics.median(t), 2), "ms": [round(x, 2) for x in t]}
                          for name, t in timings.items()}
        print(f"{segment:5s} " + "  ".join(f"{n} {v['median_ms']:.1f} ms" for n, v in cases[segment].items()), file=sys.stderr)
    ratios = {name: round(cases["late"][name]["median_ms"] / cases["early"][name]["median_ms"], 2) for name in cases["late"]}
    versus = {f"{other}_over_pyav_{seg}": round(cases[seg]["pyav"]["median_ms"] / cases[seg][other]["median_ms"], 2)
              for seg in segments for other in cases[seg] if other != "pyav"}
    return {"file": {"seconds": info.num_frames / info.fps, "fps": info.fps, "size": f"{info.width}x{info.height}",
                     "gop_seconds": 2.0, "codec": "h264"},
            "frames": 16, "short_side": 224, "decoders": decoders, "segments": segments, "cases": cases,
            "late_over_early": ratios, "pyav_ms_over_other_ms": versus}


class Float32Items(Dataset):
    """The previous behaviour: the clip normalised to float32 in the worker."""

    def __init__(self, dataset: VideoManifestDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        item["video"] = normalize_video(item["video"].unsqueeze(0), self.dataset.mean, self.dataset.std)[0]
        return item


def bench_loader(workdir: Path, rounds: int, epochs: int) -> dict[str, Any]:
    train, _ = generate(workdir / "synthetic", clips=64, seed=0, frames=16, size=64, progress=False)
    dataset = VideoManifestDataset(str(train), num_frames=16, size=64, train=False, hflip=False)
    sets = {"uint8": dataset, "float32": Float32Items(dataset)}
    clips_per_s: dict[str, list[float]] = {name: [] for name in sets}
    bytes_per_clip: dict[str, int] = {}
    for rep in range(rounds):
        for name in (list(sets) if rep % 2 == 0 else list(reversed(sets))):
            loader = DataLoader(sets[name], batch_size=8, num_workers=2, collate_fn=dataset.collate, prefetch_factor=2,
                                persistent_workers=False)
            count, begin = 0, time.perf_counter()
            for _ in range(epochs):
                for batch in loader:
                    bytes_per_clip[name] = batch.video[0].numel() * batch.video.element_size()
                    moved = batch.to("cpu")  # uint8 -> normalised float32 here; float32 passes through
                    assert moved.video.dtype == torch.float32
                    count += batch.size
            clips_per_s[name].append(count / (time.perf_counter() - begin))
            del loader
    medians = {name: round(statistics.median(v), 1) for name, v in clips_per_s.items()}
    ratios = [a / b for a, b in zip(clips_per_s["uint8"], clips_per_s["float32"])]
    return {"clips": len(dataset), "clip": "16 x 64 x 64", "workers": 2, "batch_size": 8, "epochs_per_round": epochs,
            "clips_per_s": {name: [round(x, 1) for x in v] for name, v in clips_per_s.items()},
            "median_clips_per_s": medians, "bytes_per_clip": bytes_per_clip,
            "uint8_over_float32": round(medians["uint8"] / medians["float32"], 2),
            "median_round_ratio": round(statistics.median(ratios), 2)}


#: Part 3's cases: (files, seconds, width, height, sampling, passes). A round decodes every file
#: ``passes`` times (other random frames each pass), so that a round of the short cases lasts
#: about a second, not the few milliseconds a busy machine's scheduler turns into noise.
AUTO_CASES: dict[str, tuple[int, float, int, int, str, int]] = {
    "short_224": (8, 2.0, 298, 224, "dynamic", 8),
    "long_224_dynamic": (4, 60.0, 298, 224, "dynamic", 1),
    "long_224_fixed": (4, 60.0, 298, 224, "fixed", 4),
    "short_64": (8, 2.0, 64, 64, "dynamic", 32),
}


def write_camera_like_video(path: Path, seconds: float, width: int, height: int, seed: int) -> Path:
    """An H.264 file shaped like real footage rather than a test pattern: a random texture panning
    2 px per frame plus noise (real motion, and about 300 kb/s at 298 x 224, near the bitrate of a
    Kinetics-sized copy; a clean pattern would encode to a fraction of that),
    libx264 preset fast, crf 23, B-frames on, a keyframe every 2 s, 25 fps. The top quarter shows
    the frame's number as stripes (``numbered_frame``), for :func:`band_numbers`."""
    import av

    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, height // 2 + 2, width + 2)).astype(np.float32))
    texture = torch.nn.functional.interpolate(coarse, size=(height, 2 * width), mode="bicubic", align_corners=False)
    texture = texture.clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    band = max(8, height // 4)
    frames = int(round(seconds * FPS))
    partial = path.with_suffix(".part.mp4")
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "fast", "crf": "23", "g": str(2 * FPS), "keyint_min": str(2 * FPS)}
        for k in range(frames):
            frame = np.roll(texture, -2 * k, axis=1)[:, :width].astype(np.int16)
            frame += rng.integers(-8, 9, frame.shape, dtype=np.int16)
            frame = np.clip(frame, 0, 255).astype(np.uint8)
            frame[:band] = numbered_frame(k, width, band)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)
    return path


def band_numbers(frames: np.ndarray) -> list[int]:
    """The frame numbers shown in the top band of :func:`write_camera_like_video`'s frames."""
    band = max(8, frames.shape[1] // 4)
    return read_frame_numbers(frames[:, 2:band - 2])


def bench_auto(workdir: Path, rounds: int) -> dict[str, Any]:
    decoders = ["pyav"] + [d for d, ok in (("decord", decord_available()), ("torchcodec", torchcodec_available())) if ok]
    unavailable = {d: why for d, module in (("decord", "decord"), ("torchcodec", "torchcodec.decoders"))
                   if (why := _why(module))}
    cases: dict[str, Any] = {}
    for case, (count, seconds, width, height, sampling, passes) in AUTO_CASES.items():
        folder = workdir / "auto"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(count):
            path = folder / f"{seconds:g}s-{width}x{height}-{i}.mp4"
            if not path.is_file():
                print(f"encoding {path} ...", file=sys.stderr)
                write_camera_like_video(path, seconds, width, height, seed=i)
            paths.append(path)
        infos = [probe_video(path, decode=False) for path in paths]
        sampler = FrameSampler(16, sampling, stride=4)

        def decode(name: str, index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
            generator = torch.Generator().manual_seed(seed)
            return decode_clip(paths[index], sampler, train=True, short_side=min(width, height),
                               decoder=name, info=infos[index], generator=generator)

        for name in decoders:  # warm-up, and every decoder returns the frames it was asked for
            for index in range(count):
                frames, indices = decode(name, index, seed=index)
                assert band_numbers(frames) == indices.tolist(), (case, name, index)
        per_round: dict[str, list[float]] = {name: [] for name in decoders}
        for round_ in range(rounds):
            for name in (decoders if round_ % 2 == 0 else list(reversed(decoders))):
                begin = time.perf_counter()
                for pass_ in range(passes):
                    for index in range(count):
                        decode(name, index, seed=100_000 * (round_ + 1) + 1000 * pass_ + index)
                per_round[name].append(passes * count / (time.perf_counter() - begin))
        medians = {name: round(statistics.median(v), 2) for name, v in per_round.items()}
        cases[case] = {
            "files": count, "passes_per_round": passes, "seconds": seconds, "size": f"{width}x{height}",
            "sampling": sampling, "frames": 16,
            "bytes_per_file": round(statistics.mean(p.stat().st_size for p in paths)),
            "kbit_per_s": round(statistics.mean(p.stat().st_size for p in paths) * 8 / seconds / 1000),
            "clips_per_s": {name: [round(x, 2) for x in v] for name, v in per_round.items()},
            "median_clips_per_s": medians,
            "over_pyav": {name: round(medians[name] / medians["pyav"], 2) for name in decoders},
        }
        print(f"{case:17s} " + "  ".join(f"{n} {v:.1f} clips/s" for n, v in medians.items()), file=sys.stderr)
    geomean = {name: round(math.exp(statistics.mean(math.log(c["over_pyav"][name]) for c in cases.values())), 2)
               for name in decoders}
    return {"decoders": decoders, "unavailable": unavailable, "rounds": rounds, "threads": 1,
            "encoding": {"codec": "h264 (libx264)", "preset": "fast", "crf": 23, "bframes": "x264 default",
                         "gop_seconds": 2.0, "fps": FPS},
            "cases": cases, "geomean_over_pyav": geomean,
            "ranking": sorted(decoders, key=lambda name: -geomean[name])}


def _why(module: str) -> str | None:
    """Why ``module`` does not import here (None when it does)."""
    from vlmask_plugins.data.decode import _import_error

    return _import_error(module)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("av", "decord", "torchcodec"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--auto-rounds", type=int, default=5)
    parser.add_argument("--parts", default="segments,auto,loader",
                        help="which parts to run, comma-separated: segments (part 1), auto (part 3), loader (part 2)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vlmask-bench-decoding"))
    parser.add_argument("--out")
    args = parser.parse_args()
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not parts or parts - {"segments", "auto", "loader"}:
        parser.error(f"--parts: choose from segments, auto, loader; got {args.parts!r}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    record: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"), "machine": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "versions": _versions(), "load_before": os.getloadavg(),
    }
    if "segments" in parts:
        frames = int(round(args.minutes * 60 * FPS))
        path = workdir / f"long-{frames}f-320x240-gop2s.mp4"
        if not path.is_file():
            print(f"encoding {path} ({args.minutes} min) ...", file=sys.stderr)
            write_numbered_video(path.with_suffix(".part.mp4"), frames, fps=FPS, width=320, height=240, gop_seconds=2.0)
            path.with_suffix(".part.mp4").rename(path)
        record["decoders"] = bench_decoders(path, args.reps)
    if "auto" in parts:
        record["auto"] = bench_auto(workdir, args.auto_rounds)
    if "loader" in parts:
        record["loader"] = bench_loader(workdir, args.rounds, args.epochs)
    record["load_after"] = os.getloadavg()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"decoding-{datetime.now():%Y%m%d-%H%M}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
