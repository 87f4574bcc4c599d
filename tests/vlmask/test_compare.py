"""``vlmask compare``: statistics in comparison.json/md, validation before training, failed runs,
and resuming after a kill (contract: "comparison.json")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmask.config import RecipeError
from vlmask.compare import comparison_stats, compare, paired_to_baseline
from vlmask.records import ComparedRun
from vlmask.report import comparison_table

RECIPES = Path(__file__).parents[2] / "recipes"
ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tiny_synth, tiny_scale, steps: int = 2) -> list[str]:
    train, val = tiny_synth
    return [*tiny_scale, f"data.train={train}", f"data.val={val}", f"train.max_steps={steps}",
            "train.log_every=1", "train.ckpt_every=2",
            # the sections under test; the others are tested in tests/vlmask/test_evaluate.py
            "evaluation.evaluators.linear_probe_temporal=null", "evaluation.evaluators.attentive_probe=null"]


def second_recipe(folder: Path) -> str:
    """A second recipe: VideoMAE at masking ratio 0.8 (a file of its own, so a recipe of its own)."""
    path = folder / "mae80.yaml"
    path.write_text(f"base: [{RECIPES / 'mae.yaml'}]\nmasker: {{name: tube, ratio: 0.8}}\n")
    return str(path)


def entry(name: str, seed: int, run_dir: str | None = None, **metrics: float) -> ComparedRun:
    return ComparedRun(f"recipes/{name}.yaml", name, seed, run_dir or f"/runs/{name}-{seed}",
                       summary={"wall_s": 1.0, "clips_per_s": 2.0, "steps": 10, "train_flops": 1e12},
                       evaluation={"chance_top1": 0.25, "knn": {"top1": metrics["knn"]}})


def test_the_table_shows_intervals_and_says_which_differences_are_beyond_noise():
    entries = [entry("mae", s, knn=v) for s, v in zip((0, 1, 2), (0.30, 0.60, 0.45))]
    entries += [entry("fils", s, knn=v) for s, v in zip((0, 1, 2), (0.40, 0.70, 0.55))]  # +10 points on every seed
    entries += [entry("dpc", s, knn=v) for s, v in zip((0, 1, 2), (0.40, 0.50, 0.45))]  # +10, -10, 0
    paired = paired_to_baseline(entries, "mae")
    assert [(p.recipe, p.metric, p.significant) for p in paired] == [("fils", "knn.top1", True), ("dpc", "knn.top1", False)]
    table = comparison_table(entries, comparison_stats(entries), paired=paired)
    # mae: mean 0.45, std 0.15, half width 4.3027 * 0.15 / sqrt(3) = 0.373
    assert "| mae | 3 | 0.250 ± 0.000 | 0.450 ± 0.150 [0.077, 0.823] |" in table
    assert "**fils beats mae on knn.top1 by 10.0 points (95% CI 10.0 to 10.0, 3 seeds): beyond seed noise.**" in table
    assert "dpc ties mae on knn.top1 (95% CI -24.8 to 24.8, 3 seeds): within seed noise" in table
    one_seed = comparison_table([entry("mae", 0, knn=0.3)], comparison_stats([entry("mae", 0, knn=0.3)]))
    assert "| mae | 1 | 0.250 | 0.300 |" in one_seed and "no interval can be computed from one seed" in one_seed


def test_the_table_says_which_features_were_probed_when_a_run_probed_the_context():
    """eval.json ``features`` (``evaluation.features``) reaches comparison.md; an eval.json
    without it (an older vlmask) probed the encoder, and all-encoder tables are unchanged."""
    from dataclasses import replace

    mae = entry("mae", 0, knn=0.3)
    dpc = entry("dpc", 0, knn=0.4)
    dpc = replace(dpc, evaluation={**dpc.evaluation, "features": "context"})
    assert (mae.features, dpc.features) == ("encoder", "context")
    table = comparison_table([mae, dpc], comparison_stats([mae, dpc]))
    assert "features probed: `encoder` for mae; `context` for dpc." in table
    assert "features probed" not in comparison_table([mae], comparison_stats([mae]))
    assert dpc.as_json()["eval"]["features"] == "context"  # comparison.json carries the run's eval.json


def test_compare_writes_stats_and_paired_rows(tiny_synth, tiny_scale, tmp_path):
    out = compare([str(RECIPES / "mae.yaml"), second_recipe(tmp_path)], tiny(tiny_synth, tiny_scale), seeds=[0, 1],
                  out_dir=tmp_path / "cmp", progress=False, baseline="mae")
    comparison = json.loads((out / "comparison.json").read_text())
    knn = {row["recipe"]: row for row in comparison["stats"] if row["metric"] == "knn.top1"}
    assert set(knn) == {"mae", "mae80"} and knn["mae"]["n"] == 2
    values = [r["eval"]["knn"]["top1"] for r in comparison["runs"] if r["name"] == "mae"]
    assert knn["mae"]["mean"] == pytest.approx(sum(values) / 2)
    low, high = knn["mae"]["ci95"]
    assert low <= knn["mae"]["mean"] <= high
    paired = [row for row in comparison["paired"] if row["metric"] == "knn.top1"]
    assert len(paired) == 1 and paired[0]["recipe"] == "mae80" and paired[0]["baseline"] == "mae"
    assert set(paired[0]) >= {"mean_difference", "ci95", "significant"}
    for run in comparison["runs"]:  # counted at the run's own scale when the engine does not write it
        assert run["summary"]["train_flops"] > 0
    for run in comparison["runs"]:  # the training loss at the first logged step (1) and the last (2)
        logged = [json.loads(line)["loss"] for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert run["loss"] == {"first_step": 1, "first": logged[0], "final_step": 2, "final": run["summary"]["final_loss"]}
    mae_losses = [r["loss"] for r in comparison["runs"] if r["name"] == "mae"]
    table = (out / "comparison.md").read_text()
    assert "## Paired differences to the baseline (mae)" in table and "train PFLOP" in table
    mean_first = sum(loss["first"] for loss in mae_losses) / 2
    assert f"{mean_first:.3f} ± " in table.split("| mae |")[1].split("\n")[0].rsplit("|", 2)[-2]
    with pytest.raises(ValueError, match="--baseline 'fils' is not one of the compared recipes"):
        compare([str(RECIPES / "mae.yaml")], tiny(tiny_synth, tiny_scale), out_dir=tmp_path / "x", baseline="fils")


def test_every_recipe_is_validated_before_any_trains(tiny_synth, tiny_scale, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: [{RECIPES / 'mae.yaml'}]\ntrain: {{max_stepz: 3}}\n")
    out_dir = tmp_path / "cmp"
    with pytest.raises(RecipeError) as caught:
        compare([str(RECIPES / "mae.yaml"), str(bad), str(RECIPES / "mae.yaml")],
                [*tiny(tiny_synth, tiny_scale), "data.val=/nowhere/val.jsonl"], seeds=[0], out_dir=out_dir, progress=False)
    text = "\n".join(caught.value.problems)
    assert "max_stepz" in text and "bad.yaml" in text  # the file and the key
    assert "/nowhere/val.jsonl does not exist" in text
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing trained, not even the first recipe


def test_a_failed_recipe_is_reported_and_the_others_are_tabulated(tiny_synth, tiny_scale, tmp_path):
    broken = tmp_path / "broken.yaml"  # valid, so validation passes; the loss diverges to inf/NaN while training
    broken.write_text(f"base: [{RECIPES / 'mae.yaml'}]\noptim: {{lr: 1.0e+30, warmup_lr: 1.0e+30, min_lr: 1.0e+30}}\n")
    out = compare([str(broken), str(RECIPES / "mae.yaml")], tiny(tiny_synth, tiny_scale), seeds=[0],
                  out_dir=tmp_path / "cmp", progress=False)
    comparison = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in comparison["runs"]] == ["mae"]
    assert [f["name"] for f in comparison["failed"]] == ["broken"] and comparison["failed"][0]["error"]
    table = (out / "comparison.md").read_text()
    assert "| mae | 1 |" in table and "## Failed runs" in table and "broken seed 0" in table


def test_a_killed_compare_resumes_without_retraining_finished_runs(tiny_synth, tiny_scale, tmp_path):
    out_dir = tmp_path / "cmp"
    overrides = [o for o in tiny(tiny_synth, tiny_scale, steps=12) if not o.startswith("train.ckpt_every")]
    overrides.append("train.ckpt_every=3")
    recipes = [str(RECIPES / "mae.yaml"), second_recipe(tmp_path)]
    code = ("import sys, json, torch; torch.set_num_threads(1); from vlmask.compare import compare; "
            "compare(json.loads(sys.argv[1]), json.loads(sys.argv[2]), seeds=[0], out_dir=sys.argv[3], progress=False)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'plugins'}"}
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(recipes), json.dumps(overrides), str(out_dir)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, second = out_dir / "mae-seed0", out_dir / "mae80-seed0"
    deadline = time.monotonic() + 300
    try:
        while not list((second / "checkpoints").glob("step_*")):  # the second recipe is training
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the second recipe never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert (first / "summary.json").is_file() and (first / "eval.json").is_file()
    assert not (second / "summary.json").exists()  # killed mid-run
    watched = [first / "summary.json", first / "eval.json", *sorted((first / "checkpoints").rglob("*"))]
    stamps = {p: p.stat().st_mtime_ns for p in watched}
    compare(recipes, overrides, seeds=[0], out_dir=out_dir, progress=False)
    assert {p: p.stat().st_mtime_ns for p in watched} == stamps  # the first run: neither retrained nor re-evaluated
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["resumed_from_step"]  # the second resumed from its checkpoint
    comparison = json.loads((out_dir / "comparison.json").read_text())
    assert [r["name"] for r in comparison["runs"]] == ["mae", "mae80"]


def test_the_plot_gains_a_row_of_diagnostics_curves_when_metrics_jsonl_has_them(tmp_path):
    from PIL import Image

    from vlmask.report import comparison_plot

    entries = []
    for seed in (0, 1):
        run_dir = tmp_path / f"mae-{seed}"
        run_dir.mkdir()
        rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        entries.append(entry("mae", seed, str(run_dir), knn=0.5))
    plain = Image.open(comparison_plot(entries, tmp_path / "plain.png")).size
    for seed in (0, 1):
        rows = [{"step": s, "loss": 1.0 / s, "rankme": 5.0 + s, "student_std": 0.1} for s in (1, 2, 3)]
        (tmp_path / f"mae-{seed}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_diagnostics = Image.open(comparison_plot(entries, tmp_path / "diag.png")).size
    assert with_diagnostics[0] == plain[0] and with_diagnostics[1] == 2 * plain[1]  # a second row of panels


def test_an_eval_json_is_reused_only_when_made_with_the_settings_the_compare_asks(tiny_synth, tiny_scale, tmp_path,
                                                                                 capfd):
    """Reuse is keyed on the checkpoint and the evaluation settings (eval.json ``settings``); an
    eval.json of other settings is evaluated again and kept as eval-<hash>.json; ``evaluation.*``
    overrides do not make a finished run "another recipe" (they do not change training)."""
    from vlmask.evaluate import evaluate_run

    out_dir = tmp_path / "cmp"
    overrides = tiny(tiny_synth, tiny_scale)
    recipes = [str(RECIPES / "mae.yaml")]
    compare(recipes, overrides, seeds=[0], out_dir=out_dir, progress=False)
    run = out_dir / "mae-seed0"
    trained = [run / "summary.json", run / "config.yaml", *sorted((run / "checkpoints").rglob("*"))]
    stamps = {p: p.stat().st_mtime_ns for p in trained}

    def knn_k() -> int:
        return json.loads((run / "eval.json").read_text())["settings"]["evaluation"]["evaluators"]["knn"]["k"]

    def kept() -> dict[str, int]:
        return {p.name: json.loads(p.read_text())["settings"]["evaluation"]["evaluators"]["knn"]["k"]
                for p in run.glob("eval-*.json")}

    assert knn_k() == 20 and kept() == {}  # the knn default, recorded with every other argument
    capfd.readouterr()
    # the same settings, one of them spelled out: reused, not evaluated again
    made = (run / "eval.json").stat().st_mtime_ns
    compare(recipes, [*overrides, "evaluation.evaluators.knn.k=20"], seeds=[0], out_dir=out_dir, progress=False)
    assert (run / "eval.json").stat().st_mtime_ns == made
    assert f"{run / 'eval.json'} reused" in capfd.readouterr().err

    # the researcher evaluates with other settings, then compares again with the recipe's
    evaluate_run(run, ["evaluation.evaluators.knn.k=3"], progress=False)
    assert knn_k() == 3 and list(kept().values()) == [20]  # vlmask eval kept the compare's evaluation
    capfd.readouterr()
    compare(recipes, overrides, seeds=[0], out_dir=out_dir, progress=False)
    err = " ".join(capfd.readouterr().err.split())  # rich may wrap long lines
    assert (f"{run / 'eval.json'} was made with evaluation.evaluators.knn.k=3, the compare asks 20: "
            f"evaluating again") in err
    assert knn_k() == 20 and set(kept().values()) == {3, 20}  # the k=3 evaluation is kept too
    comparison = json.loads((out_dir / "comparison.json").read_text())
    assert comparison["runs"][0]["eval"]["settings"]["evaluation"]["evaluators"]["knn"]["k"] == 20

    # an evaluation override in the compare itself: the finished run is reused, the eval redone
    compare(recipes, [*overrides, "evaluation.evaluators.knn.k=1"], seeds=[0], out_dir=out_dir, progress=False)
    assert knn_k() == 1 and "was made with evaluation.evaluators.knn.k=20, the compare asks 1" in " ".join(
        capfd.readouterr().err.split())
    assert "`knn (k=1)`" in (out_dir / "comparison.md").read_text()  # the table says which knn
    assert {p: p.stat().st_mtime_ns for p in trained} == stamps  # never retrained
    assert set(kept().values()) == {3, 20}  # every evaluation made is still on disk

    old = {k: v for k, v in json.loads((run / "eval.json").read_text()).items() if k != "settings"}
    (run / "eval.json").write_text(json.dumps(old))  # as an older vlmask wrote it: settings unknown
    capfd.readouterr()
    compare(recipes, [*overrides, "evaluation.evaluators.knn.k=1"], seeds=[0], out_dir=out_dir, progress=False)
    assert "eval.json does not record its evaluation settings (an older vlmask wrote it): evaluating again" in " ".join(
        capfd.readouterr().err.split())
    assert knn_k() == 1 and old in [json.loads(p.read_text()) for p in run.glob("eval-*.json")]


# ------------------------------------------------------------------ issue 22.2: the exit code says when runs are missing

#: Holds RUN_DIR's lock as a ``vlmask run`` training in it would, until its stdin closes.
HOLD_LOCK = """
import sys
from vlmask.rundir import RunDirLock
with RunDirLock(sys.argv[1], command="vlmask run recipes/mae.yaml seed=0"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_compare_into_a_busy_run_directory_stops_with_exit_code_2_before_training(tiny_synth, tiny_scale, tmp_path,
                                                                                  capsys):
    """It exited 0 with an empty table: the Trainer's RunDirBusy was recorded as a failed run."""
    import socket

    from vlmask.cli import main

    out_dir = tmp_path / "cmp"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'plugins'}"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out_dir / "mae-seed0")], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["compare", str(RECIPES / "mae.yaml"), "--seeds", "0", "--out", str(out_dir),
                     *tiny(tiny_synth, tiny_scale)])
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = [line for line in err.splitlines() if "RunDirBusy" in line]
    assert line.startswith(f"RunDirBusy: {out_dir / 'mae-seed0'} is in use by pid {holder.pid} on "
                           f"{socket.gethostname()} (vlmask run recipes/mae.yaml seed=0, since "), err
    assert "Traceback" not in err
    assert [p.name for p in (out_dir / "mae-seed0").iterdir()] == [".lock"]  # nothing trained, nothing written
    assert not (out_dir / "comparison.json").exists()


