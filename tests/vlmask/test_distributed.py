"""Real torch.distributed: two CPU processes (gloo) started by torchrun train FILS end to end,
replicated (DDP) and sharded (FSDP), and the two modes agree step by step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vlmask.checkpoint import load_state, load_tensors

RECIPES = Path(__file__).parents[2] / "recipes"
TINY = [
    "train.max_steps=4", "train.ckpt_every=2", "train.batch_size=4", "train.accumulate=2", "train.log_every=1", "data.num_workers=0",
    "data.dataset.num_frames=8", "data.dataset.size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1",
    "model.encoder.num_heads=2", "model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.num_heads=2",
    "device=cpu",
]

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def torchrun_fils(train: Path, run_dir: Path, parallel: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(cwd / "cache")}
    result = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "vlmask", "run", str(RECIPES / "fils.yaml"),
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


def test_fsdp_checkpoints_hold_full_tensors_and_the_same_state_as_ddp(runs):
    step = "checkpoints/step_00000004"
    for name in ("student", "teacher"):
        ddp = load_tensors(runs["root"] / "ddp" / step / f"{name}.safetensors")
        fsdp = load_tensors(runs["root"] / "fsdp" / step / f"{name}.safetensors")
        assert ddp.keys() == fsdp.keys()
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    ddp_state = load_state(runs["root"] / "ddp" / step / "state.pt")["optimizer"]["state"]
    fsdp_state = load_state(runs["root"] / "fsdp" / step / "state.pt")["optimizer"]["state"]
    assert ddp_state.keys() == fsdp_state.keys() and "encoder.patch_embed.weight" in fsdp_state, "keyed by name"
    for key in ddp_state:
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp_state[key][moment], ddp_state[key][moment], rtol=1e-3, atol=1e-7)


def test_an_fsdp_run_resumes_exactly_and_loads_in_one_process(runs, isolated_cache):
    from vlmask.runs import open_run

    source, resumed = runs["root"] / "fsdp", runs["root"] / "fsdp-resumed"
    shutil.copytree(source, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "summary.json").unlink()
    (resumed / "checkpoints" / "latest").write_text(json.dumps({"step": 2, "path": "step_00000002"}))
    result = torchrun_fils(runs["train"], resumed, "fsdp", runs["root"])
    assert "resumed at step 2" in result.stdout + result.stderr
    for a, b in zip(metrics(source), metrics(resumed), strict=True):
        assert {k: v for k, v in b.items() if k != "clips_per_s"} == pytest.approx(
            {k: v for k, v in a.items() if k != "clips_per_s"}, rel=1e-6), a["step"]
    run = open_run(source)  # a sharded run's checkpoint in a single process, loaded strictly
    assert run.checkpoint.name == "step_00000004"
