"""Opening a finished (or unfinished) run directory: its recipe and its trained components."""

from __future__ import annotations

from pathlib import Path

from vlmask.checkpoint import CheckpointError, latest_checkpoint
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.plugins import Plugins


def load_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), plugins: Plugins | None = None) -> Trainer:
    """The run's ``Trainer`` rebuilt from ``config.yaml`` with its latest checkpoint loaded.

    Use ``trainer.student`` (encoder, predictor, projection), ``trainer.teacher``,
    ``trainer.text_encoder``, ``trainer.train_set`` and ``trainer.resumed_from`` (the
    checkpoint folder). Nothing is trained or written.
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    if latest_checkpoint(run_dir / "checkpoints") is None:
        raise CheckpointError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    recipe = load_recipe(config, [*overrides, f"run.dir={run_dir}"])
    trainer = Trainer(recipe, plugins)
    trainer.student.eval()
    return trainer
