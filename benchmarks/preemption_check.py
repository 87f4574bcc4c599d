"""Cost of the per-step preemption check (``vlmask.preemption.PreemptionWatch.agreed``).

Every step, before it takes the next batch, each rank of ``vlmask run`` asks whether any rank got
a preemption signal: with one process a Python attribute read; with several one
``all_reduce(MAX)`` of one int64 CPU tensor on the default group (gloo; beside NCCL its CPU
backend), so the ranks stop at the same step. This times that call: ``--processes`` gloo
processes on this machine (TCP over loopback, as torchrun ``--standalone``), ``--calls`` calls
after 50 warm-up ones, median and 90th percentile per call (rank 0's), and with one process.
Prints and writes one JSON; compare with a step (``vlmask bench``, benchmarks/results/).

    python benchmarks/preemption_check.py --out benchmarks/results/preemption-check-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmask.preemption import PreemptionWatch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _times_us(call, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median_us": round(statistics.median(ordered), 2), "p90_us": round(ordered[int(0.9 * len(ordered))], 2)}


def _rank(rank: int, world: int, port: int, calls: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    watch = PreemptionWatch([])  # nothing installed: only the agreement is timed
    _times_us(lambda: watch.agreed(world), 50)
    dist.barrier()
    times = _times_us(lambda: watch.agreed(world), calls)
    if rank == 0:
        Path(out).write_text(json.dumps(_summary(times)))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out")
    args = parser.parse_args()
    watch = PreemptionWatch([])
    one = _summary(_times_us(lambda: watch.agreed(1), args.calls))
    scratch = Path(f".preemption-check-{os.getpid()}.json")
    try:
        mp.spawn(_rank, args=(args.processes, _free_port(), args.calls, str(scratch)), nprocs=args.processes)
        several = json.loads(scratch.read_text())
    finally:
        scratch.unlink(missing_ok=True)
    report = {
        "calls": args.calls, "processes": args.processes, "backend": "gloo (loopback TCP)", "threads": 1,
        "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "one_process": one, "several_processes": several,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
