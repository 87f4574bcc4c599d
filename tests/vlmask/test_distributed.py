"""Real torch.distributed: two CPU processes (gloo) started by torchrun train FILS end to end,
replicated (DDP) and sharded (FSDP), and the two modes agree step by step. The FSDP run writes
sharded checkpoints (``vlmask.sharded``): each rank its own shards, resumed exactly under two
processes, under one (2 -> 1), and a full checkpoint resumed by two FSDP processes (1 -> 2)."""

from __future__ import annotations

import json
import os
import shutil
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

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def torchrun_fils(train: Path, run_dir: Path, parallel: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun`` (or, with ``processes=1``, plain ``python -m vlmask``) training FILS at TINY scale."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(cwd / "cache")}
    launcher = ["torchrun", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    result = subprocess.run(
        [*launcher, "-m", "vlmask", "run", str(RECIPES / "fils.yaml"),
         f"data.train={train}", f"run.dir={run_dir}", f"train.parallel={parallel}", *TINY],
        capture_output=True, text=True, env=env, timeout=600, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


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
