"""Checkpoints under faults: a kill in the middle of a write, a full disk, a deleted checkpoint.

The fault-injection test trains a tiny real run through the real command line three times: killed
(SIGKILL) while writing a checkpoint, then resumed onto a full disk (a real small tmpfs where the
machine lets us mount one, else ENOSPC raised from the lowest write call), then resumed with space
again. No step is lost, no temporary folder is left, and each failure reads as one clear line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmask import checkpoint as ckpt
from vlmask.checkpoint import CheckpointError, latest_checkpoint, orphan_temporaries, save_checkpoint

RECIPES = Path(__file__).parents[2] / "recipes"

#: Runs the real CLI with one fault injected at the checkpoint of step ``AT``: ``kill`` writes the
#: first weights file of that checkpoint, then SIGKILLs the process (mid-checkpoint); ``enospc``
#: makes that first write fail as a full disk does (the simulation where no tmpfs can be mounted).
INJECT = r"""
import errno, os, signal, sys
import vlmask.checkpoint as ck
mode, at = sys.argv[1], int(sys.argv[2])
real = ck.save_file
def save_file(tensors, path, metadata=None):
    if int((metadata or {}).get("step", -1)) == at:
        if mode == "kill":
            real(tensors, path, metadata=metadata)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real(tensors, path, metadata=metadata)
ck.save_file = save_file
from vlmask.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_cli(args: list[str], fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", INJECT, *map(str, fault), *args] if fault else [sys.executable, "-m", "vlmask", *args]
    return subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=600)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 8 MiB tmpfs when ``mount`` works here (root), else None (ENOSPC is simulated)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield mount_point if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        free = shutil.disk_usage(disk).free
        handle.write(b"\0" * max(0, free - leave))
    return filler


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-") or p.name == ".latest.tmp")


