"""Where this process stands in a job of several: torchrun's variables, or SLURM's under ``srun``.

vlmask has no launcher of its own. torch's ``init_process_group`` (``env://``, the default)
reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; torchrun sets them (and
``LOCAL_RANK``) for every worker, on one node (``--standalone``) or many (``--rdzv-backend c10d
--rdzv-endpoint HOST:PORT``). ``srun python -m vlmask run ...`` starts the processes itself and
sets SLURM's variables instead (srun(1), "OUTPUT ENVIRONMENT VARIABLES");
:func:`slurm_environment` maps them to torch's, as PyTorch Lightning's ``SLURMEnvironment``
and torchtitan's SLURM scripts do:

==================  =====================================================================
torch's variable    taken from
==================  =====================================================================
``RANK``            ``SLURM_PROCID``
``WORLD_SIZE``      ``SLURM_STEP_NUM_TASKS`` (this srun step's tasks; ``SLURM_NTASKS``
                    is the same number under srun)
``LOCAL_RANK``      ``SLURM_LOCALID`` (0 when unset)
``MASTER_ADDR``     the first host of ``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``
                    (``scontrol show hostnames`` when it exists, else :func:`first_host`)
``MASTER_PORT``     ``15000 + SLURM_JOB_ID % 10000`` (:func:`job_port`: 15000-24999, below
                    Linux's ephemeral ports 32768-60999, as Lightning derives it)
==================  =====================================================================

Precedence: a variable already set wins over its SLURM source, and torchrun wins as a whole:
with ``RANK`` set (torchrun, or a person), SLURM's variables are not read at all, so
``srun torchrun ...`` (one torchrun per node) works unchanged. Only an srun task is mapped
(``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS`` set): the batch script itself (and an
``salloc`` shell) also has ``SLURM_PROCID=0`` and the allocation's ``SLURM_NTASKS``, and a
process started there is one process (:func:`outside_srun` says so), not rank 0 of a job
whose other ranks never come. Set ``MASTER_PORT`` yourself to run two job steps at once on
the same first node, and ``MASTER_ADDR`` where the node's name does not resolve.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any, Callable, Mapping, MutableMapping, TypeVar

import torch.distributed as dist

T = TypeVar("T")

#: The torch variables :func:`slurm_environment` may set.
TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: :func:`job_port`'s range: ``PORT_BASE`` to ``PORT_BASE + PORT_SPAN - 1``.
PORT_BASE, PORT_SPAN = 15000, 10000


class LaunchError(ValueError):
    """The environment names a SLURM job step vlmask cannot place itself in (one line)."""


def job_port(job_id: str) -> int:
    """``MASTER_PORT`` of a SLURM job: ``15000 + job_id % 10000`` (the numeric part of the id;
    an array task's ``123_4`` counts as 123), so every task of the job derives the same port
    and two jobs sharing a node rarely meet."""
    digits = re.match(r"\d+", job_id.strip())
    if digits is None:
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not a number: export MASTER_PORT")
    return PORT_BASE + int(digits.group()) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list in its compressed form: ``node[01-03,07],gpu5`` gives
    ``node01``; ``a-[2-4]-b[1,3]`` gives ``a-2-b1``. Zero padding is kept (``[008-010]`` gives
    ``008``). A form it cannot read is a :class:`LaunchError` saying to export MASTER_ADDR."""
    text = nodelist.strip()
    problem = LaunchError(f"cannot read the first host of SLURM's node list {nodelist!r}: export MASTER_ADDR")
    host = ""
    i = 0
    while i < len(text) and text[i] != ",":  # the first comma outside brackets ends the first entry
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                raise problem
            first = text[i + 1:end].split(",")[0].split("-")[0]
            if not first.isdigit():
                raise problem
            host += first
            i = end + 1
        elif text[i] == "]":
            raise problem
        else:
            host += text[i]
            i += 1
    if not host or any(c.isspace() for c in host):
        raise problem
    return host


def master_host(nodelist: str) -> str:
    """The first host of ``nodelist``: ``scontrol show hostnames`` (SLURM's own expansion) when
    scontrol is on PATH and answers, else :func:`first_host`."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            listed = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                    timeout=30, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            listed = []
        if listed:
            return listed[0]
    return first_host(nodelist)


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch variables an srun task lacks, from its SLURM variables (the table above): empty
    when ``RANK`` is set (torchrun wins) or this is not an srun task (no ``SLURM_PROCID`` or no
    ``SLURM_STEP_NUM_TASKS``); a variable already in ``environ`` is never returned. Raises :class:`LaunchError` (one line) on a value
    it cannot use."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    tasks = "SLURM_STEP_NUM_TASKS"
    rank, world_size = _integer(environ, "SLURM_PROCID"), _integer(environ, tasks)
    if not 0 <= rank < world_size:
        raise LaunchError(f"SLURM_PROCID={rank} is not below {tasks}={world_size}")
    found = {"RANK": str(rank), "WORLD_SIZE": str(world_size),
             "LOCAL_RANK": str(_integer(environ, "SLURM_LOCALID")) if "SLURM_LOCALID" in environ else "0"}
    if world_size > 1 and "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
            or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("SLURM_JOB_NODELIST is not set: export MASTER_ADDR (the host of rank 0)")
        found["MASTER_ADDR"] = master_host(nodelist)
    if world_size > 1 and "MASTER_PORT" not in environ:
        job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
        if not job:
            raise LaunchError("SLURM_JOB_ID is not set: export MASTER_PORT (a free port on rank 0's host)")
        found["MASTER_PORT"] = str(job_port(job))
    return {k: v for k, v in found.items() if k not in environ}


def outside_srun(environ: Mapping[str, str] | None = None) -> str | None:
    """A note when this process looks like a SLURM batch script (or salloc shell) of several
    tasks rather than one of srun's tasks: it runs alone; ``None`` otherwise."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_STEP_NUM_TASKS" in env or env.get("SLURM_NTASKS", "1").strip() in ("", "1"):
        return None
    return (f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process is not an srun task (no SLURM_STEP_NUM_TASKS): "
            "it trains alone; start it with srun (docs/slurm/vlmask.sbatch) to train as one job of all tasks")


def adopt_slurm(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the torch variables :func:`slurm_environment` finds into ``environ`` (default
    ``os.environ``, where ``init_process_group`` and this process's children read them);
    returns what it set. Calling it again changes nothing (``RANK`` is then set)."""
    target = os.environ if environ is None else environ
    found = slurm_environment(target)
    target.update(found)
    return found


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 when unset): what picks its GPU."""
    return int((os.environ if environ is None else environ).get("LOCAL_RANK", 0))


def in_turn(rank: int, local_rank: int, world_size: int, work: Callable[[bool], T]) -> T:
    """``work(progress)`` on every process, in three waves: rank 0 (``progress=True``), then the
    first process of every other node (``local_rank`` 0), then the rest, each wave after the one
    before has finished (barriers on the default group). What rank 0 writes to a disk the nodes
    share (under ``VLMASK_CACHE``: the built-in data set, caption embeddings, filled manifests)
    the others then read; a node whose disk is its own fills its copy once, by its first process,
    before that node's other processes read it. A wave that fails still meets the barriers, so
    the others go on (and redo the work, or fail too) rather than wait for ever; it raises after.
    One process: ``work(True)``."""
    if world_size == 1:
        return work(True)
    wave = 0 if rank == 0 else 1 if local_rank == 0 else 2
    result: Any = None
    failure: Exception | None = None
    for turn in range(3):
        if turn == wave:
            try:
                result = work(wave == 0)
            except Exception as error:  # raised after the barriers: the later waves must not hang
                failure = error
        dist.barrier()
    if failure is not None:
        raise failure
    return result
