"""Interop with Hugging Face VideoMAE, original VideoMAE checkpoints and git: exact features both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from vlmask_plugins.encoders.vit import VideoViT

from vlmask.checkpoint import CheckpointError
from vlmask_plugins.interop import (
    InteropError,
    StateDictMismatchError,
    encoder_to_hf_videomae,
    export_hf_videomae,
    export_timm_state_dict,
    hf_videomae_config,
    import_hf_videomae,
    load_videomae_state_dict,
    save_hf_videomae,
)

transformers = pytest.importorskip("transformers")

RECIPES = Path(__file__).parents[3] / "recipes"
SMALL = {"num_frames": 4, "img_size": 32, "patch": 16, "tubelet": 2, "embed_dim": 64, "depth": 2, "num_heads": 2}


def random_encoder(seed: int = 0, **changes: object) -> VideoViT:
    """A small VideoViT with every weight perturbed, so q, k and v biases are all non-zero."""
    torch.manual_seed(seed)
    encoder = VideoViT(**{**SMALL, **changes}).eval()
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return encoder


def clips(seed: int = 1, frames: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))  # (B, C, T, H, W)


def features(encoder: VideoViT, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(video)


def hf_features(model: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=video.transpose(1, 2)).last_hidden_state  # HF layout (B, T, C, H, W)


def key_bias(encoder: VideoViT, block: int = 0) -> torch.Tensor:
    dim = encoder.embed_dim
    return encoder.blocks[block].attn.qkv.bias[dim : 2 * dim]


def original_videomae_checkpoint(encoder: VideoViT) -> dict[str, torch.Tensor]:
    """The encoder under the key names of VideoMAE's pretraining code (``encoder.`` prefix, split
    q/v biases, no key bias) plus decoder-side keys, as its ``run_mae_pretraining.py`` saves them."""
    dim = encoder.embed_dim
    state: dict[str, torch.Tensor] = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("patch_embed."):
            key = "patch_embed.proj." + key.removeprefix("patch_embed.")
        if key.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.split(dim)
            state["encoder." + key.replace("qkv.bias", "q_bias")] = q_bias.clone()
            state["encoder." + key.replace("qkv.bias", "v_bias")] = v_bias.clone()
            continue
        state["encoder." + key] = value.clone()
    state["encoder_to_decoder.weight"] = torch.randn(32, dim)
    state["mask_token"] = torch.zeros(1, 1, 32)
    state["decoder.norm.weight"] = torch.ones(32)
    return state


# ---------------------------------------------------------------------------- Hugging Face -> vlmask
@pytest.mark.parametrize("use_mean_pooling", [False, True])
def test_hf_videomae_imports_with_the_same_token_features(tmp_path: Path, use_mean_pooling: bool) -> None:
    torch.manual_seed(0)
    config = transformers.VideoMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, num_frames=4,
        image_size=32, patch_size=16, tubelet_size=2, qkv_bias=True, use_mean_pooling=use_mean_pooling,
    )  # layer_norm_eps stays at HF's default 1e-12: the import must keep it
    model = transformers.VideoMAEModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path)

    encoder = import_hf_videomae(tmp_path)

    video = clips()
    torch.testing.assert_close(features(encoder, video), hf_features(model, video), atol=1e-5, rtol=0)
    assert encoder.blocks[0].norm1.eps == 1e-12
    assert isinstance(encoder.norm, torch.nn.Identity) == use_mean_pooling
    assert torch.count_nonzero(key_bias(encoder)) == 0  # VideoMAE has no key bias


# ---------------------------------------------------------------------------- vlmask -> Hugging Face
def test_the_key_bias_does_not_change_attention_outputs() -> None:
    encoder = random_encoder()
    assert key_bias(encoder).abs().min() > 0
    without = random_encoder()
    with torch.no_grad():
        for block in without.blocks:
            block.attn.qkv.bias[encoder.embed_dim : 2 * encoder.embed_dim] = 0
    video = clips()
    torch.testing.assert_close(features(without, video), features(encoder, video), atol=1e-5, rtol=0)


def test_export_loads_in_transformers_with_no_key_problems_and_the_same_features(tmp_path: Path) -> None:
    encoder = random_encoder()
    assert key_bias(encoder).abs().min() > 0  # the export must cope with a non-zero key bias

    save_hf_videomae(encoder, tmp_path, verify=False)  # checked here by hand
    model, loading = transformers.VideoMAEModel.from_pretrained(tmp_path, output_loading_info=True)

    assert {k: list(v) for k, v in loading.items()} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []
    }
    video = clips()
    torch.testing.assert_close(hf_features(model.eval(), video), features(encoder, video), atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["use_mean_pooling"] is False
    assert (config["num_frames"], config["image_size"], config["patch_size"], config["tubelet_size"]) == (4, 32, 16, 2)
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 2)
    assert config["intermediate_size"] == 256
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "VideoMAEImageProcessor"
    assert processor["crop_size"] == {"height": 32, "width": 32}


def test_export_verifies_itself_and_writes_a_timm_style_state_dict(tmp_path: Path) -> None:
    encoder = random_encoder(seed=3)
    save_hf_videomae(encoder, tmp_path)  # verify=True: loads back and compares
    info = json.loads((tmp_path / "vlmask_export.json").read_text())
    assert info["verified"]["max_abs_difference"] < 1e-5

    timm_state = export_timm_state_dict(encoder)
    assert {"patch_embed.proj.weight", "pos_embed", "blocks.1.attn.qkv.bias", "norm.weight"} <= set(timm_state)
    with safe_open(str(tmp_path / "encoder.safetensors"), "pt") as fh:
        assert set(fh.keys()) == set(timm_state)
        assert fh.metadata()["pos_embed"] == "sincos" and fh.metadata()["num_frames"] == "4"
    reloaded = random_encoder(seed=9)
    report = load_videomae_state_dict(reloaded, tmp_path / "encoder.safetensors")
    assert report.ok
    torch.testing.assert_close(reloaded.state_dict(), encoder.state_dict())  # key bias kept by the timm layout


def test_encoder_to_hf_uses_the_installed_transformers_names() -> None:
    config, state = encoder_to_hf_videomae(random_encoder())
    model = transformers.VideoMAEModel(config)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)


def test_learned_positions_are_refused_with_the_reason() -> None:
    with pytest.raises(InteropError, match="learned position embeddings"):
        hf_videomae_config(VideoViT(**SMALL, pos_embed="learned"))


# ---------------------------------------------------------------------------- original VideoMAE checkpoints
def test_original_videomae_pth_round_trip(tmp_path: Path) -> None:
    source = random_encoder(seed=4)
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": original_videomae_checkpoint(source), "epoch": 799}, path)

    target = random_encoder(seed=5)
    report = load_videomae_state_dict(target, path)

    video = clips()
    torch.testing.assert_close(features(target, video), features(source, video), atol=1e-5, rtol=0)
    assert report.ok and set(report.ignored) == {"encoder_to_decoder.weight", "mask_token", "decoder.norm.weight"}
    assert any("zero key bias" in note for note in report.notes)
    assert "[model]" in report.source


def test_ddp_wrapped_finetuning_layout_loads(tmp_path: Path) -> None:
    source = random_encoder(seed=6)
    state = {f"module.{k.removeprefix('encoder.')}": v for k, v in original_videomae_checkpoint(source).items()
             if k.startswith("encoder.")}
    path = tmp_path / "finetuned.pth"
    torch.save({"module": state}, path)
    target = random_encoder(seed=7)
    assert load_videomae_state_dict(target, path).ok
    torch.testing.assert_close(features(target, clips()), features(source, clips()), atol=1e-5, rtol=0)


def test_a_partial_or_mismatched_checkpoint_is_refused_listing_every_key() -> None:
    state = original_videomae_checkpoint(random_encoder(seed=8))
    del state["encoder.blocks.1.mlp.fc2.weight"]
    state["encoder.blocks.0.mlp.fc1.bias"] = torch.zeros(7)
    state["encoder.head.weight"] = torch.zeros(10, 64)
    target = random_encoder(seed=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(StateDictMismatchError) as caught:
        load_videomae_state_dict(target, state)

    message = str(caught.value)
    assert "missing: blocks.1.mlp.fc2.weight" in message
    assert "unexpected: encoder.head.weight" in message
    assert "shape blocks.0.mlp.fc1.bias: checkpoint (7,) vs encoder (256,)" in message
    assert isinstance(caught.value, CheckpointError)
    torch.testing.assert_close(target.state_dict(), before)  # nothing loaded

    report = load_videomae_state_dict(target, state, strict=False)  # explicit: load what matches, get the report
    assert not report.ok and report.missing == ["blocks.1.mlp.fc2.weight"]
    assert torch.equal(target.blocks[0].attn.qkv.weight, state["encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(target.blocks[1].mlp.fc2.weight, before["blocks.1.mlp.fc2.weight"])


def test_learned_positions_are_interpolated_over_time_space() -> None:
    source = VideoViT(**{**SMALL, "patch": 8}, pos_embed="learned")  # grid 2 x 4 x 4
    spatial = torch.randn(1, 1, 16, 64)
    with torch.no_grad():
        source.pos_embed.copy_(spatial.expand(1, 2, 16, 64).reshape(1, 32, 64))  # constant over t
    target = VideoViT(**{**SMALL, "patch": 8, "num_frames": 8}, pos_embed="learned")  # grid 4 x 4 x 4

    report = load_videomae_state_dict(target, export_timm_state_dict(source))

    assert any("interpolated trilinearly from 2x4x4 to 4x4x4" in note for note in report.notes)
    torch.testing.assert_close(target.pos_embed.detach(), spatial.expand(1, 4, 16, 64).reshape(1, 64, 64))


def test_sincos_tables_are_recomputed_and_learned_ones_not_dropped_silently() -> None:
    small = export_timm_state_dict(random_encoder())
    longer = VideoViT(**{**SMALL, "num_frames": 8})
    report = load_videomae_state_dict(longer, small)  # the same weights fit any grid; the sin-cos table is recomputed
    assert report.ok and "pos_embed" in report.ignored

    learned = export_timm_state_dict(VideoViT(**SMALL, pos_embed="learned"))
    with pytest.raises(StateDictMismatchError, match="pos_embed='learned'"):
        load_videomae_state_dict(VideoViT(**SMALL), learned)


# ---------------------------------------------------------------------------- a real run directory
def test_export_of_a_trained_run_directory(tmp_path: Path) -> None:
    from vlmask_plugins.data.synthetic import generate

    from vlmask.config import load_recipe
    from vlmask.engine import Trainer
    from vlmask.runs import open_run

    train, _ = generate(tmp_path / "data", clips=8, seed=1, frames=8, size=32, progress=False)
    run_dir = tmp_path / "run"
    overrides = [
        f"data.train={train}", f"run.dir={run_dir}", "train.max_steps=2", "train.batch_size=4", "train.log_every=1",
        "train.ckpt_every=2", "data.num_workers=0", "data.dataset.num_frames=4", "data.dataset.size=32",
        "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2", "model.predictor.dim=32",
        "model.predictor.depth=1", "model.predictor.num_heads=2", "optim.warmup_steps=1", "device=cpu",
    ]
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        trainer.train()

    out = export_hf_videomae(run_dir, tmp_path / "hf")

    assert {"config.json", "model.safetensors", "preprocessor_config.json", "encoder.safetensors",
            "vlmask_export.json"} <= {p.name for p in out.iterdir()}
    model, loading = transformers.VideoMAEModel.from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    assert processor["size"] == {"shortest_edge": 32}
    info = json.loads((out / "vlmask_export.json").read_text())
    assert info["checkpoint"].endswith("step_00000002") and info["verified"]["max_abs_difference"] < 1e-5

    encoder = open_run(run_dir, ["device=cpu"]).encoder
    video = clips(frames=4, size=32)
    torch.testing.assert_close(hf_features(model.eval(), video), features(encoder, video), atol=1e-5, rtol=0)


def test_export_of_a_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_hf_videomae(tmp_path, tmp_path / "out")
