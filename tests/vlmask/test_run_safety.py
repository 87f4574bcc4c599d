"""Run-directory safety through the real command line (issue 14, items 3, 4, 5 and 8): one
writer per run directory, a non-finite loss named at its step with no bad checkpoint saved, a
re-run with another recipe refused (a larger max_steps continues), a torn metrics line and a
killed writer's temporary folder cleaned at resume, final_loss the last step's loss.

Each test fails on the engine before vlmask/rundir.py was wired into it (checked in a scratch copy).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlmask.checkpoint import _host
from vlmask.rundir import RunDirLock

RECIPES = Path(__file__).parents[2] / "recipes"

#: The real CLI, killed (SIGKILL) right after the checkpoint of step ``AT`` is complete.
KILL_AFTER_SAVE = r"""
import os, signal, sys
import vlmask.checkpoint as ck
at = int(sys.argv[1])
real = ck.save_checkpoint
def save_checkpoint(folder, step, *args, **kwargs):
    path = real(folder, step, *args, **kwargs)
    if step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
ck.save_checkpoint = save_checkpoint
from vlmask.cli import main
sys.exit(main(sys.argv[2:]))
"""


def vlmask(*args: str, kill_after_save: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    command = ([sys.executable, "-c", KILL_AFTER_SAVE, str(kill_after_save)] if kill_after_save is not None
               else [sys.executable, "-m", "vlmask"])
    return subprocess.run([*command, *args], capture_output=True, text=True, env=dict(os.environ), timeout=timeout)


def tiny_run(tiny_synth, tiny_scale, run_dir: Path, *extra: str) -> list[str]:
    return ["run", str(RECIPES / "mae.yaml"), f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", *tiny_scale, *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- item 5: one writer

def start_run(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlmask", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))


def wait_for_metrics(run: subprocess.Popen, run_dir: Path, more_than: int) -> None:
    deadline = time.monotonic() + 300
    path = run_dir / "metrics.jsonl"
    while not path.is_file() or len(path.read_text().splitlines()) <= more_than:
        assert run.poll() is None and time.monotonic() < deadline, "the run did not train"
        time.sleep(0.5)


def test_a_second_run_on_the_same_directory_is_refused_and_a_killed_ones_lock_recovered(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    run_dir = tmp_path / "run"
    args = tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=100000", "train.log_every=1", "train.ckpt_every=5")
    first = start_run(args)
    try:
        wait_for_metrics(first, run_dir, 0)
        second = vlmask(*args, timeout=120)
        assert second.returncode == 2, second.stderr
        (line,) = [l for l in second.stderr.splitlines() if "is in use by" in l]
        assert f"{run_dir} is in use by pid {first.pid} on {socket.gethostname()} (" in line
        assert "vlmask run" in line and "since " in line
        assert first.poll() is None, "the holder keeps training"
    finally:
        first.send_signal(signal.SIGKILL)  # its lock is now stale
        first.wait()
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == sorted(set(steps)), "no metrics line written twice"
    third = start_run(args)
    try:
        wait_for_metrics(third, run_dir, len(steps) + 1)  # took the stale lock, resumed, trains
    finally:
        third.send_signal(signal.SIGKILL)
        _, err = third.communicate()
    assert "is in use by" not in err


# --------------------------------------------------------------------------- item 4: NaN at the step it happens

def test_a_non_finite_loss_names_its_first_step_and_no_bad_checkpoint_is_saved(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    """lr 1e12 without warm-up or clipping: the loss is finite at step 1, NaN from step 2. With
    log_every=10 and ckpt_every=1, today's engine saves NaN checkpoints up to step 10 (rotating the
    good one out) and names step 10."""
    run_dir = tmp_path / "run"
    result = vlmask(*tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=10", "train.log_every=10",
                              "train.ckpt_every=1", "optim.lr=1e12", "optim.warmup_steps=0", "train.grad_clip=null"))
    assert result.returncode == 1, result.stderr
    (line,) = [l for l in result.stderr.splitlines() if "loss is" in l]
    assert "loss is nan at step 2" in line and "no checkpoint was saved after it" in line
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert all(int(name.split("_")[1]) < 2 for name in checkpoints)
    for name in checkpoints:
        assert all(t.isfinite().all() for t in load_file(str(run_dir / "checkpoints" / name / "student.safetensors")).values())


@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_non_finite_weights_are_never_saved_in_either_layout(layout, tmp_path, tiny_synth, tiny_scale, isolated_cache):
    import torch

    from vlmask.config import load_recipe
    from vlmask.engine import Trainer
    from vlmask.rundir import NonFiniteLoss

    recipe = load_recipe(RECIPES / "mae.yaml", [f"data.train={tiny_synth[0]}", f"run.dir={tmp_path / 'run'}",
                                                "train.max_steps=2", "train.parallel=fsdp",
                                                f"train.checkpoint_format={layout}", *tiny_scale])
    with Trainer(recipe) as trainer:
        assert trainer.checkpoint_format == layout
        trainer.save(1)
        with torch.no_grad():
            trainer.train_step.student.encoder.patch_embed.weight[0, 0] = float("nan")
        with pytest.raises(NonFiniteLoss, match=r"not saving step 2: non-finite weights in student.encoder.patch_embed"
                                                r".weight; the last good checkpoint is .*step_00000001"):
            trainer.save(2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_00000001"]


# --------------------------------------------------------------------------- item 8: re-runs, torn metrics, final_loss

def test_a_finished_run_dir_with_other_overrides_is_refused_naming_the_keys(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    run_dir = tmp_path / "run"
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=2")).returncode == 0
    other = vlmask(*tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=2", "masker.ratio=0.5"))
    assert other.returncode == 2, other.stderr
    assert "masker.ratio: 0.9 in the run, 0.5 now (command line: masker.ratio=0.5)" in other.stderr
    fils = vlmask("run", str(RECIPES / "fils.yaml"), f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", *tiny_scale)
    assert fils.returncode == 2 and "was trained with another recipe" in fils.stderr
    same = vlmask(*tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=2"))
    assert same.returncode == 0 and "nothing to do" in same.stdout + same.stderr


def test_a_grown_max_steps_continues_a_finished_run_deliberately(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    run_dir = tmp_path / "run"
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=2", "train.log_every=1")).returncode == 0
    more = vlmask(*tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=4", "train.log_every=1"))
    assert more.returncode == 0, more.stderr
    assert f"{run_dir}: continuing from step 2 to train.max_steps=4" in more.stderr
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_a_torn_last_metrics_line_is_named_and_resume_goes_on(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    run_dir = tmp_path / "run"
    args = tiny_run(tiny_synth, tiny_scale, run_dir, "train.max_steps=4", "train.log_every=1", "train.ckpt_every=2")
    assert vlmask(*args, kill_after_save=2).returncode == -signal.SIGKILL
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')  # the kill came mid-line
    lines = len((run_dir / "metrics.jsonl").read_text().splitlines())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = run_dir / "checkpoints" / f".tmp-step_00000003-{_host()}-{int(dead.stdout)}"  # a killed writer's folder
    orphan.mkdir()
    (orphan / "student.safetensors").write_bytes(b"half written")
    resumed = vlmask(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: {run_dir / 'metrics.jsonl'}:{lines}: the last line is incomplete" in resumed.stderr
    assert f"removed {orphan} (a checkpoint write that never finished)" in resumed.stderr  # at resume, not at a save
    assert not orphan.exists()
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]


def test_final_loss_is_the_last_steps_loss_also_after_a_resume(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    """max_steps=6, log_every=4, ckpt_every=5: uninterrupted, the last log window is steps 5-6;
    killed after step 5's checkpoint and resumed, it is step 6 alone. final_loss must not depend
    on that: it is the loss of step 6 (or the key says it is a window mean). Killed after the
    final checkpoint (before summary.json), the resume must not write final_loss null."""
    settings = ("train.max_steps=6", "train.log_every=4", "train.ckpt_every=5")
    straight, resumed, at_end = tmp_path / "straight", tmp_path / "resumed", tmp_path / "at_end"
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, straight, *settings)).returncode == 0
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, resumed, *settings), kill_after_save=5).returncode == -signal.SIGKILL
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, resumed, *settings)).returncode == 0
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, at_end, *settings), kill_after_save=6).returncode == -signal.SIGKILL
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, at_end, *settings)).returncode == 0
    finals = [json.loads((d / "summary.json").read_text())["final_loss"] for d in (straight, resumed, at_end)]
    assert finals[0] is not None and math.isfinite(finals[0])
    assert finals[0] == pytest.approx(finals[1], abs=1e-6) and finals[0] == pytest.approx(finals[2], abs=1e-6)


# --------------------------------------------------------------------------- issue 22: killed, run again at once

def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (its DataLoader workers), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_after_first_checkpoint_and_rerun(run_dir: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Start ``vlmask run`` with two DataLoader workers, SIGKILL its main process only (as the OOM
    killer does) as soon as a complete checkpoint appears, and run the same command again at once.

    Before the re-run, the lock is taken and given back right here while the killed run's workers
    still live (asserted): the re-run needs a few seconds to reach its lock, the orphaned workers
    exit about 5 s after their parent, so only this probe makes the test fail on the old lock
    every time, however busy the machine. The first run has its own process group, so that
    whatever it leaves (a hung worker too) is killed at the end and never holds the test."""
    first = subprocess.Popen([sys.executable, "-m", "vlmask", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "checkpoints").glob("step_*")):
            assert first.poll() is None and time.monotonic() < deadline, "the run did not reach its first checkpoint"
            time.sleep(0.02)
        workers = child_pids(first.pid)
        assert len(workers) >= 2, "the DataLoader workers run"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        with RunDirLock(run_dir, command="probe"):
            assert all(running(pid) for pid in workers), "the killed run's workers outlive it while its lock is taken"
        return vlmask(*args, timeout=300)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        first.wait()


