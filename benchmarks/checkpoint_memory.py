"""Rank 0's peak memory while saving an FSDP checkpoint: full gather vs sharded (``vlmask.sharded``).

    python benchmarks/checkpoint_memory.py [--embed-dim 768] [--depth 8] [--processes 2] [--workdir DIR] [--out FILE.json]

A VideoMAE ViT encoder (``vlmask_plugins.encoders.vit.VideoViT``, ViT-B width, ``--depth``
blocks: tens of millions of parameters) is sharded by ``--processes`` gloo CPU processes with the
engine's own FSDP wrapping (``vlmask.parallel.shard_fsdp``), AdamW's state is made by one step
on zero gradients, then one checkpoint is saved the way ``vlmask.engine.Trainer.save`` saves it:

- ``full``: ``parallel.full_state_dict`` + ``parallel.optimizer_state`` (every tensor gathered,
  unsharded, on rank 0's CPU), then ``checkpoint.save_checkpoint`` (safetensors + ``state.pt``);
- ``sharded``: ``parallel.sharded_state_dict`` + ``parallel.sharded_optimizer_state`` (each
  rank its shards), then ``sharded.save_sharded`` (DCP, one safetensors shard per rank).

Each mode runs in its own ``torchrun`` job (freed memory that the allocator keeps would hide the
second one's growth). Memory: the peak resident set of each rank during the save call alone,
minus its resident set just before: Linux's ``VmHWM`` reset with ``/proc/self/clear_refs`` (5)
right before the call and read right after, with glibc's large allocations kept as their own
mappings (``MALLOC_MMAP_THRESHOLD_``) and ``malloc_trim`` before the call, so that memory freed
earlier and kept by the allocator cannot hide a save's growth. One run; the ratio full / sharded of rank 0's peak
increase is reported. Time is recorded, not compared (one run, a shared CPU).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def _hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def worker(mode: str, embed_dim: int, depth: int, folder: Path) -> None:
    """One rank of one mode (under torchrun): build, shard, step, save once, report."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from vlmask import checkpoint, parallel, sharded
    from vlmask_plugins.encoders.vit import VideoViT

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    class Student(nn.Module):  # what shard_fsdp expects: an encoder with blocks, maybe a predictor
        def __init__(self) -> None:
            super().__init__()
            self.encoder = VideoViT(num_frames=8, img_size=112, embed_dim=embed_dim, depth=depth,
                                    num_heads=max(1, embed_dim // 64))
            self.predictor = None

    student = Student()
    params = sum(p.numel() for p in student.parameters())
    parallel.shard_fsdp(student, None, "fp32", torch.device("cpu"))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's exp_avg and exp_avg_sq exist, sharded like the parameters
    optimizer.zero_grad(set_to_none=True)
    dist.barrier()

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what glibc kept of freed memory (the zero gradients)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss_kib()
    start = time.perf_counter()
    if mode == "full":
        tensors = parallel.full_state_dict(student)  # collective; rank 0 receives everything
        optim = parallel.optimizer_state(student, optimizer)
        if rank == 0:
            checkpoint.save_checkpoint(folder, 1, {"student": tensors}, {"optimizer": optim}, keep=1)
        del tensors, optim
    else:
        optim = parallel.sharded_optimizer_state(student, optimizer)
        tensors = {"student": parallel.sharded_state_dict(student), "optimizer": {"state": optim["state"]}}
        state = {"optimizer_param_groups": optim["param_groups"]} if rank == 0 else None
        sharded.save_sharded(folder, 1, tensors, state, keep=1)
        del tensors, optim
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = _hwm_kib()
    record = {"rank": rank, "rss_before_mb": before / 1024, "peak_increase_mb": (peak - before) / 1024,
              "save_s": seconds}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, record)
    if rank == 0:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print("RESULT " + json.dumps({"mode": mode, "parameters": params, "checkpoint_mb": size / 2**20,
                                      "ranks": every}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    folder = Path(args.workdir) / mode
    shutil.rmtree(folder, ignore_errors=True)
    # a fixed mmap threshold: every large tensor is its own mapping, returned to the OS when freed,
    # so a save cannot hide its growth in memory that glibc kept from earlier frees
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", str(args.processes), __file__, "--worker", mode,
         "--embed-dim", str(args.embed_dim), "--depth", str(args.depth), "--workdir", str(args.workdir)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vlmask-bench-checkpoint-memory"))
    parser.add_argument("--out")
    parser.add_argument("--worker", choices=("full", "sharded"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.embed_dim, args.depth, Path(args.workdir) / args.worker)
        return
    import torch

    results = {mode: run_mode(mode, args) for mode in ("full", "sharded")}
    rank0 = {mode: next(r for r in results[mode]["ranks"] if r["rank"] == 0) for mode in results}
    report = {
        "benchmark": "checkpoint_memory",
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/checkpoint_memory.py", *sys.argv[1:]]),
        "model": f"VideoViT embed_dim={args.embed_dim} depth={args.depth} (8 frames, 112 px)",
        "parameters": results["full"]["parameters"],
        "processes": args.processes,
        "backend": "gloo (CPU)",
        "measure": "per rank: peak RSS during the save call (VmHWM reset by /proc/self/clear_refs) minus RSS before it; "
                   "MALLOC_MMAP_THRESHOLD_=131072 and malloc_trim(0) before the call",
        "results": results,
        "rank0_peak_increase_mb": {mode: round(r["peak_increase_mb"], 1) for mode, r in rank0.items()},
        "ratio_full_over_sharded_rank0": round(rank0["full"]["peak_increase_mb"] / max(rank0["sharded"]["peak_increase_mb"], 1e-9), 2),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"checkpoint-memory-{datetime.now():%Y%m%d}.json"
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
