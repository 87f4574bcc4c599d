"""Preemption (vlmask.preemption): real processes, real signals. A SIGTERM or SIGUSR1 stops
``vlmask run`` after its step with one checkpoint of that step and exit code 75; the same
command resumes it exactly (the same metrics.jsonl and final_loss as a run never stopped);
more signals while it saves change nothing; DataLoader workers ignore the signals; torchrun's
ranks stop at the same step whichever of them got the signal."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vlmask.checkpoint import latest_checkpoint, load_state, load_tensors
from vlmask.data_loading import WorkerSignals, worker_init
from vlmask.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch, signal_numbers

RECIPES = Path(__file__).parents[2] / "recipes"
STEPS = 24  # enough that a signal sent once the first metrics line is there lands long before the end
TINY = [
    f"train.max_steps={STEPS}", "train.ckpt_every=8", "train.log_every=3", "train.batch_size=4", "train.accumulate=2",
    "data.num_workers=0", "data.dataset.num_frames=8", "data.dataset.size=32", "model.encoder.embed_dim=32",
    "model.encoder.depth=1", "model.encoder.num_heads=2", "model.predictor.dim=32", "model.predictor.depth=1",
    "model.predictor.num_heads=2", "device=cpu",
]
TIMEOUT_S = 300.0


# ------------------------------------------------------------------------------------------ helpers
def command(train: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["run", str(RECIPES / "fils.yaml"), f"data.train={train}", f"run.dir={run_dir}", *TINY, *extra]


def start(args: list[str], cache: Path, launcher: tuple[str, ...] = (sys.executable, "-m", "vlmask")) -> subprocess.Popen[str]:
    """``vlmask run`` in a session of its own (a signal to its group reaches nothing of pytest)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(cache),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}  # torchrun: how long its agent waits for the save (default 30 s)
    return subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    """Poll ``condition`` until it holds; fail at once if the process ended first (no sleep assumes a speed)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} within {TIMEOUT_S} s")
        time.sleep(0.005)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for the process; past the timeout kill it, its session and torchrun's workers (they
    have sessions of their own), and fail."""
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in workers_of(process.pid).values():
            os.kill(pid, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"still running after {TIMEOUT_S} s (ranks that disagree wait for each other):\n{err[-3000:]}")
    return process.returncode, out, err


def stopped_step(stderr: str) -> int:
    line = next((l for l in stderr.splitlines() if l.startswith("preempted at step ")), None)
    assert line is not None, stderr[-3000:]
    return int(line.split()[3])


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "clips_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_in_process(args: list[str]) -> int:
    """``vlmask run`` in this process (the same command as the subprocess, cheaper to start), on
    one thread as the subprocesses (OMP_NUM_THREADS=1): another thread count sums in another order."""
    from vlmask.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def assert_preempted_at(run_dir: Path, step: int) -> None:
    """One checkpoint of ``step`` that loads, ``latest`` naming it, metrics up to it, no summary."""
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step_{step:08d}", checkpoint
    assert load_state(checkpoint / "state.pt")["step"] == step
    assert load_tensors(checkpoint / "student.safetensors") and load_tensors(checkpoint / "teacher.safetensors")
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "no half-written checkpoint"
    assert not (run_dir / "summary.json").exists(), "a preempted run is not finished"
    assert logged_steps(run_dir) == list(range(3, step + 1, 3)), "metrics of every logged step up to the stop"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_synth: tuple[Path, Path]) -> dict[str, Any]:
    """The run never stopped: its metrics and final loss, for the resumed runs to equal."""
    root = tmp_path_factory.mktemp("preemption")
    os.environ["VLMASK_CACHE"] = str(root / "cache")  # the module's runs share one cache (restored below)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert run_in_process(command(tiny_synth[0], root / "reference")) == 0
        assert {s: signal.getsignal(s) for s in before} == before, "vlmask run restored the signal handlers"
        yield {"root": root, "train": tiny_synth[0], "metrics": metrics(root / "reference"),
               "final_loss": json.loads((root / "reference" / "summary.json").read_text())["final_loss"]}
    finally:
        os.environ.pop("VLMASK_CACHE", None)


def assert_resumes_exactly(reference: dict[str, Any], run_dir: Path, stopped: int) -> None:
    assert run_in_process(command(reference["train"], run_dir)) == 0  # the same command again
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped
    assert summary["final_loss"] == reference["final_loss"]
    assert metrics(run_dir) == reference["metrics"], "the same metrics.jsonl, the window cut by the stop included"


