"""Hostile or careless input through the real command line: each case ends in a clear one-line
message naming the file (or line, or path), never a hang, a traceback or a silent loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmask.config import MAX_EXPANDED_NODES, RecipeError, load_recipe, parse_override

RECIPES = Path(__file__).parents[2] / "recipes"


def vlmask(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmask", *args], capture_output=True, text=True,
                          env=dict(os.environ), cwd=cwd, timeout=timeout)


def alias_bomb(levels: int, width: int) -> str:
    """``levels`` lists of ``width`` aliases to the list before: ``width ** levels`` leaves once
    expanded, from a few hundred bytes (the "billion laughs" of YAML)."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- YAML alias bombs

def test_the_issue_sized_alias_bomb_is_refused_in_milliseconds(tmp_path):
    """The issue's 534-byte bomb (9 levels of 9: 387M leaves) is refused while composing, before
    anything is built (today: ~100 s and ~5 GB, then a MemoryError traceback). In process, the
    fixed code answers in milliseconds; a timing is printed, never asserted."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9, 9))
    assert len(bomb.read_bytes()) < 600
    started = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        load_recipe(bomb)
    print(f"refused in {time.perf_counter() - started:.4f} s")
    (problem,) = caught.value.problems
    assert problem.startswith(f"{bomb}: refused: it expands to more than {MAX_EXPANDED_NODES:,} values")


def test_an_alias_bomb_on_the_command_line_and_a_self_referring_alias_are_refused(tmp_path):
    value = "{" + alias_bomb(5, 9).replace("\n", ", ").rstrip(", ") + "}"
    with pytest.raises(RecipeError, match=r"command line: x=.*refused: it expands to more than"):
        parse_override(f"x={value}")
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [1, *a]\n")
    with pytest.raises(RecipeError, match=r"loop.yaml: refused: an alias refers to a node that contains it"):
        load_recipe(loop)


def test_legitimate_aliases_still_load_with_their_lines(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("shared: &s {name: tube, ratio: 0.9}\nmasker: *s\nlist: [*s, *s]\n")
    loaded = load_recipe(recipe)
    assert loaded.get("masker") == {"name": "tube", "ratio": 0.9} and loaded.get("list.1.ratio") == 0.9
    assert loaded.where("masker").endswith("ok.yaml:2")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_alias_bomb_through_the_cli_is_one_line_naming_the_file(tmp_path, command):
    """A 9**5-leaf bomb (memory-safe: today it only burns CPU, > 60 s): refused at once naming
    the file, exit 2, no traceback."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"base: [{RECIPES / 'mae.yaml'}]\n" + alias_bomb(5, 9))
    result = vlmask(command, str(bomb), f"run.dir={tmp_path / 'run'}", timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{bomb}: refused: it expands to more than {MAX_EXPANDED_NODES:,} values" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- manifests with hostile paths and lines

def bracket_folder(tmp_path: Path) -> Path:
    """``a[/]b/[draft]``: both rich markup if a path were ever printed as markup (a closing tag
    with nothing to close: MarkupError; a tag that would silently be dropped)."""
    folder = tmp_path / "a[" / "]b" / "[draft]"
    folder.mkdir(parents=True)
    assert "a[/]b/[draft]" in str(folder)
    return folder


def copy_manifest(source: Path, target: Path, extra_lines: list[str] = (), bom: bool = False) -> list[dict]:
    """The rows of ``source`` with absolute video paths, written to ``target`` (then extra lines)."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    for row in rows:
        row["video"] = str((source.parent / row["video"]).resolve())
    text = "".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in extra_lines)
    target.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return rows


def test_run_from_a_bracketed_folder_with_a_bom_and_a_100k_deep_line(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    """``run`` with a manifest under ``a[/]b/[draft]`` (today: a rich MarkupError traceback, or the
    brackets silently removed), starting with a UTF-8 byte-order mark (today: line 1 dropped) and
    holding a line nested 100k deep (today: RecursionError ends the run)."""
    folder = bracket_folder(tmp_path)
    manifest = folder / "train.jsonl"
    rows = copy_manifest(tiny_synth[0], manifest, ["[" * 100_000 + "]" * 100_000], bom=True)
    deep_line = len(rows) + 1
    run_dir = folder / "run"
    result = vlmask("run", str(RECIPES / "mae.yaml"), f"data.train={manifest}", f"run.dir={run_dir}",
                    "train.max_steps=1", *tiny_scale)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr
    assert result.stdout.count(f"run directory: {run_dir}\n") == 2
    assert "1 manifest line(s) skipped" in result.stderr
    assert f"line {deep_line}: invalid JSON: nested too deeply" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_clips"] == 1 and summary["skipped"][0]["line"] == deep_line  # line 1 (BOM) kept


@pytest.mark.parametrize("command", ["boxes", "captions"])
def test_data_fillers_print_bracketed_paths_as_written(tmp_path, tiny_synth, isolated_cache, command):
    folder = bracket_folder(tmp_path)
    manifest, out = folder / "in.jsonl", folder / "out.jsonl"
    rows = copy_manifest(tiny_synth[1], manifest, ["{not json"])
    extra = ["--captioner", "template"] if command == "captions" else []
    result = vlmask("data", command, str(manifest), "--out", str(out), "--workers", "1", *extra)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{out}: {len(rows)} of {len(rows) + 1} lines written" in result.stdout
    assert f"line {len(rows) + 1}: invalid JSON" in result.stdout


def test_an_error_message_holding_markup_is_printed_as_written(tmp_path):
    """A missing recipe or run under ``a[/]b/[draft]``: the error names the path as written, exit 2."""
    folder = bracket_folder(tmp_path)
    result = vlmask("validate", str(folder / "nowhere.yaml"))
    assert result.returncode == 2, result.stderr
    assert f"{folder / 'nowhere.yaml'}: recipe file not found" in result.stderr
    missing = vlmask("eval", str(folder / "no-run"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"{folder / 'no-run'}: not a run directory" in missing.stderr


def test_data_synth_into_a_bracketed_folder(tmp_path):
    folder = tmp_path / "a[" / "]b" / "[draft]"
    result = vlmask("data", "synth", "--out", str(folder), "--clips", "2")
    assert result.returncode == 0, result.stderr
    assert f"wrote {folder / 'train.jsonl'} and {folder / 'val.jsonl'}" in result.stdout


@pytest.mark.parametrize("command", ["boxes", "captions"])
def test_filling_a_manifest_in_place_loses_no_line(tmp_path, tiny_synth, isolated_cache, command):
    """``--out`` equal to the input: good lines are filled, skipped and blank lines stay where
    they were, byte for byte (today they vanish from the source for good)."""
    folder = tmp_path / "data"
    folder.mkdir()
    manifest = folder / "m.jsonl"
    rows = copy_manifest(tiny_synth[1], folder / "rows.jsonl")
    field = "action_box" if command == "boxes" else "caption"
    rows[0].pop(field)
    missing = json.dumps({"video": "gone.mp4", "label": "x"})
    lines = [json.dumps(rows[0]), "{not json", "", missing, *map(json.dumps, rows[1:])]
    manifest.write_text("\n".join(lines) + "\n")
    extra = ["--captioner", "template"] if command == "captions" else []
    result = vlmask("data", command, str(manifest), "--out", str(manifest), "--workers", "1", *extra)
    assert result.returncode == 0, result.stderr
    after = manifest.read_text().splitlines()
    assert after[1:4] == lines[1:4], "the skipped lines and the blank one are kept in place"
    assert after[4:] == lines[4:], "lines that needed nothing are unchanged"
    filled = json.loads(after[0])
    assert filled[field] and {k: v for k, v in filled.items() if k != field} == rows[0]
    assert "(kept as they were: the manifest was filled in place)" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["m.jsonl", "rows.jsonl"], "no temporary file left"


def test_embed_out_an_existing_folder_writes_inside_it(tmp_path, tiny_synth, tiny_scale, isolated_cache):
    """``embed --out DIR`` with DIR a folder: DIR/embeddings.npy (today DIR.npy appears beside it)."""
    import numpy as np

    run_dir = tmp_path / "run"
    trained = vlmask("run", str(RECIPES / "mae.yaml"), f"data.train={tiny_synth[0]}", f"run.dir={run_dir}",
                     "train.max_steps=1", *tiny_scale)
    assert trained.returncode == 0, trained.stderr
    folder = tmp_path / "features"
    folder.mkdir()
    result = vlmask("embed", str(run_dir), str(tiny_synth[1]), "--out", str(folder))
    assert result.returncode == 0, result.stderr
    assert f"wrote {folder / 'embeddings.npy'}" in result.stdout
    rows = [line for line in tiny_synth[1].read_text().splitlines() if line.strip()]
    assert np.load(folder / "embeddings.npy").shape[0] == len(rows)
    assert (folder / "embeddings.json").is_file() and not (tmp_path / "features.npy").exists()
