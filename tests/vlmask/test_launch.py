"""vlmask.launch: SLURM's variables mapped to torch's on plain dicts, the node-list parser,
and the per-node ordering (``in_turn``) with real gloo processes."""

from __future__ import annotations

import multiprocessing
import os
import stat
import traceback
from pathlib import Path

import pytest

from vlmask.launch import (LaunchError, adopt_slurm, first_host, in_turn, job_port, master_host, outside_srun,
                           slurm_environment)

#: What ``srun --nodes 2 --ntasks-per-node 2`` gives task 3 (srun(1), OUTPUT ENVIRONMENT VARIABLES).
TASK3 = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242137",
         "SLURM_NODEID": "1", "PATH": "/nonexistent"}


@pytest.mark.parametrize("nodelist, first", [
    ("node[01-03,07],gpu5", "node01"),
    ("gpu5,node[01-03]", "gpu5"),
    ("node[008-010]", "node008"),
    ("a-[2-4]-b[1,3]", "a-2-b1"),
    ("rack1-node[7]", "rack1-node7"),
    ("localhost", "localhost"),
    ("127.0.0.1", "127.0.0.1"),
    ("  node1  ", "node1"),
])
def test_first_host_reads_the_compressed_forms(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01-03", "node]1", "node[a-b]", "[]", "two words"])
def test_an_unreadable_node_list_says_to_export_master_addr(nodelist):
    with pytest.raises(LaunchError, match="export MASTER_ADDR$"):
        first_host(nodelist)


def test_scontrol_expands_the_node_list_when_it_exists(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"  # a real executable answering as SLURM's does
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] && printf 'expanded-a\\nexpanded-b\\n'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert master_host("weird{form}") == "expanded-a"
    scontrol.write_text("#!/bin/sh\nexit 1\n")  # scontrol that fails: the parser answers
    assert master_host("node[3-4]") == "node3"


def test_job_port_is_in_its_documented_range():
    assert job_port("4242137") == 15000 + 2137
    assert job_port("123_4") == 15123, "an array task counts by its job"
    assert all(15000 <= job_port(str(j)) <= 24999 for j in (0, 9999, 10000, 99999999))
    with pytest.raises(LaunchError, match="export MASTER_PORT"):
        job_port("none")


def test_an_srun_task_is_mapped_to_torchs_variables():
    assert slurm_environment(TASK3) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                        "MASTER_PORT": "17137"}


def test_torchrun_and_set_variables_win():
    assert slurm_environment({**TASK3, "RANK": "0", "WORLD_SIZE": "8"}) == {}, "torchrun's RANK: SLURM unread"
    mapped = slurm_environment({**TASK3, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "0"})
    assert mapped == {"RANK": "3", "WORLD_SIZE": "4"}


def test_the_step_nodelist_comes_before_the_jobs():
    assert slurm_environment({**TASK3, "SLURM_STEP_NODELIST": "gpu08"})["MASTER_ADDR"] == "gpu08"


def test_not_an_srun_task_is_one_process():
    assert slurm_environment({}) == {}
    batch_shell = {k: v for k, v in TASK3.items() if k != "SLURM_STEP_NUM_TASKS"} | {"SLURM_PROCID": "0"}
    assert slurm_environment(batch_shell) == {}, "the batch script's own shell is not rank 0 of 4"
    assert outside_srun(batch_shell).startswith("SLURM_NTASKS=4 but this process is not an srun task")
    assert outside_srun(TASK3) is None and outside_srun({}) is None and outside_srun({"SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is not below SLURM_STEP_NUM_TASKS=4"),
    ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID='x' is not an integer"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set: export MASTER_PORT"),
    ({"SLURM_JOB_NODELIST": None, "SLURM_STEP_NODELIST": None}, "SLURM_JOB_NODELIST is not set: export MASTER_ADDR"),
    ({"SLURM_STEP_NODELIST": "gpu[07-"}, "export MASTER_ADDR"),
])
def test_unusable_slurm_variables_are_one_line_errors(change, message):
    environ = {k: v for k, v in {**TASK3, **change}.items() if v is not None}
    with pytest.raises(LaunchError, match="^[^\n]*$") as error:
        slurm_environment(environ)
    assert message in str(error.value)


def test_one_task_needs_no_master():
    one = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}
    assert slurm_environment(one) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def test_adopt_slurm_sets_the_variables_once():
    environ = dict(TASK3)
    assert adopt_slurm(environ)["RANK"] == "3"
    assert environ["WORLD_SIZE"] == "4" and environ["MASTER_PORT"] == "17137"
    assert adopt_slurm(environ) == {}, "RANK is set now"


# ---------------------------------------------------------------------------------------- in_turn
def _in_turn_worker(rank: int, local_rank: int, world_size: int, store: str, log: str, failing: int | None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        def work(progress: bool) -> int:
            with open(log, "a") as f:
                f.write(f"{rank} {progress}\n")
            if rank == failing:
                raise RuntimeError(f"rank {rank} failed")
            return rank * 10

        try:
            Path(f"{log}.{rank}").write_text(str(in_turn(rank, local_rank, world_size, work)))
        except RuntimeError as error:
            Path(f"{log}.{rank}").write_text(f"raised: {error}")
    except BaseException:
        Path(f"{log}.{rank}").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("failing", [None, 0])
def test_in_turn_goes_rank_0_then_each_nodes_first_then_the_rest(tmp_path, failing):
    """Three processes as two nodes: rank 0 and 1 on node A (local 0, 1), rank 2 on node B (local 0)."""
    places = [(0, 0), (1, 1), (2, 0)]
    log = tmp_path / "log"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_in_turn_worker, args=(r, lr, 3, str(tmp_path / "store"), str(log), failing))
               for r, lr in places]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text().splitlines() == ["0 True", "2 False", "1 False"], "waves: rank 0, node B's first, the rest"
    results = [Path(f"{log}.{r}").read_text() for r, _ in places]
    if failing is None:
        assert results == ["0", "10", "20"]
    else:
        assert results == ["raised: rank 0 failed", "10", "20"], "a failed wave still meets the barriers"


def test_in_turn_in_one_process_just_works():
    assert in_turn(0, 0, 1, lambda progress: progress) is True


def test_the_sbatch_template_parses_and_runs_vlmask_under_srun():
    import shutil
    import subprocess

    root = Path(__file__).parents[2]
    template = root / "docs" / "slurm" / "vlmask.sbatch"
    text = template.read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(template)], check=True)
    options = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=B:USR1@120", "--requeue"} <= set(options)
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "python -m vlmask run recipes/paper/fils.yaml" in srun and "--kill-on-bad-exit=1" in srun
    assert (root / "recipes" / "paper" / "fils.yaml").is_file()
    # preemption (README, "Preemption"): USR1 passed on to the tasks, requeue on vlmask's exit code 75
    assert "trap 'requeue=1; kill -USR1" in text and '[ "$code" = 75 ]' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "torchrun --nnodes" in text and "--rdzv-backend c10d" in text, "the torchrun-per-node variant"
