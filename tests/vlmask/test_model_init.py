"""``model.init``: a run starts from a released VideoMAE checkpoint (through the
``vlmask_load_init`` hook, implemented by the built-in plugin) and trains on; a mismatched one
is refused in one line naming the key; ``validate`` checks the path; resume wins over init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmask.config import RecipeError, load_recipe
from vlmask.engine import Trainer
from vlmask.plugins import load_plugins

transformers = pytest.importorskip("transformers")
RECIPES = Path(__file__).parents[2] / "recipes"


def videomae_folder(folder: Path, hidden: int = 32) -> Path:
    """A random ``VideoMAEForPreTraining`` the size of the tiny MAE recipe (TINY_SCALE), saved."""
    torch.manual_seed(5)
    config = transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=hidden, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=4 * hidden, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=128, norm_pix_loss=True, layer_norm_eps=1e-6, use_mean_pooling=False,
    )  # fmt: skip
    model = transformers.VideoMAEForPreTraining(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(folder)
    return folder


def vlmask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmask", *args], capture_output=True, text=True, env=dict(os.environ),
                          timeout=600)


@pytest.fixture
def overrides(tiny_synth, tiny_scale):
    def make(run_dir: Path, steps: int = 2) -> list[str]:
        return [*tiny_scale, f"data.train={tiny_synth[0]}", f"run.dir={run_dir}", f"train.max_steps={steps}",
                "train.log_every=1", "train.ckpt_every=2"]

    return make


def test_init_starts_encoder_and_predictor_from_the_checkpoint(tmp_path, overrides):
    from vlmask_plugins.encoders.videomae_init import load_videomae_pretraining

    folder = videomae_folder(tmp_path / "hf")
    with Trainer(load_recipe(RECIPES / "mae.yaml", [*overrides(tmp_path / "run"), f"model.init={folder}"])) as trainer:
        reference = Trainer(load_recipe(RECIPES / "mae.yaml", overrides(tmp_path / "plain")))
        plain = {k: v.clone() for k, v in reference.train_step.student.state_dict().items()}
        load_videomae_pretraining(reference.train_step.student.encoder, reference.train_step.student.predictor, folder)
        imported = reference.train_step.student.state_dict()
        started = trainer.train_step.student.state_dict()
        reference.close()
        assert started.keys() == imported.keys()
        for key in started:
            assert torch.equal(started[key], imported[key]), key
        assert not torch.equal(plain["encoder.blocks.0.attn.qkv.weight"], started["encoder.blocks.0.attn.qkv.weight"])
        trainer.train()


def test_cli_trains_on_from_init_and_a_size_mismatch_is_one_line(tmp_path, overrides):
    folder = videomae_folder(tmp_path / "hf")
    ran = vlmask("run", str(RECIPES / "mae.yaml"), *overrides(tmp_path / "run"), f"model.init={folder}")
    assert ran.returncode == 0, ran.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    wider = videomae_folder(tmp_path / "wide", hidden=64)
    refused = vlmask("run", str(RECIPES / "mae.yaml"), *overrides(tmp_path / "bad"), f"model.init={wider}")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert "Traceback" not in refused.stderr
    [line] = [line for line in lines if "model.init" in line]
    assert "command line: model.init=" in line and "encoder key" in line and "checkpoint (" in line, refused.stderr
    missing = vlmask("validate", str(RECIPES / "mae.yaml"), f"model.init={tmp_path / 'nowhere'}")
    assert missing.returncode != 0 and "key model.init:" in missing.stderr and "does not exist" in missing.stderr




def test_resume_loads_the_checkpoint_over_init(tmp_path, overrides, stop_after_checkpoint):
    """Were init applied after the checkpoint on resume, steps 3-4 would restart from the import."""
    folder = videomae_folder(tmp_path / "hf")

    def final(run_dir: Path, stop_at: int | None = None) -> dict[str, torch.Tensor]:
        extra = [("stopper", stop_after_checkpoint(stop_at))] if stop_at else []
        recipe = load_recipe(RECIPES / "mae.yaml", [*overrides(run_dir, steps=4), f"model.init={folder}"])
        with Trainer(recipe, load_plugins(extra)) as trainer:
            trainer.train()
            return {k: v.clone() for k, v in trainer.train_step.student.state_dict().items()}

    uninterrupted = final(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        final(tmp_path / "b", stop_at=2)
    resumed = final(tmp_path / "b")
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


def test_a_folder_no_plugin_reads_is_an_error_naming_the_key(tmp_path, overrides):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"key model.init: .*no model.safetensors"):
        Trainer(load_recipe(RECIPES / "mae.yaml", [*overrides(tmp_path / "run"), f"model.init={tmp_path / 'empty'}"]))


@pytest.mark.parametrize("text, says", [
    ('{"model_type": "videomae", "hidden_size": }', "not valid JSON (Expecting value: line 1 column 43"),
    ('["videomae"]', "a model config must be a JSON object of settings, got list"),
])
def test_a_malformed_config_json_in_the_init_folder_names_the_file_and_the_key(text, says, tmp_path, overrides, capsys):
    """Issue 22.6: ``Expecting value: line 1 column 43`` alone did not say which file of the folder."""
    from vlmask.cli import main

    folder = videomae_folder(tmp_path / "hf")
    (folder / "config.json").write_text(text)
    assert main(["run", str(RECIPES / "mae.yaml"), *overrides(tmp_path / "run"), f"model.init={folder}"]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("- ")]
    assert line.startswith(f"- command line: model.init={folder}: key model.init: {folder / 'config.json'}: {says}"), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
