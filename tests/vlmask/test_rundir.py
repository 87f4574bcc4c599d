"""Run-directory safety pieces: the writer lock, metrics.jsonl under kills, the same-recipe check,
and the non-finite loss guard."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vlmask.rundir import (
    LOCK_NAME,
    MetricsError,
    NonFiniteGuard,
    NonFiniteLoss,
    RunDirBusy,
    RunDirLock,
    RunDirMismatch,
    check_same_recipe,
    non_finite_parameters,
    read_metrics,
    truncate_metrics_after,
)

# --------------------------------------------------------------------------- (a) the lock

HOLD = textwrap.dedent("""
    import sys, time
    from vlmask.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1], command="vlmask run recipes/mae.yaml seed=3").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def hold_lock(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunDirBusy) as refused:
            RunDirLock(run_dir).acquire()
        message = str(refused.value)
        assert message.startswith(f"{run_dir} is in use by pid {holder.pid} on {socket.gethostname()} "
                                  f"(vlmask run recipes/mae.yaml seed=3, since ")
        assert message.endswith("; wait for it to finish, stop it, or choose another run.dir")
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holders_lock_is_recovered(tmp_path):
    """SIGKILL gives the holder no chance to clean up; the kernel drops its flock all the same."""
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (run_dir / LOCK_NAME).read_text(), "the dead holder's identity is still written"
    with RunDirLock(run_dir, command="the next run") as lock:
        assert lock.held
        assert json.loads((run_dir / LOCK_NAME).read_text())["command"] == "the next run"
    assert not lock.held
    with RunDirLock(run_dir):  # released on exit: taken again
        pass


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunDirLock(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path / "run").acquire()


#: ``holder.py RUN_DIR METHOD...`` takes the lock, then starts children the ways a training process
#: does, and prints their pids: two persistent DataLoader workers per start method named, a
#: multiprocessing.Process (fork) and a bare os.fork child. Every child outlives the holder for a while
#: (DataLoader workers notice their parent's death only at their next 5 s status check).
FORKING_HOLDER = textwrap.dedent("""
    import multiprocessing, os, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from vlmask.rundir import RunDirLock

    class Pids(Dataset):
        def __len__(self):
            return 1000
        def __getitem__(self, index):
            return os.getpid()

    def linger():
        time.sleep(120)

    if __name__ == "__main__":
        lock = RunDirLock(sys.argv[1], command="vlmask run recipes/mae.yaml").acquire()
        children, loaders = [], []
        for method in sys.argv[2:]:
            loader = DataLoader(Pids(), batch_size=1, num_workers=2, persistent_workers=True,
                                multiprocessing_context=method)
            batches = iter(loader)
            children += [int(next(batches)) for _ in range(2)]  # in order: worker 0, then worker 1
            loaders.append(batches)
        process = multiprocessing.get_context("fork").Process(target=linger)
        process.start()
        children.append(process.pid)
        pid = os.fork()
        if pid == 0:
            linger()
            os._exit(0)
        children.append(pid)
        print("held", *children, flush=True)
        time.sleep(120)
""")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_holder_then_lock(tmp_path: Path, methods: list[str]) -> None:
    """Start FORKING_HOLDER, SIGKILL it (the holder only), take the lock while every child it
    left is alive (so the lock was not won by waiting for them), then stop the children."""
    run_dir = tmp_path / "run"
    (tmp_path / "holder.py").write_text(FORKING_HOLDER)
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(run_dir), *methods],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    children: list[int] = []
    try:
        words = holder.stdout.readline().split()
        assert words[:1] == ["held"], "the holder did not start its children"
        children = [int(w) for w in words[1:]]
        assert len(children) == 2 * len(methods) + 2
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with RunDirLock(run_dir, command="the next run") as lock:
            assert lock.held
            assert all(alive(pid) for pid in children), "every child outlived the holder while the lock was taken"
    finally:
        holder.kill()
        holder.wait()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_children_of_a_killed_holder_do_not_keep_its_lock(tmp_path):
    """Issue 22: ``vlmask run`` SIGKILLed (as the OOM killer does, the main process only) and run
    again at once was refused as busy, naming the dead process: its forked DataLoader workers
    shared the flock'd open file and outlived it by seconds."""
    kill_holder_then_lock(tmp_path, ["fork"])


@pytest.mark.slow  # each spawned or forkserver worker imports torch afresh: ~20 s on 2 busy cores
def test_spawned_and_forkserver_workers_do_not_keep_the_lock(tmp_path):
    kill_holder_then_lock(tmp_path, ["spawn", "forkserver"])


