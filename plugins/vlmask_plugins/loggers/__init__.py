"""Loggers (kind ``logger``): receive a run's metrics through the lifecycle hooks.

A recipe adds them under ``loggers: {<any name>: {name: csv}, ...}``; the engine builds each and
registers it with the run's plugin manager. The engine itself always writes ``metrics.jsonl``.

- ``csv``: :class:`CsvLogger`, ``RUN_DIR/metrics.csv`` with a header that grows with new keys.
- ``tensorboard``: :class:`TensorBoardLogger`, events in ``RUN_DIR/tensorboard`` (needs the
  ``tensorboard`` package).
- ``wandb``: :class:`WandbLogger`, a Weights & Biases run (``pip install vlmask[wandb]``; files in
  ``RUN_DIR/wandb``, ``mode: offline`` keeps them there).
"""

from vlmask.registry import Register
from vlmask_plugins.loggers.csv_file import CsvLogger
from vlmask_plugins.loggers.tensorboard_events import MissingDependencyError, TensorBoardLogger
from vlmask_plugins.loggers.wandb_run import WandbLogger

__all__ = ["CsvLogger", "MissingDependencyError", "TensorBoardLogger", "WandbLogger", "register_plugins"]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("logger", "csv", CsvLogger)
    register("logger", "tensorboard", TensorBoardLogger)
    register("logger", "wandb", WandbLogger)