KILLED = ("data.num_workers=2", "train.max_steps=4", "train.ckpt_every=2", "train.log_every=1")


def test_a_run_killed_with_live_workers_resumes_at_once(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    run_dir = tmp_path / "run"
    again = kill_after_first_checkpoint_and_rerun(run_dir, tiny_run(tiny_synth, tiny_scale, run_dir, *KILLED))
    assert again.returncode == 0, again.stderr
    assert "is in use by" not in again.stderr and "waiting up to" not in again.stderr
    assert re.search(r"resumed at step [24]\b", again.stdout + again.stderr)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow  # three tiny runs with workers: ~30 s on 2 busy cores
def test_a_run_killed_with_live_workers_ends_with_the_uninterrupted_runs_loss(tmp_path, tiny_synth, tiny_scale,
                                                                             isolated_cache):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert vlmask(*tiny_run(tiny_synth, tiny_scale, straight, *KILLED)).returncode == 0
    again = kill_after_first_checkpoint_and_rerun(killed, tiny_run(tiny_synth, tiny_scale, killed, *KILLED))
    assert again.returncode == 0, again.stderr
    assert "resumed at step" in again.stdout + again.stderr
    finals = [json.loads((d / "summary.json").read_text())["final_loss"] for d in (straight, killed)]
    assert finals[0] is not None and finals[0] == finals[1]
