"""Run-directory safety: one writer at a time, metrics that survive a kill, the same recipe on a
re-run, and a non-finite loss caught at the step it happens.

Four small pieces the engine calls (this module imports nothing above ``config``):

* :class:`RunDirLock` - a second writer on one ``run.dir`` is refused, naming the holder.
* :func:`read_metrics` / :func:`truncate_metrics_after` - ``metrics.jsonl`` read with a torn last
  line tolerated (a kill mid-write), cut back atomically on resume.
* :func:`check_same_recipe` - a re-run of a run directory with another recipe or other overrides
  is refused naming the keys that differ; a grown ``train.max_steps`` may continue deliberately.
* :class:`NonFiniteGuard` - the first non-finite loss is recorded on the device (no host-device
  sync per step) and read only before a checkpoint and at log steps, so a non-finite checkpoint
  is never written and the last good one is kept.
* :class:`TrainingClock` - ``summary.json``'s ``wall_s`` and ``clips_per_s`` kept in each
  checkpoint, so a run resumed at its final checkpoint still reports what its training took.
* :func:`busy_holder` - who trains in a run directory now, asked without taking its lock
  (``vlmask compare`` refuses a busy run directory before it trains anything).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.distributed.tensor import DTensor

LOCK_NAME = ".lock"

Warn = Callable[[str], None]


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- (a) one writer per run directory


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


#: Descriptors of run-directory locks this process holds or is taking. Every child forked with
#: ``os.fork`` closes them first thing (see :class:`RunDirLock`); ``_FORK_GUARD`` keeps a fork from
#: landing between opening a descriptor and recording it, or between forgetting and closing it.
_LOCK_FDS: set[int] = set()
_FORK_GUARD = threading.Lock()


def _close_lock_fds_in_child() -> None:
    for fd in _LOCK_FDS:
        try:
            os.close(fd)  # the child's reference only: the parent's lock stays (never LOCK_UN here)
        except OSError:
            pass
    _LOCK_FDS.clear()
    _FORK_GUARD.release()  # taken by the parent's before-fork handler, copied locked


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release,
                        after_in_child=_close_lock_fds_in_child)


def _open_lock_fd(path: Path) -> int:
    with _FORK_GUARD:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _LOCK_FDS.add(fd)
    return fd


def _close_lock_fd(fd: int) -> None:
    with _FORK_GUARD:
        _LOCK_FDS.discard(fd)
        os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False


#: How long a writer waits for processes a dead holder left with the lock (DataLoader workers notice
#: their parent's death within about 5 s, plus the item they are decoding) before it names them.
ORPHAN_WAIT_S = 30.0


class RunDirLock:
    """An exclusive lock on a run directory for the process that trains into it::

        with RunDirLock(run_dir, command="vlmask run recipes/mae.yaml"):
            ...  # resume, train, write summary.json

    Why ``fcntl.flock`` on ``RUN_DIR/.lock`` and not a pid file: the kernel releases a flock when
    the last descriptor of its open file closes, and a process killed by anything (SIGKILL, OOM
    killer, a power cut of the container) closes every descriptor, so a stale lock cannot exist:
    the next ``vlmask run`` simply takes it. A pid file would need "is that pid still alive, and is
    it still the same program?", which pid reuse and other hosts make unanswerable. The holder's
    identity (pid, host, command, start time, as JSON) is written into the lock file only so that
    a refused writer can say who holds it; the file itself is left in place (deleting it would let
    two processes lock two different files of the same name).

    **Children never keep it** (issue 22). A flock belongs to the open file, which a forked child
    shares: DataLoader workers (``data.num_workers``) outlived a SIGKILLed trainer by seconds and
    the run, started again at once, was refused as busy naming the dead process. So the descriptor
    is opened ``O_CLOEXEC`` (a child that execs never has it: ``subprocess``, and the ``spawn`` and
    ``forkserver`` start methods, which also pass on only the descriptors they choose) and an
    ``os.register_at_fork`` handler closes it in every child forked with ``os.fork`` (the ``fork``
    start method: DataLoader workers, persistent or not, ``multiprocessing.Process``) before the
    child runs any code. Closing drops the child's reference only; ``LOCK_UN`` there would unlock
    the parent's lock too, and a forked copy of this object is not :attr:`held` and its
    :meth:`release` touches nothing.

    Why not POSIX record locks (``fcntl.lockf``), which are per process and not inherited: closing
    *any* descriptor of the file in the holder's process silently drops them (a plugin or a backup
    tool reading ``.lock``, this module naming the holder), and the kernel grants a second one to
    the same process. A silently lost lock means two writers, and lost data; a flock kept too long
    means at worst a refusal.

    **The fallback**, for a descriptor kept some other way (a library forking in C without exec, a
    descriptor handed on on purpose): when the lock is refused and its recorded holder is dead on
    this host, the writer says so (``warn``), waits up to ``orphan_wait`` seconds for the processes
    that have the file open to exit, then refuses naming them. It never takes a lock the kernel
    refuses; the wait only replaces an immediate refusal.

    A second ``RunDirLock`` on the same directory is refused even within one process (each opens
    the file anew). On network file systems flock is as good as the server's locking (Linux NFS
    emulates it with byte-range locks). Under ``torchrun`` only rank 0 takes the lock.
    """

    def __init__(self, run_dir: str | Path, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command if command is not None else _command_line()
        self._fd: int | None = None
        self._owner: int | None = None  # the pid that took it; a forked copy elsewhere is not held

    def identity(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def acquire(self, orphan_wait: float = ORPHAN_WAIT_S, warn: Warn | None = None) -> "RunDirLock":
        """Take the lock, or raise :class:`RunDirBusy` naming the holder (at once when it lives;
        after up to ``orphan_wait`` seconds when it is dead and processes it left keep the lock,
        ``warn`` (default stderr) saying so while it waits)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_lock_fd(self.path)
        try:
            if not _try_flock(fd):
                self._wait_for_leftovers(fd, orphan_wait, warn or _stderr_warning)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.identity()) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except BaseException:
            _close_lock_fd(fd)
            raise
        self._fd, self._owner = fd, os.getpid()
        return self

    def _wait_for_leftovers(self, fd: int, orphan_wait: float, warn: Warn) -> None:
        """Return once ``fd`` is locked; raise :class:`RunDirBusy` when a live process holds the
        lock, or when a dead holder's leftovers still do after ``orphan_wait`` seconds."""
        holder = _dead_holder(self.path)
        if holder is None:
            raise self._busy()
        leftovers = _processes_with_open(self.path)
        warn(f"{self.run_dir}: its last holder, {describe_holder(self.path)}, is dead, but "
             f"{_plural(leftovers, left=True)} still {'holds' if len(leftovers) < 2 else 'hold'} {self.path}; "
             f"waiting up to {orphan_wait:g} s for {'it' if len(leftovers) < 2 else 'them'} to exit")
        deadline = time.monotonic() + orphan_wait
        while time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if _try_flock(fd):
                return
            if _dead_holder(self.path) != holder:  # someone else took it meanwhile and lives
                raise self._busy()
        leftovers = _processes_with_open(self.path)
        pids = " ".join(str(pid) for pid in leftovers)
        stop = f"stop {'it' if len(leftovers) < 2 else 'them'} (kill {pids})" if leftovers else "stop them"
        raise RunDirBusy(f"{self.run_dir} is still locked by {_plural(leftovers)}, left by its dead holder pid "
                         f"{holder['pid']}; {stop} or choose another run.dir")

    def _busy(self) -> RunDirBusy:
        return RunDirBusy(f"{self.run_dir} is in use by {describe_holder(self.path)}; wait for it to finish, "
                          f"stop it, or choose another run.dir")

    def release(self) -> None:
        if self._fd is None:
            return
        if self._owner != os.getpid():  # a forked copy: its descriptor was closed at the fork
            self._fd = self._owner = None
            return
        try:
            os.ftruncate(self._fd, 0)  # nobody holds it now; the file stays (see the class docstring)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        _close_lock_fd(self._fd)
        self._fd = self._owner = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._owner == os.getpid()

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _plural(pids: list[int], left: bool = False) -> str:
    """"process 12" / "processes 12, 13" (+ " it left"), or "a process ... (not visible here)"."""
    if not pids:
        return "a process it left (not visible here)" if left else "a process not visible here"
    name = "process" if len(pids) == 1 else "processes"
    return f"{name} {', '.join(str(pid) for pid in pids)}" + (" it left" if left else "")