# ------------------------------------------------------------------------------------------ the parts
def test_the_watch_records_signals_and_gives_the_handlers_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionWatch(["SIGTERM", "SIGUSR1"]) as watch:
        assert watch.agreed(world_size=1) == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to this thread; the handler runs at the next bytecode
        os.kill(os.getpid(), signal.SIGTERM)  # a second one only counts: this process lives on
        assert (watch.received, watch.count) == (signal.SIGUSR1, 2)
        assert watch.agreed(world_size=1) == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in before} == before
    with PreemptionWatch([]) as off:  # train.preempt_signals: [] watches nothing
        assert not off.installed and off.agreed(world_size=1) == 0


class SignalsItself(Dataset):
    """Each item sends its loading process the signals a scheduler sends a job's process group."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        return index


def test_dataloader_workers_ignore_the_preemption_signals() -> None:
    """Without it a worker dies of the SIGTERM and the main process fails with "DataLoader worker
    ... exited unexpectedly" instead of finishing its step and saving."""
    signals = WorkerSignals(signal_numbers(["SIGTERM", "SIGUSR1"]))
    loader = DataLoader(SignalsItself(), num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=functools.partial(worker_init, signals=signals))
    assert [int(b) for b in loader] == [0, 1, 2, 3]
    signals.release()


EXITS_WITH_LIVE_WORKERS = """
import functools, sys
from torch.utils.data import DataLoader
from vlmask.data_loading import WorkerSignals, worker_init
from vlmask.preemption import signal_numbers

signals = WorkerSignals(signal_numbers(["SIGTERM", "SIGUSR1"]))
loader = DataLoader(list(range(4)), num_workers=1, persistent_workers=True, multiprocessing_context=sys.argv[1],
                    worker_init_fn=functools.partial(worker_init, signals=signals))
assert [int(b) for b in loader] == [0, 1, 2, 3]
print("trained")  # the loader and its worker live on: Python's exit ends the worker with SIGTERM
"""


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_a_process_exits_while_its_dataloader_workers_live(context: str) -> None:
    """multiprocessing's exit hook SIGTERMs, then joins, daemonic workers: a worker that ignored
    SIGTERM for good would hang it (a library caller, an uncaught error keeping the loader)."""
    result = subprocess.run([sys.executable, "-c", EXITS_WITH_LIVE_WORKERS, context], capture_output=True, text=True,
                            timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "trained" in result.stdout, result.stderr[-3000:]


def test_an_unknown_signal_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    from vlmask.config import load_recipe
    from vlmask.plugins import default_plugins
    from vlmask.schema import settings, validate

    assert settings(load_recipe(RECIPES / "fils.yaml"), "train").preempt_signals == ["SIGTERM", "SIGUSR1"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: [{RECIPES / 'fils.yaml'}]\ntrain:\n  preempt_signals: [SIGTERM, SIGTREM]\n")
    problems = validate(load_recipe(recipe), default_plugins().registry)
    assert problems == [f"{recipe}:3: key train.preempt_signals: unknown signal 'SIGTREM' (did you mean 'SIGTERM'?); "
                        "allowed: SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP, SIGQUIT, SIGXCPU; [] disables preemption"], problems
    assert validate(load_recipe(RECIPES / "fils.yaml", ["train.preempt_signals=[]"]), default_plugins().registry) == []


# ------------------------------------------------------------------------------------------ one process
def test_sigterm_to_the_process_group_stops_at_a_step_and_the_same_command_resumes_exactly(reference) -> None:
    """The scheduler signals every process of the job (DataLoader workers too): exit 75 after one
    checkpoint of the step it stopped at; the same command finishes the run as if never stopped."""
    run_dir = reference["root"] / "sigterm"
    args = command(reference["train"], run_dir, "data.num_workers=1")
    process = start(args, reference["root"] / "cache")
    wait_until(lambda: bool(logged_steps(run_dir)), process, "the first metrics line")
    os.killpg(process.pid, signal.SIGTERM)
    code, out, err = finish(process)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    stopped = stopped_step(err)
    assert 3 <= stopped < STEPS, "stopped after the first logged step, before the end"
    assert f"preempted at step {stopped} by SIGTERM; checkpoint {run_dir / 'checkpoints' / f'step_{stopped:08d}'}; " \
           "rerun the same command to resume" in err
    assert "exited unexpectedly" not in err
    assert_preempted_at(run_dir, stopped)
    assert_resumes_exactly(reference, run_dir, stopped)


def test_signals_while_it_saves_change_nothing(reference) -> None:
    """SIGUSR1 (SLURM's warning), then SIGTERM after SIGTERM until the process is gone: every phase
    of the stop, the checkpoint write included, meets a signal. Still exit 75, a checkpoint that
    loads, and an exact resume."""
    run_dir = reference["root"] / "storm"
    process = start(command(reference["train"], run_dir), reference["root"] / "cache")
    wait_until(lambda: bool(logged_steps(run_dir)), process, "the first metrics line")
    process.send_signal(signal.SIGUSR1)
    sent = 0
    while process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGTERM)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.001)
    code, out, err = finish(process)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    assert sent > 1
    stopped = stopped_step(err)
    assert f"preempted at step {stopped} by SIGUSR1;" in err, "the first signal is the one named"
    assert_preempted_at(run_dir, stopped)
    assert_resumes_exactly(reference, run_dir, stopped)


