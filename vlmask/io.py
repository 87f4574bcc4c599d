"""The small file helpers every command above the engine shares, at the bottom layer so that
``evaluate``, ``finetune``, ``compare`` and ``report`` all import them downward.

* :func:`write_json`: a run's JSON files (eval.json, finetune.json, comparison.json) are written
  atomically, so that a killed command never leaves half a file that a later reuse would read.
* :func:`relative_path`: paths recorded in a run's JSON files are relative to the run, so that a
  moved run directory still names its own checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["relative_path", "write_json"]


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (as recorded in a run's JSON files).

    >>> relative_path(Path("/runs/a/checkpoints/step-2"), Path("/runs/a"))
    'checkpoints/step-2'
    """
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return os.path.relpath(path, root)


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(temporary, path)
