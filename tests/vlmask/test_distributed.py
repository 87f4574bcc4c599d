"""Real torch.distributed: two CPU processes (gloo) started by torchrun train FILS end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_train_fils(tmp_path, isolated_cache):
    from vlmask_plugins.data.synthetic import generate

    train, _ = generate(tmp_path / "data", clips=24, seed=4, frames=8, size=32, progress=False)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "vlmask", "run", str(RECIPES / "fils.yaml"),
            f"data.train={train}", f"run.dir={run_dir}", "train.max_steps=3", "train.batch_size=4", "train.log_every=1",
            "data.num_workers=0", "data.dataset.num_frames=8", "data.dataset.size=32", "model.encoder.embed_dim=32",
            "model.encoder.depth=1", "model.encoder.num_heads=2", "model.predictor.dim=32", "model.predictor.depth=1",
            "model.predictor.num_heads=2", "device=cpu",
        ],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 2, "only rank 0 prints (start and end)"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3], "rank 0 alone writes metrics"
    record = (run_dir / "config.yaml").read_text()
    assert "world_size: 2" in record and "batch_size: 8" in record, "effective batch is recorded"
