"""Real torch.distributed: two CPU processes (gloo) started by torchrun train FILS end to end,
replicated (DDP) and sharded (FSDP), and the two modes agree step by step. The FSDP run writes
sharded checkpoints (``vlmask.sharded``): each rank its own shards, resumed exactly under two
processes, under one (2 -> 1), and a full checkpoint resumed by two FSDP processes (1 -> 2).
The same two processes started as two torchrun "nodes" (c10d rendezvous) and as two srun-style
tasks (SLURM's variables, no torchrun) train exactly as one node of two."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmask import sharded
from vlmask.checkpoint import load_state, load_tensors

RECIPES = Path(__file__).parents[2] / "recipes"
TINY = [
    "train.max_steps=4", "train.ckpt_every=2", "train.batch_size=4", "train.accumulate=2", "train.log_every=1", "data.num_workers=0",
    "data.dataset.num_frames=8", "data.dataset.size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1",
    "model.encoder.num_heads=2", "model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.num_heads=2",
    "device=cpu",
]
#: Where a process learns its place in a job: cleared so that only what a test sets counts.
PLACE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
         "TORCHELASTIC_RUN_ID")

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def fils_run(train: Path, run_dir: Path, parallel: str = "ddp") -> list[str]:
    """``vlmask run`` arguments: FILS, tiny, 4 steps of 2 micro-batches."""
    return ["-m", "vlmask", "run", str(RECIPES / "fils.yaml"), f"data.train={train}", f"run.dir={run_dir}",
            f"train.parallel={parallel}", *TINY]


def clean_env(cwd: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PLACE and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(cwd / "cache"), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_fils(train: Path, run_dir: Path, parallel: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun`` (or, with ``processes=1``, plain ``python -m vlmask``) training FILS at TINY scale."""
    launcher = ["torchrun", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    result = subprocess.run([*launcher, *fils_run(train, run_dir, parallel)],
                            capture_output=True, text=True, env=clean_env(cwd), timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def together(commands: list[list[str]], envs: list[dict[str, str]], cwd: Path,
             codes: tuple[int, ...] | None = None) -> list[tuple[str, str]]:
    """Start every command at once (the processes of one job) and wait for all: (stdout, stderr)
    each. Each must exit with its code in ``codes`` (default 0); one that exits otherwise ends the
    others at once, so a failed start fails the test rather than leave its peers waiting."""
    import tempfile
    import time

    codes = codes or (0,) * len(commands)
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(Path(logs) / f"{i}.out", "w+"), open(Path(logs) / f"{i}.err", "w+")) for i in range(len(commands))]
        started = [subprocess.Popen(c, stdout=o, stderr=e, text=True, env=env, cwd=cwd)
                   for c, env, (o, e) in zip(commands, envs, files, strict=True)]
        deadline = time.monotonic() + 600
        try:
            while any(p.poll() is None for p in started) and time.monotonic() < deadline:
                if any(p.returncode is not None and p.returncode != code for p, code in zip(started, codes)):
                    break
                time.sleep(0.2)
        finally:
            for p in started:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for o, e in files:
            o.seek(0), e.seek(0)
            outputs.append((o.read(), e.read()))
            o.close(), e.close()
    assert [p.returncode for p in started] == list(codes), [err[-3000:] for _, err in outputs]
    return outputs


def metrics(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """FILS trained 4 steps of 2 micro-batches by two processes, once with DDP, once with FSDP."""
    from vlmask_plugins.data.synthetic import generate

    root = tmp_path_factory.mktemp("distributed")
    train, _ = generate(root / "data", clips=24, seed=4, frames=8, size=32, progress=False)
    out: dict[str, object] = {"train": train, "root": root}
    for parallel in ("ddp", "fsdp"):
        out[f"{parallel}_stdout"] = torchrun_fils(train, root / parallel, parallel, root).stdout
    return out


def test_torchrun_two_processes_train_fils(runs):
    run_dir = runs["root"] / "ddp"
    assert runs["ddp_stdout"].count("run directory:") == 2, "only rank 0 prints (start and end)"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["parallel"] == "ddp"
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4], "rank 0 alone writes metrics"
    record = (run_dir / "config.yaml").read_text()
    assert "world_size: 2" in record and "batch_size: 16" in record, "effective batch is recorded"


