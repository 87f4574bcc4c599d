"""Logger ``csv``: the metrics of every logged step as one row of ``RUN_DIR/metrics.csv``."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import vlmask


def check_run_file(argument: str, value: str) -> None:
    """A file name relative to the run directory, staying inside it (ValueError naming ``argument``)."""
    path = Path(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{argument} must be a relative path inside the run directory, got {value!r}")


def _cell(value: Any) -> str:
    """A metric as CSV text: numbers at full precision, anything else as JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


class CsvLogger:
    """Writes the metrics of every logged step (``step``, ``loss``, one column per loss term,
    ``lr``, ``clips_per_s``, ...) as a row of a CSV file in the run directory, for spreadsheets and
    pandas; the engine's ``metrics.jsonl`` stays the reference record (docs/contract.md).

    The header **grows**: when a step reports a key no earlier row had, the column is appended
    and the file is rewritten (atomically) with the new header, earlier rows leaving that cell
    empty; otherwise each step appends one line. Columns are ``step`` first, then keys in order
    of first appearance. On resume (``run.start_step > 0``) rows after the checkpoint's step are
    dropped, like the engine does for ``metrics.jsonl``; a fresh start (step 0) starts a fresh file.
    Only rank 0 writes. Same role as PyTorch Lightning's ``CSVLogger`` (Falcon et al., 2019),
    used here for the metrics of VideoMAE-style pretraining (Tong et al., NeurIPS 2022).
    """

    def __init__(self, filename: str = "metrics.csv") -> None:
        check_run_file("filename", filename)
        if not filename.endswith(".csv"):
            raise ValueError(f"filename must end with .csv, got {filename!r}")
        self.filename = filename
        self.path: Path | None = None
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, str]] = []

    # ---------------------------------------------------------------- hooks
    @vlmask.hookimpl
    def vlmask_train_start(self, run: Any) -> None:
        if run.is_main:
            self._open(Path(run.dir), int(run.start_step))

    @vlmask.hookimpl
    def vlmask_step_end(self, step: int, metrics: dict[str, Any], run: Any) -> None:
        if not run.is_main:
            return
        if self.path is None:  # called without train_start (a caller driving hooks by hand)
            self._open(Path(run.dir), int(getattr(run, "start_step", 0)))
        row = {"step": str(int(step))}
        row.update({str(k): _cell(v) for k, v in metrics.items() if k != "step"})
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
        else:
            assert self.path is not None
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, self.columns, restval="").writerow(row)

    @vlmask.hookimpl
    def vlmask_train_end(self, summary: dict[str, Any], run: Any) -> None:
        if run.is_main and self.path is not None:
            self._rewrite()  # leaves a complete file even if an append was interrupted

    # ---------------------------------------------------------------- file
    def _open(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / self.filename
        self.columns, self.rows = ["step"], []
        if start_step > 0 and self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or ["step"])
                for row in reader:
                    try:
                        if float(row.get("step") or "nan") <= start_step:
                            self.rows.append({k: v for k, v in row.items() if k is not None and v is not None})
                    except ValueError:
                        continue  # a torn last line of an interrupted run
        self._rewrite()

    def _rewrite(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)