def test_compare_exits_non_zero_naming_each_run_that_failed(tiny_synth, tiny_scale, tmp_path, capsys):
    from vlmask.cli import main

    broken = tmp_path / "broken.yaml"  # valid, so validation passes; the loss diverges while training
    broken.write_text(f"base: [{RECIPES / 'mae.yaml'}]\noptim: {{lr: 1.0e+30, warmup_lr: 1.0e+30, min_lr: 1.0e+30}}\n")
    out_dir = tmp_path / "cmp"
    code = main(["compare", str(broken), "--seeds", "0", "--out", str(out_dir), *tiny(tiny_synth, tiny_scale)])
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap
    assert code == 1, err
    assert f"compare: 1 run(s) failed: broken seed 0 ({out_dir / 'broken-seed0'}): " in err and "Traceback" not in err
    assert json.loads((out_dir / "comparison.json").read_text())["failed"][0]["name"] == "broken"


# ------------------------------------------------------------------ issue 18.1: fine-tuning in compare (FILS Tables 1-3)


def test_compare_finetune_tabulates_finetune_top1_and_reuses_finetune_json_by_its_settings(
        tiny_synth, tiny_scale, tmp_path, capfd):
    """``compare(finetune=True)``: every run is fine-tuned with the same settings after its
    evaluation; ``finetune_top1`` joins ``stats`` and ``paired`` and the table; a second compare
    reuses finetune.json; another ``finetune.*`` setting fine-tunes again (the old file kept as
    finetune-<hash>.json) without retraining; an older finetune.json without ``requested`` is
    fine-tuned again; a bad finetune override is refused before anything trains."""
    out_dir = tmp_path / "cmp"
    finetune = ["finetune.max_steps=2", "finetune.batch_size=4", "finetune.warmup_steps=0", "finetune.num_workers=0"]
    overrides = [*tiny(tiny_synth, tiny_scale), "evaluation.evaluators.retrieval=null", "evaluation.evaluators.zero_shot=null",
                 *finetune]
    recipes = [str(RECIPES / "mae.yaml"), second_recipe(tmp_path)]

    with pytest.raises(RecipeError, match="finetune.lr"):  # validated with the recipes: nothing trains
        compare(recipes, [*overrides, "finetune.lr=-1"], seeds=[0], out_dir=out_dir, progress=False, finetune=True)
    assert not out_dir.exists()

    compare(recipes, overrides, seeds=[0], out_dir=out_dir, progress=False, baseline="mae", finetune=True)
    comparison = json.loads((out_dir / "comparison.json").read_text())
    tuned = ["finetune_top1", "finetune_verb_top1", "finetune_noun_top1"]  # tiny_synth carries verbs and nouns
    assert [(row["recipe"], row["metric"]) for row in comparison["stats"] if row["metric"].startswith("finetune")] == [
        (recipe, metric) for recipe in ("mae", "mae80") for metric in tuned]
    assert [(row["recipe"], row["metric"]) for row in comparison["paired"] if row["metric"].startswith("finetune")] == [
        ("mae80", metric) for metric in tuned]
    top1 = [run["finetune"]["top1"] for run in comparison["runs"]]
    assert [row["mean"] for row in comparison["stats"] if row["metric"] == "finetune_top1"] == pytest.approx(top1)
    assert list(comparison["runs"][0]) == ["recipe", "name", "seed", "run_dir", "summary", "eval", "loss", "finetune"]
    assert "finetune_top1" in (out_dir / "comparison.md").read_text()
    run = out_dir / "mae-seed0"
    made = json.loads((run / "finetune.json").read_text())
    assert made["requested"]["finetune"]["max_steps"] == 2 and made["steps"] == 2
    trained = [run / "summary.json", *sorted((run / "checkpoints").rglob("*"))]
    stamps = {p: p.stat().st_mtime_ns for p in trained}

    capfd.readouterr()
    stamp = (run / "finetune.json").stat().st_mtime_ns
    compare(recipes[:1], overrides, seeds=[0], out_dir=out_dir, progress=False, finetune=True)
    assert (run / "finetune.json").stat().st_mtime_ns == stamp
    assert f"{run / 'finetune.json'} reused" in " ".join(capfd.readouterr().err.split())

    compare(recipes[:1], [*overrides, "finetune.max_steps=3"], seeds=[0], out_dir=out_dir, progress=False, finetune=True)
    err = " ".join(capfd.readouterr().err.split())
    assert f"{run / 'finetune.json'} was made with finetune.max_steps=2, the compare asks 3: finetuning again" in err
    assert json.loads((run / "finetune.json").read_text())["steps"] == 3
    assert [json.loads(p.read_text())["steps"] for p in run.glob("finetune-*.json")] == [2]  # the first kept
    assert {p: p.stat().st_mtime_ns for p in trained} == stamps  # finetune.* overrides do not retrain

    old = {k: v for k, v in json.loads((run / "finetune.json").read_text()).items() if k != "requested"}
    (run / "finetune.json").write_text(json.dumps(old))  # as an older vlmask wrote it
    compare(recipes[:1], [*overrides, "finetune.max_steps=3"], seeds=[0], out_dir=out_dir, progress=False, finetune=True)
    assert "finetune.json does not record its finetuning settings (an older vlmask wrote it): finetuning again" in " ".join(
        capfd.readouterr().err.split())
    assert old in [json.loads(p.read_text()) for p in run.glob("finetune-*.json")]


def test_the_command_line_passes_finetune_and_its_overrides_to_compare():
    from vlmask.cli import parse_command_line

    args = parse_command_line(["compare", "a.yaml", "--finetune", "b.yaml", "finetune.max_steps=2"])
    assert args.finetune is True and args.items == ["a.yaml", "b.yaml", "finetune.max_steps=2"]
    assert parse_command_line(["compare", "a.yaml"]).finetune is False
