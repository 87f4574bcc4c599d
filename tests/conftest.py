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

#: Torch threads of the test process AND of every process it starts: tests that compare a run in
#: this process with one in a subprocess (killed-and-resumed equals uninterrupted) need the same
#: reduction order on both sides, so an OMP_NUM_THREADS=1 in the caller's environment must not
#: give the children one thread while this process has two.
TEST_THREADS = max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(TEST_THREADS)
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)


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


@pytest.fixture(scope="session")
def misspelt_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``plugin_site``, holding one distribution whose hook implementation is misspelt."""
    site = tmp_path_factory.mktemp("misspelt-plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(PLUGIN_PACKAGES / "vlmask-misspelt-hook")],
        check=True,
        capture_output=True,
    )
    return site


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLMASK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


#: Overrides that shrink a demo recipe (tests/recipes adapts them per recipe) to seconds on a CPU.
TINY_SCALE = (
    "train.batch_size=4", "data.num_workers=0", "data.dataset.num_frames=4", "data.dataset.size=32",
    "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.num_heads=2",
    "optim.warmup_steps=2", "device=cpu",
)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny built-in-style synthetic set (24 real H.264 clips of 8x32x32): (train, val) manifests."""
    from vlmask_plugins.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("tiny-synth"), clips=24, seed=1, frames=8, size=32, progress=False)


@pytest.fixture(scope="session")
def tiny_scale() -> list[str]:
    return list(TINY_SCALE)


class StopAfterCheckpoint:
    """Interrupts a run right after a given checkpoint, as a user's Ctrl-C would (a lifecycle hook)."""

    def __init__(self, step: int) -> None:
        self.step = step

    from vlmask import hookimpl

    @hookimpl
    def vlmask_checkpoint_saved(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="session")
def stop_after_checkpoint() -> type[StopAfterCheckpoint]:
    return StopAfterCheckpoint


#: ``python -c KILL_AT_CHECKPOINT RECIPE OVERRIDE ...`` trains and SIGKILLs itself right after the
#: checkpoint of step ``$KILL_AT`` (no cleanup of any kind runs, as after a power cut).
KILL_AT_CHECKPOINT = """
import os, signal, sys
from vlmask import hookimpl
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.plugins import load_plugins

class Kill:
    @hookimpl
    def vlmask_checkpoint_saved(self, step):
        if step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

with Trainer(load_recipe(sys.argv[1], sys.argv[2:]), load_plugins([("kill", Kill())])) as trainer:
    trainer.train()
"""


@pytest.fixture(scope="session")
def kill_at_checkpoint() -> str:
    return KILL_AT_CHECKPOINT
