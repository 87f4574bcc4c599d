"""Where a run came from: the git commit of its recipe and the versions it ran with.

Both are recorded in ``config.yaml`` under ``record`` (see docs/contract.md, "A run directory").
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import vlmask


def versions(distributions: dict[str, str]) -> dict[str, Any]:
    """vlmask's, torch's and Python's versions and every loaded plugin's distribution
    (``plugin name -> "dist version"``, as in ``Plugins.distributions``)."""
    return {
        "vlmask": vlmask.__version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "plugins": dict(sorted(distributions.items())),
    }


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git repository containing ``path`` (a file or folder; default: the
    current directory), with ``+dirty`` appended when tracked files have uncommitted changes
    (staged or not; untracked files do not count, as in ``git describe --dirty``). None outside a
    repository, without a ``git`` executable, or in a repository with no commit yet. Read-only:
    runs ``git rev-parse`` and ``git status`` without taking optional locks.
    """
    folder = Path(path) if path is not None else Path.cwd()
    if not folder.is_dir():
        folder = folder.parent
    if not folder.is_dir():
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "--no-optional-locks", "-C", str(folder), *args],
                                  check=False, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--verify", "--quiet", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if status else "")
