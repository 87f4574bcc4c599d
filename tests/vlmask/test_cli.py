"""The command line as users run it: real subprocesses, a real third-party plugin package."""

from __future__ import annotations

import json

import pytest
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).parents[2] / "recipes"


def vlmask(*args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vlmask", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_plugins_lists_third_party_and_reports_the_broken_one(plugin_site):
    result = vlmask("plugins", env_extra={"PYTHONPATH": str(plugin_site), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "grid" in result.stdout and "vlmask-grid-masker 0.1.0" in result.stdout
    assert "plugin 'broken' from vlmask-broken-plugin was skipped" in result.stderr
    assert "vlmask_dependency_that_does_not_exist" in result.stderr


def test_validate_exit_codes_and_every_error(tmp_path, plugin_site):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(f"base: [{RECIPES / 'mae.yaml'}]\nmasker: {{name: grid, stride: 2}}\n")
    good = vlmask("validate", str(recipe), env_extra={"PYTHONPATH": str(plugin_site)})
    assert good.returncode == 0 and "valid" in good.stdout, good.stderr
    bad = vlmask("validate", str(recipe), "masker.stride=lots", "model.predictor.dept=1")  # plugin not installed
    assert bad.returncode != 0
    assert "grid.yaml:2: key masker.name: unknown masker 'grid'" in bad.stderr
    assert "command line: model.predictor.dept=1: key model.predictor.dept" in bad.stderr


def test_run_with_a_third_party_masker(tmp_path, plugin_site, isolated_cache):
    from vlmask_plugins.data.synthetic import generate

    train, _ = generate(tmp_path / "data", clips=12, seed=2, frames=8, size=32, progress=False)
    run_dir = tmp_path / ("a-run-directory-longer-than-a-terminal-line-" * 3)  # printed unwrapped
    result = vlmask(
        "run", str(RECIPES / "mae.yaml"), f"data.train={train}", f"run.dir={run_dir}", "masker={name: grid, stride: 2}",
        "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "data.num_workers=0", "data.dataset.num_frames=4",
        "data.dataset.size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
        "model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.num_heads=2", "device=cpu",
        env_extra={"PYTHONPATH": str(plugin_site)},
    )
    assert result.returncode == 0, result.stderr
    assert f"run directory: {run_dir}" in result.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert "masker:\n  name: grid" in (run_dir / "config.yaml").read_text()


def test_data_synth_then_boxes(tmp_path, isolated_cache):
    synth = vlmask("data", "synth", "--out", str(tmp_path / "d"), "--clips", "8", "--seed", "5")
    assert synth.returncode == 0, synth.stderr
    rows = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    truth = [row.pop("action_box") for row in rows]
    (tmp_path / "d" / "nobox.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    boxes = vlmask("data", "boxes", str(tmp_path / "d" / "nobox.jsonl"), "--out", str(tmp_path / "d" / "boxes.jsonl"))
    assert boxes.returncode == 0, boxes.stderr
    detected = [json.loads(line)["action_box"] for line in (tmp_path / "d" / "boxes.jsonl").read_text().splitlines()]
    assert len(detected) == len(truth) == len(rows)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    assert sum(iou(a, b) for a, b in zip(detected, truth)) / len(truth) > 0.7


# Each recipe-only rule of `vlmask validate`: (recipe, overrides, the one line it must print).
VALIDATE_FAILURES = [
    ("fils.yaml", ["teacher=null"], "- command line: teacher=null: key teacher: target 'language_space' (targets.fp, "
                                    "recipes/fils.yaml:14) requires a teacher (teacher:) giving target features"),
    ("fils.yaml", ["model.projection=false"], "- command line: model.projection=false: key model.projection: target "
                                              "'language_space' (targets.fp, recipes/fils.yaml:14) requires the student's "
                                              "video-to-text projection"),
    ("fils.yaml", ["text_encoder=null"], "- recipes/fils.yaml:9: key model.projection: the projection maps into a text "
                                         "space and needs a text_encoder"),
    ("fils.yaml", ["model.predictor=null"], "- command line: model.predictor=null: key model.predictor: target "
                                            "'language_space' (targets.fp, recipes/fils.yaml:14) requires a predictor"),
    ("mae_clip.yaml", ["text_encoder=null", "model.projection=false"],
     "- command line: text_encoder=null: key text_encoder: head 'video_text_infonce' (heads.clip, recipes/mae_clip.yaml:9) "
     "requires a caption embedding per clip"),
    ("fils.yaml", ["train.accumulate=0"], "- command line: train.accumulate=0: key train.accumulate: 0 should be greater "
                                          "than or equal to 1"),
    ("fils.yaml", ["train.precision=fp16", "device=cpu"], "- command line: train.precision=fp16: key train.precision: "
                                                         "fp16 needs CUDA (device 'cpu', set by command line: device=cpu)"),
    ("fils.yaml", ["train.parallel=fsdp", "train.precision=fp16"], "- command line: train.parallel=fsdp: key "
                                                                  "train.parallel: fsdp runs in fp32 or bf16, not fp16"),
    ("fils.yaml", ["train.checkpoint_format=sharded"], "- command line: train.checkpoint_format=sharded: key "
                                                       "train.checkpoint_format: sharded checkpoints need "
                                                       "train.parallel=fsdp (got 'ddp', set by recipes/base/demo.yaml:29)"),
    ("mae.yaml", ["train.checkpoint_format=shard"], "- command line: train.checkpoint_format=shard: key "
                                                    "train.checkpoint_format: 'shard' is not one of auto, full, sharded"),
    ("mae.yaml", ["train.batch_size=-4"], "- command line: train.batch_size=-4: key train.batch_size: -4 should be "
                                          "greater than or equal to 1"),
    ("mae.yaml", ["train.batch_size=0"], "- command line: train.batch_size=0: key train.batch_size: 0 should be"),
    ("mae.yaml", ["train.log_every=0"], "- command line: train.log_every=0: key train.log_every: 0 should be"),
    ("mae.yaml", ["train.ckpt_every=0"], "- command line: train.ckpt_every=0: key train.ckpt_every: 0 should be"),
    ("mae.yaml", ["train.keep_checkpoints=0"], "- command line: train.keep_checkpoints=0: key train.keep_checkpoints: 0"),
    ("mae.yaml", ["train.max_steps=0"], "- command line: train.max_steps=0: key train.max_steps: 0 should be"),
    ("mae.yaml", ["train.max_steps=-1"], "- command line: train.max_steps=-1: key train.max_steps: -1 should be"),
    ("mae.yaml", ["~train.max_steps"], "- command line: ~train.max_steps: key train.max_steps: set train.max_steps or "
                                       "train.epochs"),
    ("mae.yaml", ["train.max_steps=null", "train.epochs=0"], "- command line: train.epochs=0: key train.epochs: 0 "
                                                             "should be greater than 0"),
    ("mae.yaml", ["masker.ratio=1.5"], "- command line: masker.ratio=1.5: key masker.ratio: 1.5 should be a masking "
                                       "ratio in (0, 1) (masker 'tube')"),
    ("turbo.yaml", ["masker.reconstruct_ratio=0"], "- command line: masker.reconstruct_ratio=0: key "
                                                   "masker.reconstruct_ratio: 0 should be a masking ratio in (0, 1)"),
    ("mae.yaml", ["optim.lr=0"], "- command line: optim.lr=0: key optim.lr: 0 should be greater than 0"),
    ("mae.yaml", ["optim.warmup_steps=-5"], "- command line: optim.warmup_steps=-5: key optim.warmup_steps: -5 should be "
                                            "greater than or equal to 0"),
    ("mae.yaml", ["data.dataset.num_frames=7"], "- command line: data.dataset.num_frames=7 (through ${data.dataset.num_frames} at recipes/base/demo.yaml:22): "
                                                "key model.encoder.num_frames: "
                                                "7 frames do not split into tubelets of 2"),
    ("mae.yaml", ["model.encoder.img_size=60"], "- command line: model.encoder.img_size=60: key model.encoder.img_size: "
                                                "60 pixels do not split into patches of 8"),
    ("mae.yaml", ["model.encoder.num_frames=4"], "- command line: data.dataset.num_frames=" if False else
     "key data.dataset.num_frames: the dataset gives 8 but the encoder expects model.encoder.num_frames=4 "
     "(command line: model.encoder.num_frames=4)"),
]


@pytest.mark.parametrize("recipe, overrides, line", VALIDATE_FAILURES, ids=lambda v: v if isinstance(v, str) and "=" in v
                         and not v.startswith("-") else None)
def test_validate_refuses_each_recipe_only_rule_naming_the_source(recipe, overrides, line, capsys, monkeypatch):
    from vlmask.cli import main

    monkeypatch.chdir(RECIPES.parent)  # the recipe paths print relative to the working directory
    assert main(["validate", f"recipes/{recipe}", *overrides]) == 1
    err = capsys.readouterr().err
    assert f"recipes/{recipe}: " in err and line in err, err


def test_validate_through_a_subprocess_refuses_fils_without_a_teacher():
    result = vlmask("validate", "recipes/fils.yaml", "teacher=null", cwd=RECIPES.parent)
    assert result.returncode == 1
    assert "command line: teacher=null: key teacher: target 'language_space'" in result.stderr, result.stderr


def test_validate_notes_what_only_the_data_can_provide(capsys, monkeypatch):
    from vlmask.cli import main

    monkeypatch.chdir(RECIPES.parent)
    assert main(["validate", "recipes/fils.yaml"]) == 0
    captured = capsys.readouterr()
    assert "recipes/fils.yaml: valid" in captured.out
    assert ("note: recipes/fils.yaml:16: head 'video_text_infonce' (heads.actclip) needs an action box per clip "
            "(action_box in the manifest, or an action-area detector)") in captured.err


# ------------------------------------------------------------------ issue 22: overrides anywhere, one-line errors

BOGUS = "train.max_stepz=3"  # an override every command refuses, naming it: proof that it reached the command


@pytest.fixture(scope="module")
def tiny_run_dir(tiny_synth, tiny_scale, tmp_path_factory) -> Path:
    """A real 2-step MAE run at tiny scale (config.yaml and a checkpoint), for eval/finetune/embed."""
    from vlmask.config import load_recipe
    from vlmask.engine import Trainer

    run_dir = tmp_path_factory.mktemp("cli-run") / "run"
    overrides = [*tiny_scale, f"data.train={tiny_synth[0]}", f"data.val={tiny_synth[1]}", f"run.dir={run_dir}",
                 "train.max_steps=2", "train.ckpt_every=2"]
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        trainer.train()
    return run_dir


def one_line_refusal(err: str, *names: str) -> None:
    """The refusal names each of ``names`` and holds no traceback."""
    assert "Traceback" not in err and "RecursionError" not in err, err
    for name in names:
        assert name in err, err


def override_after_an_option(command: str, recipe: str, run_dir: Path, manifest: Path, out: Path) -> list[str]:
    """``vlmask COMMAND ... --OPTION VALUE KEY=VALUE``: the override after the command's last option."""
    return {
        "run": ["run", recipe, BOGUS],  # run and finetune have no option of their own: after the positionals
        "validate": ["validate", recipe, "--keys-only", BOGUS],
        "eval": ["eval", str(run_dir), "--only", "knn", BOGUS],
        "finetune": ["finetune", str(run_dir), BOGUS],
        "embed": ["embed", str(run_dir), str(manifest), "--out", str(out / "f.npy"), "--pooling", "mean", BOGUS],
        "compare": ["compare", recipe, recipe, "--out", str(out / "cmp"), BOGUS],
        "bench": ["bench", recipe, "--flops", BOGUS],
    }[command]


@pytest.mark.parametrize("command", ["run", "validate", "eval", "finetune", "embed", "compare", "bench"])
def test_an_override_after_the_options_reaches_every_command(command, tiny_run_dir, tiny_synth, tmp_path, capsys,
                                                             isolated_cache):
    """``vlmask compare a.yaml b.yaml --out OUT key=value`` was refused (``unrecognized arguments``):
    the override must reach the command wherever it stands. Each command refuses this one naming it."""
    from vlmask.cli import main

    argv = override_after_an_option(command, str(RECIPES / "mae.yaml"), tiny_run_dir, tiny_synth[1], tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2) and "unrecognized arguments" not in err, err
    one_line_refusal(err, "max_stepz")
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "f.npy").exists()


def test_compare_takes_recipes_and_overrides_on_either_side_of_its_options(tmp_path):
    from vlmask.cli import parse_command_line

    args = parse_command_line(["compare", "a.yaml", "--out", str(tmp_path), "b.yaml", "seed=1", "--seeds", "0,1",
                               "~train.epochs"])
    assert args.items == ["a.yaml", "b.yaml", "seed=1", "~train.epochs"] and args.seeds == "0,1"


def test_data_captions_takes_the_captioners_arguments_after_its_options(tiny_synth, tmp_path):
    rows = [json.loads(line) for line in tiny_synth[0].read_text().splitlines()][:3]
    for row in rows:
        row.pop("caption", None)
        row["video"] = str((tiny_synth[0].parent / row["video"]).resolve())
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from vlmask.cli import main

    assert main(["data", "captions", str(manifest), "--out", str(tmp_path / "out.jsonl"), "--captioner", "template",
                 "template=clip of {label}"]) == 0
    captions = [json.loads(line)["caption"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert captions == [f"clip of {r['label'].replace('_', ' ')}" for r in rows]


@pytest.mark.parametrize("argv, usage", [
    (["run", "r.yaml", "--bogus", "seed=1"], "vlmask run: error: unrecognized arguments: --bogus"),
    (["compare", "a.yaml", "--out", "o", "seed=1", "--bogus=3"], "vlmask compare: error: unrecognized arguments: --bogus=3"),
    (["eval", "run", "seed=1", "--zz", "x"], "vlmask eval: error: unrecognized arguments: --zz"),
    (["plugins", "seed=1"], "vlmask plugins: error: unrecognized arguments: seed=1"),
    (["export", "run", "--to", "hf-videomae", "--out", "o", "seed=1"], "vlmask export: error: unrecognized arguments: seed=1"),
])
def test_unknown_options_and_overrides_to_a_command_without_any_are_still_refused(argv, usage, capsys):
    from vlmask.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert usage in capsys.readouterr().err