def test_kill_mid_checkpoint_then_full_disk_then_resume(tmp_path, tiny_synth, tiny_scale, isolated_cache, small_disk):
    run_dir = (small_disk or tmp_path) / "run"
    checkpoints = run_dir / "checkpoints"
    args = ["run", str(RECIPES / "mae.yaml"), f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", "train.max_steps=4",
            "train.log_every=1", "train.ckpt_every=1", "train.keep_checkpoints=2", *tiny_scale]

    # 1. SIGKILL while step 3's checkpoint is half written: the temporary folder is orphaned
    killed = run_cli(args, fault=("kill", 3))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (orphan,) = [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-step_00000003")]
    assert (orphan / "student.safetensors").is_file() and not (orphan / "state.pt").exists()
    assert latest_checkpoint(checkpoints).name == "step_00000002"
    assert steps_logged(run_dir) == [1, 2, 3]

    # 2. resume onto a full disk: step 3's checkpoint cannot be written
    if small_disk is not None:
        filler = fill_disk(small_disk, leave=48 * 1024)  # room for config and metrics, not for a checkpoint
        full = run_cli(args)
    else:
        filler = None
        full = run_cli(args, fault=("enospc", 3))
    assert full.returncode == 1, full.stderr
    message = [line for line in full.stderr.splitlines() if "no space left on device" in line]
    assert message == [f"CheckpointError: no space left on device while writing checkpoint step 3 in {checkpoints}; "
                       f"the previous checkpoint {checkpoints / 'step_00000002'} is kept; free space, then run the "
                       f"same command again to resume"], full.stderr
    assert "Traceback" not in full.stderr and "unexpected pos" not in full.stderr
    assert temporaries(checkpoints) == [], "the killed writer's folder and the failed one are both removed"
    assert latest_checkpoint(checkpoints).name == "step_00000002"

    # 3. space again: the run resumes from step 2 and finishes; every step logged once
    if filler is not None:
        filler.unlink()
    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    assert "resumed at step 2" in done.stderr
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000003", "step_00000004"]


# --------------------------------------------------------------------------- unit level

def tiny_save(folder: Path, step: int) -> Path:
    return save_checkpoint(folder, step, {"student": {"w": torch.full((4,), float(step))}}, {"x": torch.zeros(2)})


def test_only_orphans_of_dead_writers_on_this_host_are_removed(tmp_path):
    folder = tmp_path / "checkpoints"
    tiny_save(folder, 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = ckpt._tmp_name(1).rsplit("-", 2)[1]
        names = {
            f".tmp-step_00000002-{host}-{dead.pid}": True,      # killed writer here: orphan
            f".tmp-step_00000002-{dead.pid}": True,             # the older naming (pid only), dead
            f".tmp-step_00000002-{host}-{live.pid}": False,     # a live writer: never touched
            f".tmp-step_00000002-otherhost-{dead.pid}": False,  # another host's writer: cannot tell
        }
        for name in names:
            (folder / name).mkdir()
        assert sorted(p.name for p in orphan_temporaries(folder)) == sorted(n for n, orphan in names.items() if orphan)
        tiny_save(folder, 2)  # a save removes the orphans
        assert temporaries(folder) == sorted(n for n, orphan in names.items() if not orphan)
    finally:
        live.kill()
        live.wait()


def test_a_failed_write_keeps_the_previous_checkpoint_and_names_the_cause(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    tiny_save(folder, 1)

    def torch_writer_on_a_full_disk(*args, **kwargs):  # torch's zip writer says no more than this
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(ckpt.torch, "save", torch_writer_on_a_full_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(CheckpointError, match=r"^no space left on device while writing checkpoint step 2 in .*"
                                              r"the previous checkpoint .*step_00000001 is kept"):
        tiny_save(folder, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000001"]

    def other_failure(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.undo()  # free space again: another I/O error is named as what it is
    monkeypatch.setattr(ckpt, "save_file", other_failure)
    with pytest.raises(CheckpointError, match=r"^OSError: \[Errno 5\] Input/output error while writing checkpoint step 2"):
        tiny_save(folder, 2)


def test_latest_naming_a_deleted_checkpoint_says_which_is_used(tmp_path, capfd):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        tiny_save(folder, step)
    shutil.rmtree(folder / "step_00000003")
    assert latest_checkpoint(folder).name == "step_00000002"
    err = capfd.readouterr().err
    assert err == (f"warning: {folder / 'latest'} names step_00000003, which does not exist; "
                   f"using step_00000002 instead, the newest complete checkpoint\n")
    assert latest_checkpoint(folder).name == "step_00000002" and capfd.readouterr().err == "", "said once"


def test_the_same_step_saved_again_replaces_it_whole(tmp_path):
    folder = tmp_path / "checkpoints"
    tiny_save(folder, 1)
    save_checkpoint(folder, 1, {"student": {"w": torch.full((4,), 7.0)}}, {"x": torch.zeros(2)})
    assert ckpt.load_tensors(folder / "step_00000001" / "student.safetensors")["w"].tolist() == [7.0] * 4
    assert temporaries(folder) == []


# --------------------------------------------------------------------------- the sharded layout (vlmask.sharded)

#: The real CLI SIGKILLed while checkpoint ``AT`` is half written in the sharded layout: every
#: shard is written, the index, state.pt and the rename are not.
KILL_SHARDED = r"""
import os, signal, sys
import vlmask.sharded as sh
at = int(sys.argv[1])
real = sh._write_index
def write_index(tmp, step, world_size):
    if step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tmp, step, world_size)
sh._write_index = write_index
from vlmask.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # two torchrun FSDP runs, ~15 s alone, 40 s under load; test_sharded.py kills a sharded write in the default suite
def test_a_sharded_run_killed_mid_checkpoint_resumes_and_a_truncated_shard_is_one_line(tmp_path, tiny_synth, tiny_scale,
                                                                                         isolated_cache):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    args = ["run", str(RECIPES / "mae.yaml"), f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", "train.max_steps=4",
            "train.log_every=1", "train.ckpt_every=1", "train.keep_checkpoints=2", "train.parallel=fsdp",
            "train.checkpoint_format=sharded", *tiny_scale]
    killed = subprocess.run([sys.executable, "-c", KILL_SHARDED, "3", *args], capture_output=True, text=True,
                            env=dict(os.environ), timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (name,) = temporaries(checkpoints)
    orphan = checkpoints / name
    assert list((orphan / "shards").glob("*.safetensors")) and not (orphan / "state.pt").exists()
    assert latest_checkpoint(checkpoints).name == "step_00000002"

    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    assert "resumed at step 2" in done.stderr and f"removed {orphan} (a checkpoint write that never finished)" in done.stderr
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (checkpoints / "step_00000004" / "sharded.json").is_file()

    (shard,) = (checkpoints / "step_00000004" / "shards").glob("*.safetensors")
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    broken = run_cli(["checkpoint", "consolidate", str(run_dir), "--out", str(tmp_path / "full")])
    assert broken.returncode == 1
    assert broken.stderr.splitlines()[0].startswith(f"CheckpointError: {shard}: ") and "truncated" in broken.stderr
    assert "Traceback" not in broken.stderr and not (tmp_path / "full").exists()
