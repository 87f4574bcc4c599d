"""Where vlmask keeps generated data and caches."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VLMASK_CACHE"


def cache_dir() -> Path:
    """``$VLMASK_CACHE`` or ``~/.cache/vlmask``: the built-in data set, caption embeddings."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlmask").expanduser()
