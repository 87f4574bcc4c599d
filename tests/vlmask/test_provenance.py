"""Provenance: the git commit a run's recipe came from (recorded in config.yaml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vlmask.provenance import git_commit, versions


def test_versions_name_vlmask_torch_python_and_each_plugin():
    record = versions({"b": "dist-b 2.0", "a": "dist-a 1.0"})
    assert set(record) == {"vlmask", "torch", "python", "plugins"}
    assert list(record["plugins"]) == ["a", "b"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs a git executable")
def test_git_commit_marks_uncommitted_changes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                               "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    recipe = repo / "recipe.yaml"
    recipe.write_text("seed: 0\n")
    assert git_commit(recipe) is None  # no commit yet
    git("add", "recipe.yaml")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")

    assert git_commit(recipe) == head
    (repo / "untracked.txt").write_text("x")
    assert git_commit(repo) == head  # untracked files do not count
    recipe.write_text("seed: 1\n")
    assert git_commit(recipe) == head + "+dirty"
    outside = tmp_path / "outside"
    outside.mkdir()
    probe = subprocess.run(["git", "-C", str(outside), "rev-parse"], check=False, capture_output=True)
    if probe.returncode != 0:  # tmp_path itself is outside any repository
        assert git_commit(outside) is None