def _read_holder(lock_file: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _dead_holder(lock_file: Path) -> dict[str, Any] | None:
    """The recorded holder when it is a process of this host that no longer runs, else None
    (alive, on another host, or unknown: the lock is then simply busy)."""
    holder = _read_holder(lock_file)
    if holder is None or holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or pid == os.getpid() or _alive(pid):
        return None
    return holder


def _alive(pid: int) -> bool:
    """Runs (a zombie, killed but not yet reaped, has closed its files and does not count; without
    ``/proc``, as on macOS, a zombie counts as alive: the lock is then busy, never taken)."""
    if os.path.isdir("/proc/self"):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
        except (OSError, IndexError):
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes_with_open(path: Path) -> list[int]:
    """Pids of other processes with ``path`` open, as far as ``/proc`` shows (Linux; empty elsewhere)."""
    try:
        target = os.stat(path)
        entries = [e for e in os.scandir("/proc") if e.name.isdigit() and int(e.name) != os.getpid()]
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            with os.scandir(f"/proc/{entry.name}/fd") as fds:
                for fd in fds:
                    try:
                        st = os.stat(fd.path)
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        found.append(int(entry.name))
                        break
        except OSError:
            continue
    return sorted(found)


def _command_line() -> str:
    """This process's command as the user typed it: ``vlmask run ...`` also under ``python -m vlmask``."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = program.parent.name if program.name == "__main__.py" else program.name
    return " ".join([name, *sys.argv[1:]])


def busy_holder(run_dir: str | Path) -> str | None:
    """``"pid 123 on host h (vlmask run ..., since ...)"`` when a live process holds ``run_dir``'s
    lock, else None. Asked with a shared, non-blocking flock on a descriptor opened read-only and
    released at once: nothing is written, no folder is made, and a writer that starts meanwhile
    is not refused for longer than this call."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return describe_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunDirNotShared(RuntimeError):
    """The processes of a job of several nodes do not see one run directory."""


def check_shared(run_dir: str | Path, start_step: int, rank: int, world_size: int) -> None:
    """Several processes, maybe on several nodes, train into one run directory: rank 0 locks it
    and writes it (``config.yaml``, ``metrics.jsonl``, checkpoints) and every rank resumes from
    its latest checkpoint, so it must be on a disk every node shares. Each rank reads the holder
    rank 0 wrote into the lock file and says which step it resumes at; a rank that sees another
    holder (a node's own disk, where the directory is empty or holds an old run) or another step
    raises :class:`RunDirNotShared` naming it and its host, on every rank alike (so no rank waits
    for ever). A collective of the default group (a barrier, then one ``all_gather_object``)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    dist.barrier()  # rank 0 holds the lock, with its identity written, by now
    mine = (socket.gethostname(), _read_holder(Path(run_dir) / LOCK_NAME), start_step)
    seen: list[Any] = [None] * world_size
    dist.all_gather_object(seen, mine)
    host0, holder0, step0 = seen[0]
    for other, (host, holder, step) in enumerate(seen):
        if holder != holder0:
            raise RunDirNotShared(f"{run_dir}: rank {other} (host {host}) does not see the lock that rank 0 (host "
                                  f"{host0}) holds there: run.dir must be on a disk every node shares")
        if step != step0:
            raise RunDirNotShared(f"{run_dir}: rank {other} (host {host}) would resume at step {step} and rank 0 "
                                  f"(host {host0}) at step {step0}: run.dir must be on a disk every node shares")


def describe_holder(lock_file: Path) -> str:
    """"pid 123 on host h (vlmask run ..., since 2026-...)" from a lock file, as well as it can be read."""
    try:
        holder = json.loads(lock_file.read_text(encoding="utf-8"))
        return (f"pid {holder['pid']} on {holder['host']} ({holder['command']}, since {holder['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its identity is not written yet)"


# --------------------------------------------------------------------------- (b) metrics.jsonl


class MetricsError(ValueError):
    """A damaged ``metrics.jsonl`` line that is not the last one (not the trace of a kill)."""


def _metrics_lines(path: Path, warn: Warn | None) -> list[tuple[str, dict[str, Any]]]:
    """(text, record) per good line; a bad last line is dropped with a warning (a kill while it was
    being written), a bad line elsewhere raises :class:`MetricsError` naming file and line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    while lines and not lines[-1].strip("\0 \t\r"):  # a crash can leave NULs or blanks at the end
        lines.pop()
    out: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        reason = None
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                reason = f"a line must be a JSON object, got {type(record).__name__}"
            elif isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
                reason = "no integer 'step'"
        except (ValueError, RecursionError) as error:
            reason = f"invalid JSON ({error})" if isinstance(error, ValueError) else "invalid JSON (nested too deeply)"
        if reason is None:
            out.append((line, record))
            continue
        if number == len(lines):
            (warn or _stderr_warning)(f"{path}:{number}: the last line is incomplete (a kill while it was written); ignored")
            break
        raise MetricsError(f"{path}:{number}: {reason}; the file is damaged before its last line")
    return out


def read_metrics(path: str | Path, warn: Warn | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (empty when it does not exist). A torn last line is ignored
    with a warning naming file and line (``warn``, default stderr); a bad line in the middle is a
    :class:`MetricsError` naming them."""
    path = Path(path)
    if not path.is_file():
        return []
    return [record for _, record in _metrics_lines(path, warn)]


def truncate_metrics_after(path: str | Path, step: int, warn: Warn | None = None) -> int:
    """Keep the lines of ``metrics.jsonl`` with ``step <= step`` (a resume from that checkpoint),
    byte for byte, atomically: written beside as ``.metrics.jsonl.tmp``, fsynced, then renamed
    over the file (a kill at any moment leaves the old or the new file, never half of one).
    Returns the number of lines kept; a missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = [text for text, record in _metrics_lines(path, warn) if record["step"] <= step]
    scratch = path.with_name(f".{path.name}.tmp")
    with open(scratch, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in kept))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(scratch, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return len(kept)


# --------------------------------------------------------------------------- (c) the same recipe on a re-run

#: Keys that may differ between the run directory's ``config.yaml`` and a re-run: where the run is
#: (it is the same directory), how data is loaded (not what), and what ``vlmask eval`` / ``finetune``
#: read (they do not change training), and which signals stop a run for a requeue
#: (``train.preempt_signals``). ``record`` is vlmask's own record, not the recipe.
MAY_DIFFER: tuple[str, ...] = ("record", "run", "data.num_workers", "train.preempt_signals", "evaluation", "finetune")

GROWABLE = "train.max_steps"


@dataclass(frozen=True)
class Difference:
    key: str
    before: Any
    after: Any
    set_by: str | None = None  # the command-line override that set ``after``, when one did

    def __str__(self) -> str:
        missing = "(absent)"
        text = (f"{self.key}: {missing if self.before is ABSENT else json.dumps(self.before, default=str)} in the run, "
                f"{missing if self.after is ABSENT else json.dumps(self.after, default=str)} now")
        return text + (f" ({self.set_by})" if self.set_by else "")


#: The value of a key one side lacks (``Difference.before`` / ``after``).
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "(absent)"})()


