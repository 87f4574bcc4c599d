"""What a recipe needs from its data (vlmask.data_requirements): ``vlmask validate`` reads the
manifest and says what lines lack and what will be done; the Trainer has the missing action
boxes detected before training (cached: a second run detects nothing); ``vlmask compare`` checks
every recipe against the data before training any; with no plugin to fill a field, every one of
them stops before training with one line naming the manifest and the field.

The data are real H.264 clips (the tiny synthetic set) whose manifests lose their ``action_box``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vlmask import hookimpl
from vlmask.config import RecipeError, load_recipe
from vlmask.data_requirements import check_data, count_lacking
from vlmask.engine import Trainer
from vlmask.compare import compare, plan_compare
from vlmask.plugins import BLOCK_ENV, default_plugins, load_plugins

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, so the first run really detects."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("VLMASK_CACHE", str(folder))
    return folder


def without_boxes(manifest: Path, out: Path, keep: int = 0) -> Path:
    """``manifest`` with ``action_box`` removed from every line but the first ``keep``; ``video``
    made absolute (the copy lives elsewhere)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        row["video"] = str(manifest.parent / row["video"])
        if i >= keep:
            row.pop("action_box")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


class RegistryOnly:
    """The built-in factories without the built-in plugin's data hooks: a plugin set in which
    nothing can detect action boxes (what a user gets with a third-party plugin set)."""

    @staticmethod
    @hookimpl
    def vlmask_register_plugins(register):
        from vlmask_plugins import builtin

        builtin.vlmask_register_plugins(register)


@pytest.fixture
def no_detector(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "builtin")
    plugins = load_plugins(extra=[("registry-only", RegistryOnly)])
    assert ("head", "video_text_infonce") in plugins.registry
    return plugins


def test_count_lacking_reads_the_contract_fields(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"video": "a.mp4", "label": "open drawer", "action_box": [0, 0, 1, 1]}),
        json.dumps({"video": "b.mp4", "verb": "open", "noun": "drawer"}),  # label from verb and noun
        json.dumps({"video": "c.mp4", "verb": "open"}),
        "{not json", json.dumps({"caption": "no video"}), "",
    ]) + "\n")
    assert count_lacking(manifest, "action_box") == (3, 2)
    assert count_lacking(manifest, "label") == (3, 1)


def test_validate_says_what_lines_lack_and_what_will_be_done(tiny_synth, tmp_path, cache, capsys):
    from vlmask.cli import main

    train = without_boxes(tiny_synth[0], tmp_path / "train.jsonl", keep=5)
    lines = count_lacking(train, "action_box")[0]
    assert main(["validate", str(RECIPES / "fils.yaml"), f"data.train={train}"]) == 0
    err = capsys.readouterr().err
    assert (f"note: {lines - 5} of {lines} lines of {train} lack action_box; they will be detected before training "
            f"(detector 'flow', as vlmask data boxes; cached in {cache / 'boxes'})") in " ".join(err.split())
    assert main(["validate", str(RECIPES / "fils.yaml"), f"data.train={tiny_synth[0]}"]) == 0
    assert f"all {lines} lines of {tiny_synth[0]} have action_box" in " ".join(capsys.readouterr().err.split())
    assert main(["validate", str(RECIPES / "mae.yaml"), f"data.train={train}"]) == 0  # MAE needs no box
    assert "action_box" not in capsys.readouterr().err


def test_without_a_plugin_to_detect_boxes_everything_stops_before_training(tiny_synth, tiny_scale, tmp_path, cache,
                                                                           no_detector):
    train = without_boxes(tiny_synth[0], tmp_path / "train.jsonl", keep=2)
    lines = count_lacking(train, "action_box")[0]
    recipe = load_recipe(RECIPES / "fils.yaml", [*tiny_scale, f"data.train={train}", f"run.dir={tmp_path / 'run'}",
                                                 "train.max_steps=1"])
    errors, _ = check_data(recipe, no_detector.registry, no_detector.manager.hook, cache)
    expected = (f"{train}: {lines - 2} of {lines} lines lack action_box, needed by head 'video_text_infonce' "
                f"(heads.actclip); no plugin provides an action box per clip")
    assert len(errors) == 1 and expected in errors[0] and "key data.train" in errors[0]
    with pytest.raises(RecipeError, match="lack action_box") as caught:
        Trainer(recipe, no_detector)
    assert len(caught.value.problems) == 1 and expected in caught.value.problems[0]
    assert not (tmp_path / "run").exists()
    with pytest.raises(RecipeError) as caught:  # compare: before the first recipe (MAE) trains
        plan_compare([str(RECIPES / "mae.yaml"), str(RECIPES / "fils.yaml")], [*tiny_scale, f"data.train={train}"],
                     None, tmp_path / "cmp", plugins=no_detector)
    [problem] = caught.value.problems  # MAE needs no box
    assert problem.startswith(f"{RECIPES / 'fils.yaml'}: command line") and expected in problem
    plan_compare([str(RECIPES / "mae.yaml"), str(RECIPES / "fils.yaml")], [*tiny_scale, f"data.train={tiny_synth[0]}"],
                 None, tmp_path / "cmp", plugins=no_detector)  # boxes in every line: nothing to detect, valid


