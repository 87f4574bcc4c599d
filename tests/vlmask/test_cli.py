"""The command line as users run it: real subprocesses, a real third-party plugin package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).parents[2] / "recipes"


def vlmask(*args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vlmask", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_plugins_lists_third_party_and_reports_the_broken_one(plugin_site):
    result = vlmask("plugins", env_extra={"PYTHONPATH": str(plugin_site), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "grid" in result.stdout and "vlmask-grid-masker 0.1.0" in result.stdout
    assert "plugin 'broken' from vlmask-broken-plugin was skipped" in result.stderr
    assert "vlmask_dependency_that_does_not_exist" in result.stderr


def test_validate_exit_codes_and_every_error(tmp_path, plugin_site):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(f"base: [{RECIPES / 'mae.yaml'}]\nmasker: {{name: grid, stride: 2}}\n")
    good = vlmask("validate", str(recipe), env_extra={"PYTHONPATH": str(plugin_site)})
    assert good.returncode == 0 and "valid" in good.stdout, good.stderr
    bad = vlmask("validate", str(recipe), "masker.stride=lots", "model.predictor.dept=1")  # plugin not installed
    assert bad.returncode != 0
    assert "grid.yaml:2: key masker.name: unknown masker 'grid'" in bad.stderr
    assert "command line: model.predictor.dept=1: key model.predictor.dept" in bad.stderr


def test_run_with_a_third_party_masker(tmp_path, plugin_site, isolated_cache):
    from vlmask_plugins.data.synthetic import generate

    train, _ = generate(tmp_path / "data", clips=12, seed=2, frames=8, size=32, progress=False)
    run_dir = tmp_path / ("a-run-directory-longer-than-a-terminal-line-" * 3)  # printed unwrapped
    result = vlmask(
        "run", str(RECIPES / "mae.yaml"), f"data.train={train}", f"run.dir={run_dir}", "masker={name: grid, stride: 2}",
        "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "data.num_workers=0", "data.dataset.num_frames=4",
        "data.dataset.size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
        "model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.num_heads=2", "device=cpu",
        env_extra={"PYTHONPATH": str(plugin_site)},
    )
    assert result.returncode == 0, result.stderr
    assert f"run directory: {run_dir}" in result.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert "masker:\n  name: grid" in (run_dir / "config.yaml").read_text()


def test_data_synth_then_boxes(tmp_path, isolated_cache):
    synth = vlmask("data", "synth", "--out", str(tmp_path / "d"), "--clips", "8", "--seed", "5")
    assert synth.returncode == 0, synth.stderr
    rows = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    truth = [row.pop("action_box") for row in rows]
    (tmp_path / "d" / "nobox.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    boxes = vlmask("data", "boxes", str(tmp_path / "d" / "nobox.jsonl"), "--out", str(tmp_path / "d" / "boxes.jsonl"))
    assert boxes.returncode == 0, boxes.stderr
    detected = [json.loads(line)["action_box"] for line in (tmp_path / "d" / "boxes.jsonl").read_text().splitlines()]
    assert len(detected) == len(truth) == len(rows)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    assert sum(iou(a, b) for a, b in zip(detected, truth)) / len(truth) > 0.7
