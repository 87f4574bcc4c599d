"""torchcodec's CUDA decoder (NVDEC) against CPU decoding: clips/s at 16 x 224 (issue 10).

    python benchmarks/cuda_decoding.py [--clips 8] [--seconds 10] [--reps 3] [--workdir DIR] [--out FILE.json]

Written for a session that is lent a GPU (``benchmarks/gpu_session.sh`` runs it); on a machine
without CUDA it measures the CPU side only and says so in the record. Never run on a GPU yet:
no GPU was lent to the task that wrote it.

Files: ``--clips`` H.264 clips of ``--seconds`` (default 10 s, a Kinetics clip's length) at
25 fps, a keyframe every 2 s, every frame showing its number (``vlmask_plugins.data.numbered``),
at 640 x 360 and at 1280 x 720, written once to ``--workdir``. Each clip is decoded to 16 frames
(dynamic sampling, evaluation phase) at a short side of 224 by ``decode_clip`` with
``decoder="torchcodec"`` on ``device="cpu"`` and ``device="cuda"``, and with the ``pyav`` and
``decord`` decoders where they import (CPU). One pass decodes every clip once; ``--reps``
passes per case, interleaved; clips/s of the median pass. The frame numbers read back are
checked to be the same for every case (the same frames, whichever decoder and device).
The CUDA figure includes copying the frames back to the host (``decode_clip`` returns numpy):
what a training loader with ``decode_device: cuda`` gets, less the copy it then does not need.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from vlmask_plugins.data.decode import FrameSampler, decode_clip, decord_available, probe_video, torchcodec_available  # noqa: E402
from vlmask_plugins.data.numbered import read_frame_numbers, write_numbered_video  # noqa: E402

FPS = 25
SIZES = ((640, 360), (1280, 720))


def make_clips(workdir: Path, clips: int, seconds: float, width: int, height: int) -> list[Path]:
    folder = workdir / f"{width}x{height}-{seconds:g}s"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(clips):
        path = folder / f"clip{i:02d}.mp4"
        if not path.exists():
            write_numbered_video(path, frames=int(seconds * FPS), fps=FPS, width=width, height=height,
                                 gop_seconds=2.0, seed=i)
        paths.append(path)
    return paths


def cases() -> dict[str, dict[str, str]]:
    found = {"pyav_cpu": {"decoder": "pyav", "device": "cpu"}}
    if decord_available():
        found["decord_cpu"] = {"decoder": "decord", "device": "cpu"}
    if torchcodec_available():
        found["torchcodec_cpu"] = {"decoder": "torchcodec", "device": "cpu"}
        if torch.cuda.is_available():
            found["torchcodec_cuda"] = {"decoder": "torchcodec", "device": "cuda"}
    return found


def bench_size(paths: list[Path], reps: int) -> dict[str, Any]:
    sampler = FrameSampler(16)
    infos = {path: probe_video(path) for path in paths}
    runs: dict[str, Callable[[], list[list[int]]]] = {}
    for name, case in cases().items():
        def one_pass(case: dict[str, str] = case) -> list[list[int]]:
            return [read_frame_numbers(decode_clip(path, sampler, short_side=224, decoder=case["decoder"],
                                                   info=infos[path], device=case["device"])[0]) for path in paths]
        runs[name] = one_pass
    numbers = {name: run() for name, run in runs.items()}  # warm-up (CUDA context, NVDEC) and the frame check
    reference = numbers["pyav_cpu"]
    same = {name: found == reference for name, found in numbers.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
            begin = time.perf_counter()
            runs[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - begin)
    clips_per_s = {name: round(len(paths) / statistics.median(t), 2) for name, t in seconds.items()}
    result: dict[str, Any] = {"clips": len(paths), "same_frames_as_pyav": same, "clips_per_s": clips_per_s,
                              "pass_seconds": {name: [round(x, 3) for x in t] for name, t in seconds.items()}}
    if "torchcodec_cuda" in clips_per_s:
        result["cuda_over_cpu"] = {name: round(clips_per_s["torchcodec_cuda"] / v, 2)
                                   for name, v in clips_per_s.items() if name != "torchcodec_cuda"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vlmask-bench-cuda-decoding"))
    parser.add_argument("--out")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    record: dict[str, Any] = {
        "benchmark": "cuda_decoding", "when": datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(), "frames": 16, "short_side": 224, "fps": FPS,
        "seconds_per_clip": args.seconds, "load_before": os.getloadavg(), "sizes": {},
    }
    if record["cuda"] is None:
        record["note"] = "no CUDA device here: CPU decoders only; run it on a GPU machine for torchcodec_cuda"
    for width, height in SIZES:
        paths = make_clips(workdir, args.clips, args.seconds, width, height)
        record["sizes"][f"{width}x{height}"] = result = bench_size(paths, args.reps)
        rates = "  ".join(f"{n} {v} clips/s" for n, v in result["clips_per_s"].items())
        print(f"{width}x{height}: {rates}", file=sys.stderr)
    record["load_after"] = os.getloadavg()
    default = ROOT / "benchmarks" / "results" / f"cuda-decoding-{datetime.now():%Y%m%d-%H%M}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