def test_compare_on_manifests_without_boxes_detects_them_once(tiny_synth, tiny_scale, tmp_path, cache, capfd):
    train = without_boxes(tiny_synth[0], tmp_path / "train.jsonl")
    val = without_boxes(tiny_synth[1], tmp_path / "val.jsonl")
    lines = count_lacking(train, "action_box")[0]
    overrides = [*tiny_scale, f"data.train={train}", f"data.val={val}", "train.max_steps=1", "train.log_every=1",
                 "evaluation.evaluators.linear_probe_temporal=null", "evaluation.evaluators.attentive_probe=null"]
    out = compare([str(RECIPES / "mae.yaml"), str(RECIPES / "fils.yaml")], overrides, out_dir=tmp_path / "first",
                  progress=False)
    comparison = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in comparison["runs"]] == ["mae", "fils"] and "failed" not in comparison
    log = " ".join(capfd.readouterr().err.split())
    assert (f"{lines} of {lines} lines of {train} lacked action_box; boxes: 0 in the manifest, {lines} detected, "
            "0 from cache") in log
    record = load_recipe(Path(comparison["runs"][1]["run_dir"]) / "config.yaml").get("record")
    assert record["data"]["train"] == str(train) and record["data"]["filled"]["action_box"]["detected"] == lines
    assert record["data"]["decoder"] in ("pyav", "decord", "torchcodec") and record["data"]["decoder_reason"]
    filled = Path(record["data"]["read"])
    assert filled.parent.parent == cache / "boxes" and count_lacking(filled, "action_box") == (lines, 0)
    assert count_lacking(train, "action_box") == (lines, lines)  # the user's manifest is left as it was

    compare([str(RECIPES / "fils.yaml")], overrides, out_dir=tmp_path / "second", progress=False)  # another run dir
    log = " ".join(capfd.readouterr().err.split())
    assert f"boxes: 0 in the manifest, 0 detected, {lines} from cache" in log


def test_the_filled_manifest_keeps_line_numbers_so_skipped_lines_are_named_as_in_the_source(tiny_synth, tmp_path,
                                                                                            cache, capfd):
    train = without_boxes(tiny_synth[0], tmp_path / "train.jsonl", keep=1)
    text = train.read_text().splitlines()
    text[2:2] = ["{bad json", "", json.dumps({"video": "gone.mp4", "caption": "a missing file"})]  # lines 3-5
    train.write_text("\n".join(text) + "\n")
    recipe = load_recipe(RECIPES / "fils.yaml", [f"data.train={train}", "train.max_steps=1", "data.num_workers=0",
                                                 "data.dataset.num_frames=4", "data.dataset.size=32", "device=cpu",
                                                 f"run.dir={tmp_path / 'run'}"])
    plugins = default_plugins()
    from vlmask.data_requirements import fill_data

    path, counts = fill_data(recipe, plugins.registry, plugins.manager.hook, train, cache)
    assert path != train and counts["action_box"]["kept"] == 1
    source, filled = train.read_text().splitlines(), path.read_text().splitlines()
    assert len(filled) == len(source) and filled[2] == "{bad json" and filled[3] == ""
    assert json.loads(filled[4])["video"] == str(tmp_path / "gone.mp4")  # absolute: the reason names the real file
    assert json.loads(filled[0])["action_box"] == json.loads(source[0])["action_box"]
    assert all("action_box" in json.loads(line) for i, line in enumerate(filled) if i not in (2, 3, 4))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_under_torchrun_rank_0_detects_and_the_other_rank_reads_its_cache(tiny_synth, tiny_scale, tmp_path):
    train = without_boxes(tiny_synth[0], tmp_path / "train.jsonl")
    lines = count_lacking(train, "action_box")[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "vlmask", "run", str(RECIPES / "fils.yaml"),
         f"data.train={train}", f"run.dir={tmp_path / 'run'}", "train.max_steps=1", *tiny_scale],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = " ".join(result.stderr.split())
    assert log.count("lacked action_box") == 1  # rank 0 alone reports
    assert f"boxes: 0 in the manifest, {lines} detected, 0 from cache" in log
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
