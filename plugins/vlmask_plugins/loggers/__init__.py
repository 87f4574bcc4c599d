"""Loggers (kind ``logger``): receive a run's metrics through the lifecycle hooks.

A recipe adds them under ``loggers: {<any name>: {name: csv}, ...}``; the engine builds each and
registers it with the run's plugin manager. The engine itself always writes ``metrics.jsonl``.

- ``csv``: :class:`CsvLogger`, ``RUN_DIR/metrics.csv`` with a header that grows with new keys.
- ``tensorboard``: :class:`TensorBoardLogger`, events in ``RUN_DIR/tensorboard`` (needs the
  ``tensorboard`` package).
"""

from vlmask.registry import Register
from vlmask_plugins.loggers.csv_file import CsvLogger
from vlmask_plugins.loggers.tensorboard_events import MissingDependencyError, TensorBoardLogger

__all__ = ["CsvLogger", "MissingDependencyError", "TensorBoardLogger", "register_plugins"]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("logger", "csv", CsvLogger)
    register("logger", "tensorboard", TensorBoardLogger)
