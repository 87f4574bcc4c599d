"""Preemption: a scheduler's signal stops a run at a step boundary, checkpointed, for a requeue.

A cluster scheduler warns a job before it stops it: SLURM sends SIGTERM when it preempts or
times out a job (SIGKILL follows after its ``GraceTime`` / ``KillWait``), and with
``#SBATCH --signal=B:USR1@120`` SIGUSR1 to the batch shell 120 s before the time limit. On one
of :data:`DEFAULT_SIGNALS` (the recipe's ``train.preempt_signals``) every rank of ``vlmask
run`` finishes the step it is taking, the ranks agree on the step (:meth:`PreemptionWatch.agreed`),
save ONE checkpoint of it and the command exits with :data:`PREEMPTED_EXIT_CODE`; the same
command on the same ``run.dir`` resumes exactly there.

How the handler works, after Python's ``signal`` docs: a handler runs in the main thread between
two bytecodes, whichever thread the kernel delivered the signal to, so :class:`PreemptionWatch`'s
handler only records the signal (no I/O, no collective, no exception thrown into a save); the
training loop reads the record once per step. A second signal (SLURM's SIGTERM after the
``--signal`` warning, or torchrun's agent forwarding the one it got) only counts: the checkpoint
being written is never interrupted, and its write is atomic anyway (``vlmask.checkpoint``).

Peers: PyTorch Lightning's SLURM connector and submitit save and call ``scontrol requeue``
themselves (submitit then exits with status -1, i.e. 255); vlmask launches nothing and requeues
nothing (DESIGN.md: "no launcher of our own"): it exits with EX_TEMPFAIL and leaves the requeue
to the batch script (README, "Preemption").
"""

from __future__ import annotations

import difflib
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence, Union

import torch
import torch.distributed as dist

#: ``vlmask run``'s exit status after a preempted run saved its checkpoint: EX_TEMPFAIL of
#: sysexits.h ("a temporary failure ... the user is invited to retry"), ``os.EX_TEMPFAIL``.
PREEMPTED_EXIT_CODE = 75

#: ``train.preempt_signals`` unless a recipe says otherwise: SLURM's termination signal and the
#: usual ``--signal=USR1@...`` warning.
DEFAULT_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")

#: The signals ``train.preempt_signals`` may name: those schedulers send to warn or stop a job
#: (SLURM: TERM, and any of these through ``--signal``; LSF: USR2, INT, TERM, XCPU; SGE ``-notify``:
#: USR1, USR2). SIGKILL and SIGSTOP cannot be caught; SIGCHLD, SIGSEGV ... belong to the runtime.
ALLOWED_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXCPU")

_Handler = Union[Callable[[int, Union[FrameType, None]], Any], int, signal.Handlers, None]


def signal_problem(names: Any) -> str | None:
    """Why ``train.preempt_signals`` is not a list of :data:`ALLOWED_SIGNALS` (None: it is).

    >>> signal_problem(["SIGTERM", "SIGUSR1"]) is None and signal_problem([]) is None
    True
    >>> signal_problem(["SIGTREM"])
    "unknown signal 'SIGTREM' (did you mean 'SIGTERM'?); allowed: SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP, SIGQUIT, SIGXCPU; [] disables preemption"
    """
    if not isinstance(names, (list, tuple)):
        return f"is not a list of signal names (e.g. [SIGTERM, SIGUSR1]; [] disables preemption), got {names!r}"
    for name in names:
        if name not in ALLOWED_SIGNALS:
            close = difflib.get_close_matches(str(name), ALLOWED_SIGNALS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return (f"unknown signal {name!r}{hint}; allowed: {', '.join(ALLOWED_SIGNALS)}; "
                    "[] disables preemption")
    return None


def signal_numbers(names: Sequence[str]) -> tuple[int, ...]:
    """The signal numbers of validated names, without repeats, in order."""
    return tuple(dict.fromkeys(int(signal.Signals[name]) for name in names))


class Preempted(BaseException):
    """Raised by ``Trainer.train`` after every rank saved the step a preemption signal stopped.

    A ``BaseException`` like ``KeyboardInterrupt``: a stop asked for from outside, not an error,
    so ``except Exception`` (``vlmask compare``'s per-run failures) does not swallow it.
    """

    def __init__(self, step: int, signal_name: str, checkpoint: Path | None, rank: int) -> None:
        self.step, self.signal_name, self.checkpoint, self.rank = step, signal_name, checkpoint, rank
        super().__init__(self.line())

    def line(self) -> str:
        """The line ``vlmask run`` prints (rank 0)."""
        where = str(self.checkpoint) if self.checkpoint is not None else "none yet (the run starts over)"
        return (f"preempted at step {self.step} by {self.signal_name}; checkpoint {where}; "
                "rerun the same command to resume")


class PreemptionWatch:
    """Records preemption signals: ``with PreemptionWatch(["SIGTERM"]) as watch: ... watch.agreed(world)``.

    :meth:`install` replaces the handlers of its signals with one that records the first signal
    (``received``) and counts them all (``count``); :meth:`restore` puts the previous handlers
    back. Signal handlers can be set from the main thread only (Python's ``signal`` docs); from
    another thread the watch installs nothing and never reports a signal.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.numbers = signal_numbers(names)
        self.received: int | None = None
        self.count = 0
        self._previous: dict[int, _Handler] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        self.count += 1

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        for number in self.numbers:
            self._previous[number] = signal.signal(number, self._record)
            # restart system calls the signal interrupts (SA_RESTART): Python retries its own (PEP 475),
            # but a library writing a checkpoint or waiting on a socket might not
            signal.siginterrupt(number, False)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def hold(self) -> None:
        """Ignore its signals from now on, for a process that exits because of a preemption
        (``vlmask run``): a later signal must not change its exit code. Python resets the
        handlers it installed to the default as it shuts down, so a recording handler would not
        do; an ignored signal stays ignored."""
        for number in self.numbers:
            signal.signal(number, signal.SIG_IGN)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def agreed(self, world_size: int) -> int:
        """The signal the ranks stop for (0: none), the same on every rank; call it on every rank
        at the same point of every step. With several processes one ``all_reduce(MAX)`` of one
        integer on the CPU (the default group: gloo, or its CPU backend beside NCCL), so a rank
        that got no signal (torchrun's agent signalled one worker, or the signal reached the
        ranks between two steps) stops at the same step as the one that did; no CUDA sync."""
        mine = self.received or 0
        if world_size <= 1:
            return mine
        flag = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def signal_name(number: int) -> str:
    return signal.Signals(number).name

