"""Continuing from a released VideoMAE pretraining checkpoint: a randomly initialised
``transformers.VideoMAEForPreTraining`` imported into the MAE recipe's encoder and predictor
gives transformers' own pretraining loss on the same clip and mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmask.types import Batch, Mask, StepOutputs
from vlmask_plugins.encoders.predictor import TransformerPredictor
from vlmask_plugins.encoders.videomae_init import VideoMAEInitError, load_videomae_pretraining
from vlmask_plugins.encoders.vit import VideoViT
from vlmask_plugins.targets.pixels import NormalizedPixelsTarget

transformers = pytest.importorskip("transformers")


def hf_model(**overrides: object) -> torch.nn.Module:
    """A small VideoMAEForPreTraining with every parameter random (biases and mask token too)."""
    torch.manual_seed(0)
    settings = dict(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4, decoder_intermediate_size=128, norm_pix_loss=True, use_mean_pooling=False,
    )  # fmt: skip
    settings.update(overrides)
    model = transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def vlmask_parts(predictor_dim: int = 32) -> tuple[VideoViT, TransformerPredictor]:
    torch.manual_seed(1)
    encoder = VideoViT(num_frames=4, img_size=32, tubelet=2, patch=8, embed_dim=32, depth=1, num_heads=4).eval()
    predictor = TransformerPredictor(32, encoder.grid, dim=predictor_dim, depth=1, num_heads=4, output="pixels").eval()
    return encoder, predictor


def clip_and_mask() -> tuple[torch.Tensor, torch.Tensor, Mask]:
    generator = torch.Generator().manual_seed(2)
    video = torch.randn(2, 3, 4, 32, 32, generator=generator)
    masked = torch.stack([torch.randperm(32, generator=generator)[:24] for _ in range(2)])
    bool_masked_pos = torch.zeros(2, 32, dtype=torch.bool)
    bool_masked_pos[torch.arange(2)[:, None], masked] = True
    mask = Mask(
        visible=torch.stack([torch.nonzero(~row).flatten() for row in bool_masked_pos]),
        predict=torch.stack([torch.nonzero(row).flatten() for row in bool_masked_pos]),
    )
    return video, bool_masked_pos, mask


def vlmask_loss(encoder: VideoViT, predictor: TransformerPredictor, video: torch.Tensor, mask: Mask) -> float:
    with torch.no_grad():
        features = encoder(video, mask.visible)
        out = StepOutputs(batch=Batch(video=video), grid=encoder.grid, mask=mask, visible_features=features,
                          predictions=predictor(features, mask))  # fmt: skip
        return NormalizedPixelsTarget()(out).item()


def hf_loss(model: torch.nn.Module, video: torch.Tensor, bool_masked_pos: torch.Tensor) -> float:
    with torch.no_grad():  # transformers takes (B, T, C, H, W)
        return model(pixel_values=video.transpose(1, 2), bool_masked_pos=bool_masked_pos).loss.item()


def test_hf_folder_gives_transformers_pretraining_loss(tmp_path: Path) -> None:
    model = hf_model(layer_norm_eps=1e-6)
    model.save_pretrained(tmp_path / "hf")
    encoder, predictor = vlmask_parts()
    report = load_videomae_pretraining(encoder, predictor, tmp_path / "hf")
    assert report.ok and len(report.encoder.loaded) == 16 and len(report.decoder.loaded) == 18
    assert any("decoder's final LayerNorm uses eps 1e-5" in note for note in report.encoder.notes)
    video, bool_masked_pos, mask = clip_and_mask()
    ours, theirs = vlmask_loss(encoder, predictor, video, mask), hf_loss(model, video, bool_masked_pos)
    assert abs(ours - theirs) < 1e-5  # transformers as shipped (its decoder norm: eps 1e-5)
    model.decoder.norm.eps = 1e-6  # the original VideoMAE decoder's eps, which vlmask's predictor uses
    assert abs(ours - hf_loss(model, video, bool_masked_pos)) < 1e-6


def test_hf_default_layer_norm_eps_is_reported_and_close() -> None:
    """transformers' VideoMAEConfig defaults layer_norm_eps to 1e-12 (vlmask and the original
    code: 1e-6): the weights load, the note says so, and the losses still agree to 1e-5."""
    model = hf_model()
    encoder, predictor = vlmask_parts()
    report = load_videomae_pretraining(encoder, predictor, model.state_dict())
    assert report.ok
    video, bool_masked_pos, mask = clip_and_mask()
    assert abs(vlmask_loss(encoder, predictor, video, mask) - hf_loss(model, video, bool_masked_pos)) < 1e-5


def original_checkpoint(encoder: VideoViT, predictor: TransformerPredictor) -> dict[str, torch.Tensor]:
    """The original VideoMAE pretraining layout (run_mae_pretraining.py) of the same weights:
    encoder.patch_embed.proj, split q_bias / v_bias (no key bias), decoder.blocks / norm / head."""
    state: dict[str, torch.Tensor] = {}
    for side, prefix, module in (("encoder", "encoder.", encoder), ("decoder", "decoder.", predictor)):
        for key, value in module.state_dict().items():
            if side == "decoder" and key in ("embed.weight", "mask_token"):
                continue
            if key.endswith("attn.qkv.bias"):
                q, _, v = value.chunk(3)
                state[prefix + key.replace("qkv.bias", "q_bias")] = q.clone()
                state[prefix + key.replace("qkv.bias", "v_bias")] = v.clone()
            elif key.startswith("patch_embed."):
                state[prefix + "patch_embed.proj." + key.removeprefix("patch_embed.")] = value.clone()
            else:
                state[prefix + key] = value.clone()
    state["encoder_to_decoder.weight"] = predictor.embed.weight.detach().clone()
    state["mask_token"] = predictor.mask_token.detach().clone()
    return state


def test_original_checkpoint_in_a_model_dict(tmp_path: Path) -> None:
    model = hf_model(layer_norm_eps=1e-6)
    encoder, predictor = vlmask_parts()
    load_videomae_pretraining(encoder, predictor, model.state_dict())
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": original_checkpoint(encoder, predictor), "epoch": 799}, path)
    fresh_encoder, fresh_predictor = vlmask_parts()
    report = load_videomae_pretraining(fresh_encoder, fresh_predictor, path)
    assert report.ok and report.format == "VideoMAE pretraining checkpoint"
    for ours, loaded in ((encoder, fresh_encoder), (predictor, fresh_predictor)):
        for key, value in ours.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
    video, bool_masked_pos, mask = clip_and_mask()
    assert abs(vlmask_loss(fresh_encoder, fresh_predictor, video, mask) - hf_loss(model, video, bool_masked_pos)) < 1e-5


def test_size_mismatch_names_the_first_key_and_loads_nothing() -> None:
    encoder, predictor = vlmask_parts(predictor_dim=64)
    before = {k: v.clone() for k, v in predictor.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    first_key = r"predictor key embed.weight: checkpoint \(32, 32\) vs recipe \(64, 32\)"
    with pytest.raises(VideoMAEInitError, match=first_key):
        load_videomae_pretraining(encoder, predictor, hf_model().state_dict())
    assert all(torch.equal(v, predictor.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in encoder_before.items())  # encoder untouched too


def test_missing_and_unexpected_keys_are_errors() -> None:
    state = hf_model().state_dict()
    encoder, predictor = vlmask_parts()
    with pytest.raises(VideoMAEInitError, match="predictor key head.bias is not in the checkpoint"):
        load_videomae_pretraining(encoder, predictor, {k: v for k, v in state.items() if k != "decoder.head.bias"})
    with pytest.raises(VideoMAEInitError, match="checkpoint key decoder.extra.weight has no place in the predictor"):
        load_videomae_pretraining(encoder, predictor, {**state, "decoder.extra.weight": torch.zeros(2)})
    with pytest.raises(VideoMAEInitError, match="not a VideoMAE pretraining checkpoint"):
        load_videomae_pretraining(encoder, predictor, {"blocks.0.norm1.weight": torch.zeros(32)})
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_videomae_pretraining(encoder, predictor, "/nonexistent/videomae.pth")