def test_fsdp_trains_like_ddp_with_half_the_parameters_per_rank(runs):
    ddp, fsdp = metrics(runs["root"] / "ddp"), metrics(runs["root"] / "fsdp")
    for a, b in zip(ddp, fsdp, strict=True):
        for key in ("loss", "fp", "actclip", "grad_norm", "actclip/logit_scale"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    per_rank = {p: json.loads((runs["root"] / p / "summary.json").read_text())["params_per_rank"] for p in ("ddp", "fsdp")}
    assert per_rank["fsdp"] < 0.51 * per_rank["ddp"], per_rank
    assert "parallel: fsdp" in (runs["root"] / "fsdp" / "config.yaml").read_text()


def test_fsdp_checkpoints_are_sharded_per_rank_and_hold_the_same_state_as_ddp(runs, tmp_path):
    checkpoint = runs["root"] / "fsdp" / "checkpoints" / "step_00000004"
    assert sharded.is_sharded(checkpoint) and not (checkpoint / "student.safetensors").exists()
    index = sharded.read_index(checkpoint)
    per_rank: dict[str, int] = {}  # shards/shard-0000<rank + 1>-model-<file>-of-<files>.safetensors
    for name, size in index["files"].items():
        per_rank[name.split("-model-")[0]] = per_rank.get(name.split("-model-")[0], 0) + size
    assert index["world_size"] == 2 and len(per_rank) == 2, index
    assert max(per_rank.values()) < 0.6 * sum(per_rank.values()), "each rank wrote its own half, nobody the whole state"
    full = sharded.consolidate(checkpoint, tmp_path / "consolidated")  # the format one process writes
    step = "checkpoints/step_00000004"
    for name in ("student", "teacher"):
        ddp = load_tensors(runs["root"] / "ddp" / step / f"{name}.safetensors")
        fsdp = load_tensors(full / f"{name}.safetensors")
        assert ddp.keys() == fsdp.keys()
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    ddp_state = load_state(runs["root"] / "ddp" / step / "state.pt")
    fsdp_state = load_state(full / "state.pt")
    assert len(fsdp_state["rng_by_rank"]) == 2 and len(ddp_state["rng_by_rank"]) == 2, "every rank's RNG is kept"
    ddp_moments, fsdp_moments = ddp_state["optimizer"]["state"], fsdp_state["optimizer"]["state"]
    assert ddp_moments.keys() == fsdp_moments.keys() and "encoder.patch_embed.weight" in fsdp_moments, "keyed by name"
    for key in ddp_moments:
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp_moments[key][moment], ddp_moments[key][moment], rtol=1e-3, atol=1e-7)
    assert [g["params"] for g in fsdp_state["optimizer"]["param_groups"]] == \
        [g["params"] for g in ddp_state["optimizer"]["param_groups"]]


