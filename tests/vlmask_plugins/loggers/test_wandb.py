"""Logger ``wandb`` in offline mode: a real tiny run, its metrics read back from the offline run files."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from vlmask.config import RecipeError, load_recipe
from vlmask.engine import Trainer
from vlmask.plugins import default_plugins
from vlmask.schema import build
from vlmask_plugins.loggers import MissingDependencyError, WandbLogger

RECIPES = Path(__file__).parents[3] / "recipes"


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log records (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last piece) in 32 KiB blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pieces
            pieces = b""


def test_wandb_without_the_package_fails_at_construction_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(MissingDependencyError, match=r"`wandb` package.*pip install vlmask\[wandb\]"):
        WandbLogger()
    recipe = load_recipe(RECIPES / "mae.yaml", ["loggers={w: {name: wandb}}"])
    with pytest.raises(RecipeError, match="key loggers.w .*wandb"):
        build(default_plugins().registry, recipe, "loggers.w", "logger")


def test_wandb_refuses_an_unknown_mode() -> None:
    pytest.importorskip("wandb")
    with pytest.raises(ValueError, match="mode must be one of online, offline, disabled"):
        WandbLogger(mode="cloud")


def test_wandb_offline_run_holds_the_logged_metrics(tiny_synth, tiny_scale, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account: files only
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    overrides = [*tiny_scale, f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", "train.max_steps=3",
                 "train.log_every=1", "train.ckpt_every=3", "loggers={w: {name: wandb, project: tiny}}"]
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        summary = trainer.train()

    runs = list((run_dir / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    logged: dict[int, dict[str, float]] = {}
    config_keys: set[str] = set()
    for data in wandb_records(runs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            logged[int(items["_step"])] = items
        elif record.WhichOneof("record_type") in ("config", "run"):  # the config comes with the run record too
            config = record.config if record.WhichOneof("record_type") == "config" else record.run.config
            config_keys |= {i.key for i in config.update}
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(logged) == [m["step"] for m in jsonl] == [1, 2, 3]
    for m in jsonl:
        assert logged[m["step"]]["loss"] == pytest.approx(m["loss"]) and logged[m["step"]]["lr"] == pytest.approx(m["lr"])
    assert {"train", "optim", "masker"} <= config_keys
    assert (run_dir / "wandb" / "run_id").read_text().strip() in runs[0].name and summary["steps"] == 3
