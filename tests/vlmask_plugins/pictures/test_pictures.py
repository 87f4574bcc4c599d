"""The built-in picture kinds of ``vlmask show`` (masks, reconstruction, attention) on a real
tiny VideoMAE run trained here, on real synthetic clips with known action boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from vlmask import hookimpl
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.pictures import DARKEN, upsample
from vlmask.plugins import Plugins, load_plugins
from vlmask.show import ShowError, shown_clips
from vlmask.types import Mask
from vlmask_plugins.heads.pooling import visible_tokens_inside_box
from vlmask_plugins.maskers.tube import TubeMasker
from vlmask_plugins.pictures.attention import attention, attention_blocks, attention_received
from vlmask_plugins.pictures.masks import masks
from vlmask_plugins.pictures.reconstruction import reconstructed_tokens, reconstruction, tokens_to_frames
from vlmask_plugins.targets.pixels import pixel_targets

RECIPES = Path(__file__).parents[3] / "recipes"
STEPS = 3


class RecordingTube:
    """Tube masking that keeps every mask it draws (what the run really used, step by step)."""

    drawn: list[Mask] = []

    def __init__(self, ratio: float = 0.75) -> None:
        self.tube = TubeMasker(ratio)

    def __call__(self, batch, grid, generator=None) -> Mask:
        mask = self.tube(batch, grid, generator)
        RecordingTube.drawn.append(Mask(mask.visible.clone(), mask.predict.clone()))
        return mask


class Recorder:
    @hookimpl
    def vlmask_register_plugins(self, register) -> None:
        register("masker", "recording_tube", RecordingTube)


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return load_plugins(extra=[("recorder", Recorder())])


@pytest.fixture(scope="module")
def mae_run(tiny_synth, tiny_scale, plugins, tmp_path_factory) -> Iterator[Path]:
    """A tiny VideoMAE run whose masker records its masks (ratio 0.75: 4 of 16 positions seen)."""
    train, val = tiny_synth
    run_dir = tmp_path_factory.mktemp("runs") / "mae"
    overrides = [*tiny_scale, f"data.train={train}", f"data.val={val}", f"train.max_steps={STEPS}",
                 "masker.name=recording_tube", "masker.ratio=0.75", f"run.dir={run_dir}"]
    RecordingTube.drawn.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Trainer(load_recipe(RECIPES / "mae.yaml", overrides), plugins) as trainer:
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    yield run_dir


def shown(run_dir: Path, plugins: Plugins, clips: tuple[int, ...] = (0, 1, 2), layer: int | None = None):
    return shown_clips(run_dir, "mae", clips, None, None, layer, (), plugins, [])


# --------------------------------------------------------------------------- masks


def test_the_mask_shown_is_the_one_the_first_step_used(mae_run: Path, plugins: Plugins) -> None:
    assert len(RecordingTube.drawn) == STEPS  # one mask per step, none drawn elsewhere
    first = RecordingTube.drawn[0]
    clips = shown(mae_run, plugins)
    mask = clips.training_mask()
    assert torch.equal(mask.visible.cpu(), first.visible[:3]) and torch.equal(mask.predict.cpu(), first.predict[:3])
    assert not torch.equal(first.visible, RecordingTube.drawn[1].visible)  # a later step's would differ


def test_the_darkened_area_is_the_hidden_tokens(mae_run: Path, plugins: Plugins) -> None:
    clips = shown(mae_run, plugins)
    pictures = masks(clips)
    mask, grid = clips.training_mask(), clips.grid
    for row, (panel,) in enumerate(pictures):
        hidden = np.ones(grid.num_tokens, bool)
        hidden[mask.visible[row].cpu().numpy()] = False
        hidden_pixels = upsample(hidden.reshape(grid.t, grid.h, grid.w).repeat(grid.tubelet, axis=0), grid)
        original = clips.frames[row]
        changed = (panel.images != original).any(axis=-1)
        lit = (original > 1).any(axis=-1)  # a pixel at 0 or 1 stays 0 when darkened
        assert np.array_equal(changed[lit], hidden_pixels[lit])
        assert hidden_pixels.mean() == pytest.approx(0.75)
        np.testing.assert_array_equal(panel.images[hidden_pixels], np.rint(original[hidden_pixels] * DARKEN))
        np.testing.assert_array_equal(panel.images[~hidden_pixels], original[~hidden_pixels])


def test_the_box_and_the_pooled_tokens_are_drawn(mae_run: Path, plugins: Plugins) -> None:
    clips = shown(mae_run, plugins)
    pictures = masks(clips)
    mask, grid = clips.training_mask(), clips.grid
    boxes = clips.batch.action_box
    assert boxes is not None  # the synthetic manifests carry the true box of each clip
    for row, (panel,) in enumerate(pictures):
        assert panel.boxes == (tuple(boxes[row].tolist()),) * clips.frames.shape[1]
        inside = visible_tokens_inside_box(mask.visible[row : row + 1], grid, boxes[row : row + 1])[0]
        pooled = mask.visible[row][inside].cpu().numpy()
        outlined = np.flatnonzero(panel.outlines[:: grid.tubelet].reshape(-1))
        assert sorted(outlined.tolist()) == sorted(pooled.tolist())


# --------------------------------------------------------------------------- reconstruction


def test_unnormalising_the_true_targets_gives_back_the_clip(mae_run: Path, plugins: Plugins) -> None:
    clips = shown(mae_run, plugins)
    run, grid = clips.run, clips.grid
    (_, target), = [(k, v) for k, v in run.student.objectives.items() if k == "pixels"]
    mask = clips.training_mask()
    video = clips.batch.video
    mean, std = target.statistics(video)
    raw = pixel_targets(video, grid, mean, std, normalize=False)
    truth = pixel_targets(video, grid, mean, std, normalize=True, eps=target.eps)  # what the loss compares with
    predicted = torch.gather(truth, 1, mask.predict.long().unsqueeze(-1).expand(-1, -1, truth.shape[-1]))
    tokens = reconstructed_tokens(raw, predicted, mask.predict, target, channels=3)
    torch.testing.assert_close(tokens, raw, atol=1e-5, rtol=0)
    for row in range(clips.batch.size):
        frames = tokens_to_frames(tokens[row], grid, 3).astype(int)
        assert np.abs(frames - clips.frames[row]).max() <= 1  # uint8 -> normalised -> back: rounding only


def test_reconstruction_shows_the_clip_the_input_and_the_prediction(mae_run: Path, plugins: Plugins) -> None:
    clips = shown(mae_run, plugins)
    pictures = reconstruction(clips)
    grid = clips.grid
    visible = np.zeros(grid.num_tokens, bool)
    for row, (original, masked, predicted) in enumerate(pictures):
        assert [original.title, predicted.title] == ["original", "prediction"]
        assert np.array_equal(original.images, clips.frames[row])
        visible[:] = False
        visible[clips.training_mask().visible[row].cpu().numpy()] = True
        seen = upsample(visible.reshape(grid.t, grid.h, grid.w).repeat(grid.tubelet, axis=0), grid)
        difference = np.abs(predicted.images.astype(int) - clips.frames[row])
        assert difference[seen].max() <= 1  # the visible tokens are the clip's own
        assert difference[~seen].max() > 1  # a 3-step model does not reproduce what it did not see


# --------------------------------------------------------------------------- attention (FILS Figure 3)


def test_attention_maps_are_distributions_per_frame(mae_run: Path, plugins: Plugins) -> None:
    clips = shown(mae_run, plugins)
    received = attention_received(clips.run.encoder, clips.batch.video, -1)
    assert torch.allclose(received.sum(dim=1), torch.ones(3, dtype=received.dtype), atol=1e-5)
    for (panel,) in attention(clips):
        assert panel.labels == ("frame 0", "frame 2", "frame 3")  # first, middle, last of 4
        np.testing.assert_allclose(panel.values.sum(axis=(1, 2)), 1.0, atol=1e-6)
        assert (panel.values >= 0).all()


def attend_to_one_token(encoder: torch.nn.Module, target: int, sharpness: float = 200.0) -> None:
    """Set the encoder's weights so that every query of its last block attends to token
    ``target``: the patch embedding is zeroed (a token is its position alone), every query is
    the same constant and every key measures its token's similarity to ``target``'s input
    (LayerNorm gives every input one norm, so the similarity peaks at ``target``)."""
    with torch.no_grad():
        encoder.patch_embed.weight.zero_()
        encoder.patch_embed.bias.zero_()
        block = encoder.blocks[-1]
        block.norm1.weight.fill_(1.0)
        block.norm1.bias.zero_()
        inputs = block.norm1(encoder.pos_embed[0])  # (N, D): the last block's inputs when it is the only block
        dim = inputs.shape[1]
        weight, bias = block.attn.qkv.weight, block.attn.qkv.bias
        weight[:dim].zero_()
        bias[:dim].fill_(1.0)  # q: ones
        weight[dim : 2 * dim] = sharpness * inputs[target] / dim  # k_i . q = sharpness * x_target . x_i / heads
        bias[dim : 2 * dim].zero_()


def test_an_encoder_made_to_attend_to_one_token_peaks_there(mae_run: Path, plugins: Plugins) -> None:
    clips = shown(mae_run, plugins, clips=(0,))
    grid = clips.grid
    assert len(attention_blocks(clips.run.encoder)) == 1  # tiny scale: the last block sees the embeddings
    target = grid.num_tokens - 6  # last temporal slot, row 2, column 2 of 4 x 4
    attend_to_one_token(clips.run.encoder, target)
    received = attention_received(clips.run.encoder, clips.batch.video, -1)[0]
    assert int(received.argmax()) == target and float(received[target]) > 0.9
    (panel,) = attention(clips)[0]
    last = panel.values[-1]  # the last frame belongs to the last temporal slot
    assert np.unravel_index(last.argmax(), last.shape) == (2, 2) and last.max() > 0.9


def test_layer_out_of_range_names_the_blocks(mae_run: Path, plugins: Plugins) -> None:
    with pytest.raises(ShowError, match=r"--layer 2 is out of range: the encoder 'video_vit' of mae has 1 blocks"):
        attention(shown(mae_run, plugins, clips=(0,), layer=2))