@dataclass
class RecipeCheck:
    """What :func:`check_same_recipe` found. ``status``:

    * ``"new"``: no ``config.yaml`` yet: a fresh run.
    * ``"same"``: the recipe is the run's; resume it (or, when ``finished``, nothing to do).
    * ``"extend"``: only ``train.max_steps`` grew (``steps`` = (before, after)): continue from the
      last checkpoint to the new total, deliberately; the learning-rate schedule is recomputed for
      the new total, so the result differs from a run trained that long from the start.
    * ``"refused"``: anything else differs (``differences``); :meth:`raise_if_refused` raises.
    """

    status: Literal["new", "same", "extend", "refused"]
    run_dir: Path
    finished: bool = False
    differences: list[Difference] = field(default_factory=list)
    steps: tuple[int, int] | None = None
    recipes: tuple[str | None, str | None] = (None, None)

    def message(self) -> str:
        if self.status == "refused":
            recipes = ""
            if self.recipes[0] and self.recipes[1] and self.recipes[0] != self.recipes[1]:
                recipes = f" (it was trained from {self.recipes[0]}, this is {self.recipes[1]})"
            keys = "; ".join(str(d) for d in self.differences[:10])
            more = f"; ... {len(self.differences) - 10} more" if len(self.differences) > 10 else ""
            return (f"{self.run_dir} was trained with another recipe{recipes}: {keys}{more}; "
                    f"use another run.dir, or the run's own settings")
        if self.status == "extend":
            before, after = self.steps or (0, 0)
            return (f"{self.run_dir}: continuing from step {before} to train.max_steps={after} "
                    f"(the learning-rate schedule is recomputed for {after} steps)")
        if self.status == "same" and self.finished:
            return f"{self.run_dir}: already finished with this recipe (summary.json exists); nothing to do"
        return f"{self.run_dir}: resuming with the same recipe" if self.status == "same" else f"{self.run_dir}: new run"

    def raise_if_refused(self) -> None:
        if self.status == "refused":
            raise RunDirMismatch(self.message())


