"""Deterministic, resumable data order for the engine.

Each epoch's order is a permutation drawn from (seed, epoch); every sample also gets its own
seed drawn from (seed, epoch, position), which the worker installs before loading it. So the
augmentations of a sample do not depend on which worker loads it or on where a run was
resumed: stopping and resuming a run replays exactly the same batches.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vlmask.kinds import CollatingDataset


class SeededItems(Dataset):
    """Wraps a dataset so ``dataset[(index, seed)]`` loads item ``index`` under RNG seed ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (index, sample seed) for one rank; set ``epoch`` and ``start_batch`` before iterating.

    The permutation of an epoch is shared by all ranks (same seed) and each rank takes every
    ``world``-th batch-sized slice, so ranks never see the same clip in an epoch. Incomplete
    final batches are dropped (equal shapes for every step and rank).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if size < batch_size * world:
            raise ValueError(
                f"{size} training clips cannot fill one step of {batch_size} clips x {world} processes; "
                "lower train.batch_size or add data"
            )
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world) - self.start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        seeds = torch.randint(0, 2**62, (self.size,), generator=g).tolist()
        step_clips = self.batch_size * self.world
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * step_clips + self.rank * self.batch_size
            yield [(order[i], seeds[i]) for i in range(lo, lo + self.batch_size)]


def collate_of(dataset: Any) -> Callable[[list[Any]], Any]:
    """A dataset's collate function: its ``collate`` attribute, else its module's ``collate``."""
    return dataset.collate if isinstance(dataset, CollatingDataset) else sys.modules[type(dataset).__module__].collate


class WorkerSignals:
    """The preemption signals (``vlmask.preemption``) a run's DataLoader workers ignore until
    released, made in the main process before the workers start (:func:`worker_init`).

    A scheduler may signal every process of a job (torchrun's agent ``killpg``s each worker's
    process group; SLURM signals every process of a step): a worker that died of it would make
    the main process fail with "DataLoader worker ... exited unexpectedly" instead of finishing
    its step and saving. But the main process itself ends its workers with SIGTERM when it exits
    (``multiprocessing``'s exit hook terminates, then joins, daemonic children), so a worker that
    always ignored SIGTERM would hang it there. Hence the flag in shared memory: :meth:`release`
    (at the main process's exit, before ``multiprocessing``'s hook, or when the run is closed)
    turns the signals back into what they were, and one that arrives then ends the worker."""

    def __init__(self, numbers: Sequence[int]) -> None:
        self.numbers = tuple(numbers)
        self.released = multiprocessing.RawValue("b", 0)  # shared with the workers (fork and spawn)
        if self.numbers:
            atexit.register(self.release)  # registered after multiprocessing's own hook, so it runs before it

    def release(self) -> None:
        self.released.value = 1

    def install(self) -> None:
        """In a worker: its signals ignored while :attr:`released` is not set."""
        for number in self.numbers:
            signal.signal(number, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.released.value:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def worker_init(_: int, signals: WorkerSignals | None = None) -> None:
    """A DataLoader worker's set-up: one torch thread, and the run's preemption signals ignored
    until the main process releases them (:class:`WorkerSignals`)."""
    torch.set_num_threads(1)
    if signals is not None:
        signals.install()


def infinite(loader: Any, sampler: EpochBatches, epoch: int, start_batch: int) -> Iterator[Any]:
    """Batches forever, epoch after epoch, starting at (epoch, start_batch)."""
    sampler.epoch, sampler.start_batch = epoch, start_batch
    while True:
        yield from loader
        sampler.epoch, sampler.start_batch = sampler.epoch + 1, 0