# ------------------------------------------------------------------------------------------ torchrun
def torchrun_command(train: Path, run_dir: Path, *extra: str) -> tuple[tuple[str, ...], list[str]]:
    launcher = ("torchrun", "--standalone", "--nproc_per_node", "2", "-m", "vlmask")
    return launcher, command(train, run_dir, *extra)


def workers_of(agent: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun's agent started (read from /proc: their RANK)."""
    ranks = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields["PPid"]) != agent:
                continue
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = int(status.parent.name)
    return ranks


needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None or not Path("/proc/self/environ").exists(),
                                    reason="torchrun and /proc needed")


@needs_torchrun
def test_under_torchrun_a_signal_to_one_rank_stops_both_at_the_same_step(reference) -> None:
    """Only rank 1 gets SIGUSR1: the ranks agree after each step (all_reduce MAX), both save
    (rank 0 writes) and exit 75 at the same step; torchrun itself reports the failure (exit 1)."""
    run_dir = reference["root"] / "torchrun-rank1"
    launcher, args = torchrun_command(reference["train"], run_dir)
    process = start(args, reference["root"] / "cache", launcher)
    wait_until(lambda: bool(logged_steps(run_dir)) and 1 in workers_of(process.pid), process, "rank 1 trains")
    os.kill(workers_of(process.pid)[1], signal.SIGUSR1)
    code, out, err = finish(process)
    assert code == 1, err[-3000:]  # torchrun: ChildFailedError, listing each worker's exit code
    assert err.count("exitcode  : 75") == 2, err[-3000:]
    stopped = stopped_step(err)
    assert err.count("preempted at step") == 1, "rank 0 prints the line"
    assert f"preempted at step {stopped} by SIGUSR1;" in err, "rank 0 names the signal rank 1 got"
    assert_preempted_at(run_dir, stopped)


@needs_torchrun
@pytest.mark.slow
def test_under_torchrun_sigterm_to_the_agent_stops_fsdp_ranks_and_the_same_command_resumes_exactly(reference) -> None:
    """SIGTERM to torchrun (what a scheduler sends the job): the agent forwards it to each
    worker's process group (DataLoader workers included) and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT;
    the FSDP ranks save one checkpoint together; the same torchrun command resumes it exactly."""
    root, train = reference["root"], reference["train"]
    extra = ("train.parallel=fsdp", "data.num_workers=1")

    def torchrun(run_dir: Path) -> subprocess.Popen[str]:
        launcher, args = torchrun_command(train, run_dir, *extra)
        return start(args, root / "cache", launcher)

    code, _, err = finish(torchrun(root / "torchrun-reference"))
    assert code == 0, err[-3000:]
    run_dir = root / "torchrun-sigterm"
    process = torchrun(run_dir)
    wait_until(lambda: bool(logged_steps(run_dir)), process, "the first metrics line")
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == 1 and "SignalException" in err, err[-3000:]  # torchrun re-raises the signal it got
    stopped = stopped_step(err)
    assert "exited unexpectedly" not in err
    assert_preempted_at(run_dir, stopped)
    code, _, err = finish(torchrun(run_dir))
    assert code == 0 and f"resumed at step {stopped}" in err, err[-3000:]
    reference_summary = json.loads((root / "torchrun-reference" / "summary.json").read_text())
    assert json.loads((run_dir / "summary.json").read_text())["final_loss"] == reference_summary["final_loss"]
    assert metrics(run_dir) == metrics(root / "torchrun-reference")