def test_a_forked_child_cannot_release_or_damage_its_parents_lock(tmp_path):
    """The child's copy of the RunDirLock is not held there, and releasing it there (a ``with``
    block left in the child) neither unlocks the parent's lock nor touches whatever file now has
    the descriptor number."""
    with RunDirLock(tmp_path / "run") as lock:
        pid = os.fork()
        if pid == 0:
            code = 0 if not lock.held else 1
            lock.release()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the lock is not held in the child"
        assert lock.held
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path / "run").acquire()


#: Holds the lock and hands its descriptor to ``sleep`` (pass_fds: an inheritance vlmask does not
#: control, as a library forking in C would), then prints the sleeper's pid.
LEAKING_HOLDER = textwrap.dedent("""
    import subprocess, sys, time
    from vlmask.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1], command="vlmask run recipes/mae.yaml").acquire()
    sleeper = subprocess.Popen(["sleep", "120"], pass_fds=[lock._fd])
    print("held", sleeper.pid, flush=True)
    time.sleep(120)
""")


def leak_lock(run_dir: Path) -> tuple[subprocess.Popen, int]:
    holder = subprocess.Popen([sys.executable, "-c", LEAKING_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    words = holder.stdout.readline().split()
    assert words[:1] == ["held"]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    return holder, int(words[1])


def test_a_dead_holders_leftover_process_is_waited_for_with_a_message(tmp_path):
    """The fallback: the recorded holder is dead but a process it left still has the lock's open
    file; the next writer says so and waits for it (here it is stopped after a moment)."""
    run_dir = tmp_path / "run"
    holder, sleeper = leak_lock(run_dir)
    warnings: list[str] = []
    stopper = threading.Timer(1.0, os.kill, (sleeper, signal.SIGKILL))
    stopper.start()
    lock = RunDirLock(run_dir, command="the next run")
    try:
        lock.acquire(warn=warnings.append)
        assert lock.held and not alive(sleeper)
    finally:
        lock.release()
        stopper.cancel()
        if alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)
    (warning,) = warnings
    assert warning.startswith(f"{run_dir}: its last holder, pid {holder.pid} on {socket.gethostname()} "
                              f"(vlmask run recipes/mae.yaml, since ")
    assert f"is dead, but process {sleeper} it left still holds {run_dir / LOCK_NAME}; waiting up to " in warning


def test_a_leftover_process_that_does_not_exit_is_named_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    holder, sleeper = leak_lock(run_dir)
    try:
        with pytest.raises(RunDirBusy) as refused:
            RunDirLock(run_dir).acquire(orphan_wait=0.5, warn=lambda message: None)
        message = str(refused.value)
        assert "\n" not in message
        assert message == (f"{run_dir} is still locked by process {sleeper}, left by its dead holder pid {holder.pid}; "
                           f"stop it (kill {sleeper}) or choose another run.dir")
        assert alive(sleeper), "a leftover process is named, never killed"
    finally:
        os.kill(sleeper, signal.SIGKILL)


# --------------------------------------------------------------------------- (b) metrics.jsonl

def write_metrics(path: Path, steps: list[int], tail: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def test_a_torn_last_line_is_ignored_with_a_warning_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [1, 2, 3], tail='{"step": 4, "lo')
    warnings: list[str] = []
    assert [r["step"] for r in read_metrics(path, warn=warnings.append)] == [1, 2, 3]
    assert warnings == [f"{path}:4: the last line is incomplete (a kill while it was written); ignored"]
    write_metrics(path, [1, 2], tail="\0\0\0\0")  # what a crash can leave after the last write
    assert [r["step"] for r in read_metrics(path, warn=warnings.append)] == [1, 2] and len(warnings) == 1


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(MetricsError, match=rf"^{path}:2: invalid JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"loss": 2}\n{"step": 3}\n')
    with pytest.raises(MetricsError, match=rf"^{path}:2: no integer 'step'"):
        read_metrics(path)


def test_truncate_keeps_lines_byte_for_byte_and_replaces_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 0.30000000000000004}', '{"step":2,"loss":NaN}', '{"step": 3}', '{"step": 4}']
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    inode = path.stat().st_ino
    assert truncate_metrics_after(path, 2, warn=lambda m: None) == 2
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert path.stat().st_ino != inode, "written beside and renamed over, not rewritten in place"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert truncate_metrics_after(tmp_path / "absent.jsonl", 2) == 0 and not (tmp_path / "absent.jsonl").exists()


# --------------------------------------------------------------------------- (c) the same recipe

RECIPE = {"seed": 0, "train": {"max_steps": 10, "batch_size": 4}, "optim": {"lr": 0.001},
          "masker": {"name": "tube", "ratio": 0.9}, "data": {"num_workers": 2}, "run": {"dir": "r"}}


def stored_run(tmp_path: Path, finished: bool = True) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {**json.loads(json.dumps(RECIPE)), "record": {"recipe": "recipes/mae.yaml", "overrides": []}}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    if finished:
        (run_dir / "summary.json").write_text("{}")
    return run_dir


def changed(**edits) -> dict:
    config = json.loads(json.dumps(RECIPE))
    for dotted, value in edits.items():
        *parents, leaf = dotted.split("__")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def test_a_new_directory_and_the_same_recipe(tmp_path):
    assert check_same_recipe(tmp_path / "nothing", RECIPE).status == "new"
    run_dir = stored_run(tmp_path)
    same = check_same_recipe(run_dir, changed(data__num_workers=0, run__dir="elsewhere"))
    assert (same.status, same.finished) == ("same", True)
    assert same.message() == f"{run_dir}: already finished with this recipe (summary.json exists); nothing to do"
    same.raise_if_refused()


def test_other_overrides_or_another_recipe_are_refused_naming_the_keys(tmp_path):
    run_dir = stored_run(tmp_path)
    check = check_same_recipe(run_dir, changed(optim__lr=0.002, masker__ratio=0.75),
                              overrides=["optim.lr=0.002", "masker.ratio=0.75"], recipe="recipes/fils.yaml")
    assert check.status == "refused"
    assert [d.key for d in check.differences] == ["masker.ratio", "optim.lr"]
    assert check.message() == (
        f"{run_dir} was trained with another recipe (it was trained from recipes/mae.yaml, this is recipes/fils.yaml): "
        "masker.ratio: 0.9 in the run, 0.75 now (command line: masker.ratio=0.75); "
        "optim.lr: 0.001 in the run, 0.002 now (command line: optim.lr=0.002); use another run.dir, or the run's own settings")
    with pytest.raises(RunDirMismatch, match="masker.ratio"):
        check.raise_if_refused()
    removed = check_same_recipe(run_dir, {k: v for k, v in RECIPE.items() if k != "masker"}, overrides=["~masker"])
    assert [str(d) for d in removed.differences] == [
        'masker.name: "tube" in the run, (absent) now (command line: ~masker)',
        "masker.ratio: 0.9 in the run, (absent) now (command line: ~masker)"]


def test_only_a_grown_max_steps_may_continue(tmp_path):
    run_dir = stored_run(tmp_path)
    grown = check_same_recipe(run_dir, changed(train__max_steps=30), overrides=["train.max_steps=30"])
    assert (grown.status, grown.steps) == ("extend", (10, 30))
    assert grown.message() == f"{run_dir}: continuing from step 10 to train.max_steps=30 (the learning-rate schedule is recomputed for 30 steps)"
    assert check_same_recipe(run_dir, changed(train__max_steps=5)).status == "refused"
    both = check_same_recipe(run_dir, changed(train__max_steps=30, seed=1))
    assert both.status == "refused" and [d.key for d in both.differences] == ["seed", "train.max_steps"]


def test_a_damaged_config_is_named(tmp_path):
    run_dir = stored_run(tmp_path)
    (run_dir / "config.yaml").write_text("seed: [unclosed\n")
    with pytest.raises(RunDirMismatch, match=rf"^{run_dir / 'config.yaml'}: cannot be read"):
        check_same_recipe(run_dir, RECIPE)


# --------------------------------------------------------------------------- (d) the non-finite guard

def test_the_guard_names_the_first_bad_step_not_the_step_it_is_read(tmp_path):
    guard = NonFiniteGuard("cpu", start_step=100)
    losses = [1.0, 0.9, float("nan"), float("inf"), 0.5]
    for loss in losses:  # steps 101..105
        guard.observe(torch.tensor(loss), {"pixels": torch.tensor(loss), "clip": torch.tensor(2.0)})
    assert guard.first_bad_step() == 103
    with pytest.raises(NonFiniteLoss) as caught:
        guard.check(noticed_at=110, kept=tmp_path / "step_00000102")
    assert caught.value.step == 103
    assert str(caught.value) == (
        f"loss is nan at step 103 (noticed at step 110); non-finite terms: pixels=nan (first at step 103); "
        f"no checkpoint was saved after it, the last good one is {tmp_path / 'step_00000102'}; "
        "try train.precision fp32/bf16, a lower optim.lr or train.grad_clip")


def test_the_guard_is_quiet_while_every_loss_is_finite():
    guard = NonFiniteGuard("cpu")
    for loss in (3.0, 2.0, 1.0):
        guard.observe(torch.tensor(loss))
    assert guard.first_bad_step() is None
    guard.check()


def test_the_guard_records_on_the_device_without_reading_back(monkeypatch):
    """``observe`` never turns a tensor into a Python value (the host-device sync on a GPU):
    ``Tensor.item`` / ``__bool__`` / ``tolist`` are made to fail while it runs."""
    guard = NonFiniteGuard("cpu")

    def sync(*args, **kwargs):
        raise AssertionError("observe read a tensor back to the host")

    for name in ("item", "__bool__", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    guard.observe(torch.tensor(float("nan")), {"a": torch.tensor(1.0)})
    guard.observe(torch.tensor(1.0), {"a": torch.tensor(float("inf"))})
    monkeypatch.undo()
    assert guard.first_bad_step() == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_guard_on_cuda_never_synchronises_while_observing():
    """CUDA's sync debug mode turns any host-device synchronisation into an error."""
    losses = [torch.tensor(v, device="cuda") for v in (1.0, float("nan"), 2.0)]
    guard = NonFiniteGuard("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss in losses:
            guard.observe(loss, {"pixels": loss})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard._first_bad.device.type == "cuda" and guard.first_bad_step() == 2


def test_non_finite_parameters_are_named():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert non_finite_parameters(module) == []
    with torch.no_grad():
        module[1].bias.fill_(float("inf"))
    assert non_finite_parameters(module) == ["1.bias"]


def test_busy_holder_names_a_live_holder_and_writes_nothing(tmp_path):
    """``vlmask compare`` asks it before training (issue 22.2): no folder made, no lock kept."""
    from vlmask.rundir import RunDirLock, busy_holder

    assert busy_holder(tmp_path / "nowhere") is None and not (tmp_path / "nowhere").exists()
    with RunDirLock(tmp_path / "run", command="vlmask run r.yaml"):
        assert busy_holder(tmp_path / "run").startswith(f"pid {os.getpid()} on ")
        assert "(vlmask run r.yaml, since " in busy_holder(tmp_path / "run")
    assert busy_holder(tmp_path / "run") is None
    with RunDirLock(tmp_path / "run"):  # the probe left no lock behind
        pass


# --------------------------------------------------------------------------- (e) one run directory for every node
def _shared_worker(rank: int, root: str, out: str) -> None:
    """Rank 0 locks ``root/shared``; three checks follow: the same directory and step (passes), a
    directory of rank 1's own (another "disk"), the same directory at another step."""
    import torch.distributed as dist

    from vlmask.rundir import RunDirLock, RunDirNotShared, check_shared

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    lock = RunDirLock(Path(root) / "shared").acquire() if rank == 0 else None
    results = []
    for run_dir, step in (("shared", 4), ("shared" if rank == 0 else "own", 4), ("shared", 4 if rank == 0 else 0)):
        try:
            check_shared(Path(root) / run_dir, step, rank, 2)
            results.append("ok")
        except RunDirNotShared as error:
            results.append(str(error))
    if lock is not None:
        lock.release()
    dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(results))


def test_every_rank_must_see_the_run_directory_rank_0_locked(tmp_path):
    import multiprocessing

    (tmp_path / "own").mkdir()
    (tmp_path / "own" / LOCK_NAME).write_text('{"pid": 1, "host": "an old run on a disk of its own"}')
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_shared_worker, args=(r, str(tmp_path), str(tmp_path / "out"))) for r in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert [r.split(": ", 1)[-1] for r in results[0]] == [r.split(": ", 1)[-1] for r in results[1]], \
        "every rank raises alike (each naming its run.dir): none waits for ever"
    ok, own_disk, other_step = results[0]
    host = socket.gethostname()
    assert ok == "ok"
    assert own_disk == (f"{tmp_path}/shared: rank 1 (host {host}) does not see the lock that rank 0 (host {host}) "
                        "holds there: run.dir must be on a disk every node shares")
    assert other_step.endswith(f"rank 1 (host {host}) would resume at step 0 and rank 0 (host {host}) at step 4: "
                               "run.dir must be on a disk every node shares")
