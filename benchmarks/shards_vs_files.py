"""Clips/s from WebDataset shards (dataset ``video_shards``) vs from individual files (``video_manifest``).

    python benchmarks/shards_vs_files.py [--clips 96] [--size 128] [--frames 16] [--shard-size 32]
                                         [--batch-size 8] [--workers 2] [--rounds 5] [--workdir DIR] [--out FILE.json]

The same clips (the synthetic set's, ``vlmask_plugins.data.synthetic.generate``, H.264 at
``--size`` px; written once to ``--workdir``, then sharded with ``write_shards``), the same
decoder (PyAV: it reads a file by path and a shard's clip from a BytesIO), the same sampling and
augmentation (the demo recipes' clip: 8 frames at 64 px, train crops), and the engine's loaders:
``EpochBatches`` + ``SeededItems`` for the files, the dataset's own ``plan`` for the shards
(``persistent_workers=False`` for both, so both pay for starting their workers each epoch).
Each round times one epoch of each, in an order that alternates between rounds. Reported: clips/s
per round, the medians, the ratio shards / files of the medians and the median of the per-round
ratios. On a local disk with a warm page cache the ratio shows the cost of reading from a tar
(header scan, seeks, a BytesIO) against opening files; the reason for shards, fewer and larger
reads from network storage, is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from torch.utils.data import DataLoader

from vlmask.data_loading import EpochBatches, SeededItems, worker_init
from vlmask_plugins.data.dataset import VideoManifestDataset
from vlmask_plugins.data.shards import VideoShardsDataset, write_shards
from vlmask_plugins.data.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--size", type=int, default=128, help="the videos' frame size (px)")
    parser.add_argument("--frames", type=int, default=16, help="the videos' frame count")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vlmask-bench-shards"))
    parser.add_argument("--out")
    args = parser.parse_args()

    work = Path(args.workdir) / f"c{args.clips}-s{args.size}-f{args.frames}"
    train = work / "synth" / "train.jsonl"
    if not train.is_file():
        train, _ = generate(work / "synth", clips=args.clips, seed=0, frames=args.frames, size=args.size, progress=False)
    shards = work / f"shards-{args.shard_size}"
    if not (shards / "shards.json").is_file():
        write_shards(train, shards, shard_size=args.shard_size)
    clip = dict(num_frames=8, size=64, hflip=False, crop_scale=(0.6, 1.0), decoder="pyav")
    files = VideoManifestDataset(str(train), **clip)
    streamed = VideoShardsDataset(str(shards), **clip).plan(args.batch_size, seed=0)
    sampler = EpochBatches(len(files), args.batch_size, seed=0)
    assert len(files) == len(streamed), (len(files), len(streamed))
    common = dict(num_workers=args.workers, worker_init_fn=worker_init, collate_fn=files.collate)
    loaders = {
        "files": DataLoader(SeededItems(files), batch_sampler=sampler, **common),
        "shards": DataLoader(streamed, batch_size=args.batch_size, drop_last=True, **common),
    }
    clips_per_epoch = sampler.batches_per_epoch * args.batch_size
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        timing: dict[str, float] = {}
        for name in (("files", "shards") if r % 2 == 0 else ("shards", "files")):
            sampler.epoch = streamed.epoch = r
            start = time.perf_counter()
            count = sum(len(batch.video) for batch in loaders[name])
            assert count == clips_per_epoch, (name, count)
            timing[name] = count / (time.perf_counter() - start)
        rounds.append(timing)
        print(f"round {r}: files {timing['files']:.1f} clips/s, shards {timing['shards']:.1f} clips/s", flush=True)
    median = {name: statistics.median(t[name] for t in rounds) for name in loaders}
    record = {
        "what": "clips/s of one epoch, video_shards vs video_manifest, same clips, decoder pyav",
        "command": "python benchmarks/shards_vs_files.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("workdir", "out")),
        "clips": len(files), "shards": len(streamed.shards), "video": f"{args.frames} frames {args.size}x{args.size} H.264",
        "clip": clip, "batch_size": args.batch_size, "workers": args.workers,
        "rounds": rounds, "median_clips_per_s": median,
        "ratio_of_medians": median["shards"] / median["files"],
        "median_of_ratios": statistics.median(t["shards"] / t["files"] for t in rounds),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "date": datetime.now().isoformat(timespec="seconds"),
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"shards-vs-files-{datetime.now():%Y%m%d-%H%M}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("median_clips_per_s", "ratio_of_medians", "median_of_ratios")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
