"""Shared fixtures: a tiny isolated cache, and the real third-party plugin packages installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
PLUGIN_PACKAGES = TESTS / "plugin_packages"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the example third-party distributions are really pip-installed
    (``pip install --target``), entry points included; put it on sys.path to load them."""
    site = tmp_path_factory.mktemp("plugin-site")
    for package in ("vlmask-grid-masker", "vlmask-broken-plugin"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "--target", str(site), str(PLUGIN_PACKAGES / package)],
            check=True,
            capture_output=True,
        )
    return site


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLMASK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