def resumable_copy(source: Path, target: Path, step: int = 2) -> Path:
    """``source`` as it was at checkpoint ``step``: later checkpoints and the summary removed."""
    shutil.copytree(source, target)
    for later in (target / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (target / "summary.json").unlink()
    (target / "checkpoints" / "latest").write_text(json.dumps({"step": step, "path": f"step_{step:08d}"}))
    return target


def assert_same_metrics(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    """Every logged value but the clock equal to 1e-6, step by step."""
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in y.items() if k != "clips_per_s"} == pytest.approx(
            {k: v for k, v in x.items() if k != "clips_per_s"}, rel=1e-6), x["step"]


def test_an_fsdp_run_resumes_exactly_and_loads_in_one_process(runs, isolated_cache):
    from vlmask.runs import open_run

    source = runs["root"] / "fsdp"
    resumed = resumable_copy(source, runs["root"] / "fsdp-resumed")
    result = torchrun_fils(runs["train"], resumed, "fsdp", runs["root"])
    assert "resumed at step 2" in result.stdout + result.stderr
    for a, b in zip(metrics(source), metrics(resumed), strict=True):
        assert {k: v for k, v in b.items() if k != "clips_per_s"} == pytest.approx(
            {k: v for k, v in a.items() if k != "clips_per_s"}, rel=1e-6), a["step"]
    assert sharded.is_sharded(resumed / "checkpoints" / "step_00000004")
    run = open_run(source)  # a sharded run's checkpoint in a single process, no process group, loaded strictly
    assert run.checkpoint.name == "step_00000004"
    consolidated = load_tensors(sharded.consolidate(run.checkpoint, runs["root"] / "consolidated-4") / "student.safetensors")
    for key, tensor in run.student.state_dict().items():
        assert torch.equal(tensor, consolidated[key]), key


def test_a_full_checkpoint_resumes_under_two_fsdp_processes_exactly_then_writes_sharded(runs):
    """1 -> 2: step 2 in the full format one process writes (the FSDP run's, consolidated), resumed
    by two FSDP processes: steps 3 and 4 are the uninterrupted run's, and its checkpoints sharded."""
    source = runs["root"] / "fsdp"
    resumed = resumable_copy(source, runs["root"] / "full-to-fsdp")
    step_2 = resumed / "checkpoints" / "step_00000002"
    sharded.consolidate(step_2, runs["root"] / "full-2")
    shutil.rmtree(step_2)
    shutil.copytree(runs["root"] / "full-2" / "step_00000002", step_2)
    assert (step_2 / "student.safetensors").is_file() and not sharded.is_sharded(step_2)
    result = torchrun_fils(runs["train"], resumed, "fsdp", runs["root"])
    assert "resumed at step 2" in result.stdout + result.stderr
    assert_same_metrics(metrics(source), metrics(resumed))
    assert sharded.is_sharded(resumed / "checkpoints" / "step_00000004")


@pytest.mark.slow  # two more runs; 2->2 and 1->2 stay in the default suite
def test_a_sharded_checkpoint_resumes_in_one_process_as_its_full_copy_does(runs):
    """2 -> 1: step 2 of the two FSDP processes resumed by one process reads the same state as
    the same checkpoint consolidated to the full format: steps 3 and 4 equal (a run of another
    world size draws other batches, so the reference is the full-format resume, not the 2-process run)."""
    source = runs["root"] / "fsdp"
    from_shards = resumable_copy(source, runs["root"] / "fsdp-to-one")
    from_full = resumable_copy(source, runs["root"] / "full-to-one")
    step_2 = from_full / "checkpoints" / "step_00000002"
    sharded.consolidate(step_2, runs["root"] / "full-2-one")
    shutil.rmtree(step_2)
    shutil.copytree(runs["root"] / "full-2-one" / "step_00000002", step_2)
    one = [torchrun_fils(runs["train"], run_dir, "fsdp", runs["root"], processes=1) for run_dir in (from_shards, from_full)]
    assert all("resumed at step 2" in r.stderr for r in one)
    a, b = metrics(from_shards), metrics(from_full)
    assert [m["step"] for m in a] == [1, 2, 3, 4]
    assert_same_metrics(a, b)
    assert json.loads((from_shards / "summary.json").read_text())["world_size"] == 1
    assert (from_shards / "checkpoints" / "step_00000004" / "student.safetensors").is_file(), "one process writes full"


RESUMED_RNG = r"""
import sys, torch
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.step import leave_processes
recipe = load_recipe(sys.argv[1], sys.argv[3:])
with Trainer(recipe) as trainer:  # resumes at its latest checkpoint, nothing trained
    torch.save(torch.get_rng_state(), f"{sys.argv[2]}/rng-{trainer.rank}.pt")
leave_processes()
"""


def test_each_rank_resumes_its_own_random_state(runs, tmp_path):
    """Every rank's RNG state is kept (``rng_by_rank``) and given back to that rank at a resume
    (the metrics alone would not tell: FILS draws its masks from generators of its own)."""
    source = runs["root"] / "fsdp"
    resumed = resumable_copy(source, runs["root"] / "fsdp-rng")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(runs["root"] / "cache")}
    result = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable, "-c",
         RESUMED_RNG, str(RECIPES / "fils.yaml"), str(tmp_path), f"data.train={runs['train']}", f"run.dir={resumed}",
         "train.parallel=fsdp", *TINY],
        capture_output=True, text=True, env=env, timeout=600, cwd=runs["root"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_state(resumed / "checkpoints" / "step_00000002" / "state.pt")["rng_by_rank"]
    assert not torch.equal(saved[0]["torch"], saved[1]["torch"]), "ranks draw differently (seed + rank)"
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rng-{rank}.pt"), saved[rank]["torch"]), rank


def losses(run_dir: Path) -> list[dict[str, float]]:
    """metrics.jsonl without what depends on the clock."""
    return [{k: v for k, v in m.items() if k != "clips_per_s"} for m in metrics(run_dir)]


def test_two_nodes_of_one_process_train_like_one_node_of_two(runs):
    """``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d``, twice on this machine (two
    "nodes", each its own agent with LOCAL_RANK 0), and each node a cache of its own
    (VLMASK_CACHE: nodes that share no disk): the same metrics as ``torchrun --standalone
    --nproc_per_node 2``."""
    root, run_dir = runs["root"], runs["root"] / "two-nodes"
    node = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes", *fils_run(runs["train"], run_dir)]
    outputs = together([node, node], [clean_env(root, VLMASK_CACHE=str(root / f"node{i}-cache")) for i in (0, 1)], root)
    assert sum(out.count("run directory:") for out, _ in outputs) == 2, "only rank 0 prints (start and end)"
    assert losses(run_dir) == losses(root / "ddp"), "step for step, the one-node run's numbers"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp"
    for i in (0, 1):  # each node's first process filled its own cache (vlmask.launch.in_turn)
        assert list((root / f"node{i}-cache" / "text").rglob("shard-*.safetensors")), f"node {i}'s caption cache"


def test_srun_tasks_without_torchrun_train_like_torchrun(runs):
    """Two ``python -m vlmask run`` processes with the variables srun gives its tasks (and no
    RANK/WORLD_SIZE): vlmask maps them (vlmask.launch) and they train as torchrun's two."""
    root, run_dir = runs["root"], runs["root"] / "srun"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
             "SLURM_NODEID": "0", "MASTER_PORT": str(free_port())}
    command = [sys.executable, *fils_run(runs["train"], run_dir)]
    outputs = together([command, command], [clean_env(root, **slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))
                                            for r in (0, 1)], root)
    assert sum(out.count("run directory:") for out, _ in outputs) == 2, "only rank 0 prints (start and end)"
    assert losses(run_dir) == losses(root / "ddp"), "step for step, torchrun's numbers"
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_nodes_that_do_not_share_the_run_directory_stop_with_one_line(runs):
    """Each "node" its own run.dir (a disk of its own): every process exits 2 naming the rule,
    and no process dies at exit (leaving the process group on the way out). ~10 s."""
    root = runs["root"]
    slurm = {"SLURM_JOB_ID": "4243", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(free_port())}
    commands = [[sys.executable, *fils_run(runs["train"], root / f"unshared-{r}")] for r in (0, 1)]
    outputs = together(commands, [clean_env(root, **slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in (0, 1)],
                       root, codes=(2, 2))
    for _, err in outputs:
        assert "RunDirNotShared:" in err and "run.dir must be on a disk every node shares" in err, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
