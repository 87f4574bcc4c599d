"""Loggers through real tiny runs: metrics.csv (growing header, resume) and TensorBoard events."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from vlmask_plugins.loggers import CsvLogger, MissingDependencyError, TensorBoardLogger

from vlmask import hookimpl
from vlmask.config import RecipeError, load_recipe
from vlmask.engine import RunInfo, Trainer
from vlmask.plugins import default_plugins, load_plugins
from vlmask.schema import build

RECIPES = Path(__file__).parents[3] / "recipes"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def tiny_data(tiny_synth, tiny_scale) -> tuple[Path, list[str]]:
    return tiny_synth[0], tiny_scale


def tiny_overrides(data: tuple[Path, list[str]], run_dir: Path, steps: int, loggers: str) -> list[str]:
    train, scale = data
    return [*scale, f"data.train={train}", f"run.dir={run_dir}", f"train.max_steps={steps}",
            "train.log_every=1", "train.ckpt_every=2", "optim.warmup_steps=1", f"loggers={loggers}"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


class StopAfterLogging:
    """Interrupts a run right after a given step was logged, as a user's Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def vlmask_step_end(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def train(recipe_overrides: list[str], extra: list | None = None) -> dict:
    with Trainer(load_recipe(RECIPES / "mae.yaml", recipe_overrides), load_plugins(extra) if extra else None) as trainer:
        return trainer.train()


def run_info(run_dir: Path, rank: int = 0, start_step: int = 0) -> RunInfo:
    return RunInfo(
        dir=run_dir, recipe=None, device=torch.device("cpu"),  # type: ignore[arg-type]
        rank=rank, world_size=2, start_step=start_step, total_steps=10,
    )


# ---------------------------------------------------------------------------- csv
def test_csv_logger_writes_the_metrics_of_a_run_and_resumes_without_duplicates(
    tiny_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, run_dir, steps=4, loggers="{table: {name: csv}}")
    with pytest.raises(KeyboardInterrupt):
        train(overrides, [("stopper", StopAfterLogging(3))])  # checkpoint at 2, step 3 already logged
    assert [row["step"] for row in read_csv(run_dir / "metrics.csv")[1]] == ["1", "2", "3"]

    train(overrides)  # resumes from the step-2 checkpoint: row 3 is dropped and logged again

    header, rows = read_csv(run_dir / "metrics.csv")
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert header[0] == "step" and {"loss", "pixels", "lr", "clips_per_s"} <= set(header)
    assert [int(row["step"]) for row in rows] == [m["step"] for m in jsonl] == [1, 2, 3, 4]
    for row, record in zip(rows, jsonl):
        assert float(row["loss"]) == record["loss"] and float(row["lr"]) == record["lr"]


def test_csv_header_grows_when_a_new_metric_appears(tmp_path: Path) -> None:
    logger = CsvLogger()
    run = run_info(tmp_path)
    logger.vlmask_train_start(run=run)
    logger.vlmask_step_end(step=1, metrics={"step": 1, "loss": 1.5}, run=run)
    logger.vlmask_step_end(step=2, metrics={"step": 2, "loss": 1.25, "teacher/cosine": 0.5}, run=run)
    logger.vlmask_step_end(step=3, metrics={"step": 3, "loss": 1.0, "teacher/cosine": 0.75}, run=run)

    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == ["step", "loss", "teacher/cosine"]
    assert rows == [
        {"step": "1", "loss": "1.5", "teacher/cosine": ""},
        {"step": "2", "loss": "1.25", "teacher/cosine": "0.5"},
        {"step": "3", "loss": "1.0", "teacher/cosine": "0.75"},
    ]


def test_csv_logger_writes_nothing_on_other_ranks(tmp_path: Path) -> None:
    logger = CsvLogger("logs/table.csv")
    run = run_info(tmp_path, rank=1)
    logger.vlmask_train_start(run=run)
    logger.vlmask_step_end(step=1, metrics={"step": 1, "loss": 1.0}, run=run)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("filename", ["/tmp/x.csv", "../x.csv", "metrics.txt", ""])
def test_csv_filename_is_validated(filename: str) -> None:
    with pytest.raises(ValueError, match="filename"):
        CsvLogger(filename)


# ---------------------------------------------------------------------------- tensorboard
def test_tensorboard_without_the_package_fails_at_construction_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when it is not installed
    with pytest.raises(MissingDependencyError, match="`tensorboard` package.*pip install tensorboard"):
        TensorBoardLogger()
    recipe = load_recipe(RECIPES / "mae.yaml", ["loggers={tb: {name: tensorboard}}"])
    with pytest.raises(RecipeError, match="key loggers.tb .*tensorboard"):
        build(default_plugins().registry, recipe, "loggers.tb", "logger")


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package is not installed")
def test_tensorboard_logger_writes_the_scalars_of_a_run(tiny_data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    summary = train(tiny_overrides(tiny_data, run_dir, steps=2, loggers="{tb: {name: tensorboard}}"))

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "pixels", "lr", "clips_per_s", "summary/final_loss"} <= scalars
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == [(m["step"], m["loss"]) for m in jsonl]
    assert events.Scalars("summary/final_loss")[0].value == pytest.approx(summary["final_loss"])
    assert "config" in " ".join(events.Tags()["tensors"])


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package is not installed")
def test_tensorboard_logger_adds_pictures_at_checkpoints(tiny_data: Path, tmp_path: Path, capfd) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    loggers = "{tb: {name: tensorboard, pictures: [masks, attention, similarity]}}"
    train(tiny_overrides(tiny_data, run_dir, steps=4, loggers=loggers))  # checkpoints at steps 2 and 4
    plain = tmp_path / "plain"
    train(tiny_overrides(tiny_data, plain, steps=4, loggers="{tb: {name: tensorboard}}"))
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"show/masks", "show/attention"}
    assert [image.step for image in events.Images("show/masks")] == [2, 4]
    assert events.Images("show/masks")[0].width > 100
    assert "no picture 'similarity' (similarity: run: recipe" in capfd.readouterr().err  # mae has no text space
    same = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert same == [json.loads(line)["loss"] for line in (plain / "metrics.jsonl").read_text().splitlines()]