class RunDirMismatch(ValueError):
    """A re-run whose recipe differs from the run directory's."""


def flatten_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings (an empty mapping is one value, as is a list)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten_keys(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: node}


def _exempt(key: str, exempt: Iterable[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in exempt)


def check_same_recipe(run_dir: str | Path, resolved_config: dict[str, Any], overrides: Iterable[str] = (),
                      may_differ: Iterable[str] = MAY_DIFFER, recipe: str | None = None) -> RecipeCheck:
    """Compare a re-run's fully resolved recipe with ``RUN_DIR/config.yaml`` (see :class:`RecipeCheck`).

    ``resolved_config`` is the new recipe as plain containers (``OmegaConf.to_container(...,
    resolve=True)``); ``overrides`` its command-line overrides, only to name which one set a
    differing key; ``recipe`` the new recipe's path, to name both recipes when they differ. Keys
    under ``may_differ`` are ignored. Lists compare whole (a list is one value)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    finished = (run_dir / "summary.json").is_file()
    if not config_file.is_file():
        return RecipeCheck("new", run_dir, finished=finished)
    try:
        stored = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    except Exception as error:  # a damaged config.yaml: named, never a silent restart
        raise RunDirMismatch(f"{config_file}: cannot be read ({type(error).__name__}: {error}); "
                             f"this run directory cannot be checked or resumed") from None
    if not isinstance(stored, dict):
        raise RunDirMismatch(f"{config_file}: not a mapping; this run directory cannot be checked or resumed")
    record = stored.get("record") if isinstance(stored.get("record"), dict) else {}
    before, after = flatten_keys(stored), flatten_keys(resolved_config)
    exempt = tuple(may_differ)
    setters: dict[str, str] = {}
    for text in overrides:
        key = text.lstrip("~").split("=", 1)[0].strip()
        setters[key] = f"command line: {text}"

    def set_by(key: str) -> str | None:
        probe = key
        while probe:
            if probe in setters:
                return setters[probe]
            probe = probe.rpartition(".")[0]
        return next((s for k, s in setters.items() if k.startswith(key + ".")), None)

    differences = [
        Difference(key, before.get(key, ABSENT), after.get(key, ABSENT), set_by(key))
        for key in sorted(set(before) | set(after))
        if not _exempt(key, exempt) and before.get(key, ABSENT) != after.get(key, ABSENT)
    ]
    recipes = (record.get("recipe"), recipe)
    grown = [d for d in differences if d.key == GROWABLE]
    others = [d for d in differences if d.key != GROWABLE]
    if others:
        return RecipeCheck("refused", run_dir, finished, differences, recipes=recipes)
    if grown:
        old, new = grown[0].before, grown[0].after
        if isinstance(old, int) and isinstance(new, int) and new > old:
            return RecipeCheck("extend", run_dir, finished, differences, steps=(old, new), recipes=recipes)
        return RecipeCheck("refused", run_dir, finished, differences, recipes=recipes)
    return RecipeCheck("same", run_dir, finished, recipes=recipes)


# --------------------------------------------------------------------------- (d) non-finite loss


class NonFiniteLoss(FloatingPointError):
    """The loss stopped being finite; ``step`` is the first step where it was not."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteGuard:
    """Record, on the device, the first step whose loss (or any named term) is not finite.

    ``observe(loss, terms)`` once per optimizer step costs a few tiny device ops and no
    host-device synchronisation: ``torch.isfinite`` gives a device boolean, and ``torch.where``
    keeps the first bad step index (a device counter, advanced on the device) and its value.
    ``first_bad_step()`` reads the flag (one sync): call it before every checkpoint save (a bad
    step since the last save means: do not save, keep the last good checkpoint, stop) and at log
    steps. ``check()`` raises :class:`NonFiniteLoss` naming the first bad step and its terms.

    On a CPU the reads are free; the point is GPU runs, where an ``.item()`` per step would stall
    the launch queue every step.
    """

    def __init__(self, device: torch.device | str, start_step: int = 0) -> None:
        self.device = torch.device(device)
        self._step = torch.full((), start_step, dtype=torch.long, device=self.device)  # steps observed so far
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self._term_first_bad: dict[str, Tensor] = {}
        self._term_values: dict[str, Tensor] = {}

    def observe(self, loss: Tensor, terms: dict[str, Tensor] | None = None) -> None:
        """Record step ``start_step + number of calls so far + 1`` (the step just taken)."""
        self._step += 1
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss).all()
        first = bad & (self._first_bad < 0)
        self._first_bad = torch.where(first, self._step, self._first_bad)
        self._bad_loss = torch.where(first, loss.reshape(-1)[0], self._bad_loss)
        for name, value in (terms or {}).items():
            value = value.detach().float()
            term_bad = ~torch.isfinite(value).all()
            seen = self._term_first_bad.get(name)
            if seen is None:
                seen = torch.full((), -1, dtype=torch.long, device=self.device)
                self._term_values[name] = torch.zeros((), dtype=torch.float32, device=self.device)
            newly = term_bad & (seen < 0)
            self._term_first_bad[name] = torch.where(newly, self._step, seen)
            self._term_values[name] = torch.where(newly, value.reshape(-1)[0], self._term_values[name])

    def first_bad_step(self) -> int | None:
        """The first step whose loss was not finite, or None (one host-device sync)."""
        step = int(self._first_bad.item())
        return None if step < 0 else step

    def check(self, noticed_at: int | None = None, kept: Path | str | None = None) -> None:
        """Raise :class:`NonFiniteLoss` when a bad step was observed; ``noticed_at`` (the current
        step) and ``kept`` (the last good checkpoint) complete the message."""
        step = self.first_bad_step()
        if step is None:
            return
        terms = []
        for name, first in self._term_first_bad.items():
            first_step = int(first.item())
            if first_step >= 0:
                terms.append(f"{name}={self._term_values[name].item():.4g} (first at step {first_step})")
        message = f"loss is {self._bad_loss.item():.4g} at step {step}"
        if noticed_at is not None and noticed_at != step:
            message += f" (noticed at step {noticed_at})"
        if terms:
            message += "; non-finite terms: " + ", ".join(terms)
        message += f"; no checkpoint was saved after it, the last good one is {kept}" if kept else "; no checkpoint was saved after it"
        message += "; try train.precision fp32/bf16, a lower optim.lr or train.grad_clip"
        raise NonFiniteLoss(message, step)


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of parameters holding a NaN or an infinity (one sync; call it before a save: a
    gradient that was not finite can leave the weights so while the logged loss still was)."""
    params = [(name, p.detach()) for name, p in module.named_parameters() if p.is_floating_point()]
    params = [(name, p.to_local() if isinstance(p, DTensor) else p) for name, p in params]  # FSDP: this rank's shard
    if not params:
        return []
    flags = torch.stack([torch.isfinite(p).all() for _, p in params]).cpu()
    return [name for (name, _), ok in zip(params, flags.tolist()) if not ok]


# --------------------------------------------------------------------------- (e) what the training took, across resumes


@dataclass
class TrainingClock:
    """``summary.json``'s ``wall_s`` and ``clips_per_s`` for a run that may be resumed.

    Why a clock kept in the checkpoint: a process measures only what it trained itself, so a run
    killed after its final checkpoint and resumed (which then trains no step and only writes
    ``summary.json``) reported ``wall_s`` 0.0 and ``clips_per_s`` 0.0. Each checkpoint records
    :meth:`state` (the seconds trained up to it, summed over the processes that trained the
    run, and the median clips/s of the log windows so far); a resume starts from it
    (:meth:`resumed`). Time after the last checkpoint of a killed process is not counted: its
    steps are trained again, and counted then. A checkpoint of an older vlmask records neither,
    so a run resumed from one counts only what it trains itself (None when that is nothing).
    """

    wall_before: float | None = None  # seconds trained before this process (from the checkpoint)
    rate_before: float | None = None  # clips/s recorded in that checkpoint
    rates: list[float] = field(default_factory=list)  # clips/s of this process's log windows
    started: float | None = None  # time.perf_counter() when this process began training

    @classmethod
    def resumed(cls, state: Mapping[str, Any]) -> "TrainingClock":
        """The clock of a run resumed from a checkpoint's training state (``state.pt``)."""
        wall, rate = state.get("wall_s"), state.get("clips_per_s")
        return cls(wall_before=float(wall) if isinstance(wall, (int, float)) else None,
                   rate_before=float(rate) if isinstance(rate, (int, float)) else None)

    def start(self) -> list[float]:
        """Start timing this process's training; returns the list to append log-window rates to."""
        self.started = time.perf_counter()
        return self.rates

    def wall_s(self, trained: bool = True) -> float | None:
        """Seconds of training so far; ``trained=False`` (this process trained no step): the
        checkpoint's figure alone, not the time this process spent getting ready."""
        if not trained or self.started is None:
            return self.wall_before
        return round((self.wall_before or 0.0) + time.perf_counter() - self.started, 3)

    def clips_per_s(self) -> float | None:
        """The median clips/s of this process's log windows, else the checkpoint's figure."""
        if self.rates:
            return sorted(self.rates)[len(self.rates) // 2]
        return self.rate_before

    def state(self) -> dict[str, float | None]:
        """What a checkpoint keeps (``state.pt``: ``wall_s``, ``clips_per_s``)."""
        return {"wall_s": self.wall_s(), "clips_per_s": self.clips_per_s()}
