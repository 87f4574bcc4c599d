"""Colour augmentation of training clips (vlmask_plugins.data.augment): DPC's frame-wise colour
jitter (thesis sec. 2.3.3), CoCLR's clip-wise jitter and Gaussian blur (sec. 4.4.2), on real
H.264 clips through the dataset, drawn from the loader's per-sample seed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from vlmask.data_loading import SeededItems
from vlmask_plugins.data.augment import ClipColorAugment
from vlmask_plugins.data.dataset import VideoManifestDataset

RECIPES = Path(__file__).parents[3] / "recipes"
BRIGHTNESS = {"brightness": 0.5}


def dataset(manifest: Path, **kwargs) -> SeededItems:
    """The dataset wrapped as the loader wraps it: item (index, seed) under that seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SeededItems(VideoManifestDataset(str(manifest), num_frames=4, size=32, hflip=False, **kwargs))


def brightness_factors(jittered: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """(C, T, H, W) clips -> per frame, the median of jittered / plain over pixels neither dark
    nor clipped: the brightness factor each frame got."""
    factors = []
    for j, p in zip(jittered.unbind(1), plain.unbind(1)):
        j, p = j.float(), p.float()
        keep = (p > 30) & (j < 250) & (j > 5)
        factors.append((j[keep] / p[keep]).median())
    return torch.stack(factors)


def high_frequency(video: torch.Tensor) -> float:
    """Mean absolute difference between horizontally and vertically adjacent pixels."""
    video = video.float()
    return float((video[..., 1:, :] - video[..., :-1, :]).abs().mean() + (video[..., 1:] - video[..., :-1]).abs().mean())


def test_frame_wise_jitter_gives_each_frame_its_own_factor(synth):
    """DPC: "random augmentation for each individual frame" (sec. 2.3.3); clip-wise (CoCLR,
    sec. 4.4.2) one factor for the whole clip. The crop is drawn before the colour, so the same
    seed gives the same crop with and without jitter."""
    plain = dataset(synth[0])
    per_frame = dataset(synth[0], color_jitter={**BRIGHTNESS, "per_frame": True})
    per_clip = dataset(synth[0], color_jitter=BRIGHTNESS)
    spreads = {"frame": [], "clip": []}
    for seed in range(4):
        reference = plain[(0, seed)]["video"]
        for name, data in (("frame", per_frame), ("clip", per_clip)):
            factors = brightness_factors(data[(0, seed)]["video"], reference)
            spreads[name].append(float(factors.max() - factors.min()))
    assert min(spreads["frame"]) > 0.05, spreads  # factors drawn from [0.5, 1.5] per frame
    assert max(spreads["clip"]) < 0.02, spreads  # one factor (up to rounding of uint8 pixels)


def test_same_seed_same_clip_and_the_flow_is_of_the_frames_before_the_jitter(synth):
    """Deterministic and resumable: the draws come from the per-sample seed; flow images are
    computed from the frames before the colour augmentation (the same as without it)."""
    settings = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "per_frame": True}
    jittered = dataset(synth[0], color_jitter=settings, blur={"p": 0.5}, flow=True)
    plain = dataset(synth[0], flow=True)
    first, again, other = jittered[(1, 7)], jittered[(1, 7)], jittered[(1, 8)]
    assert torch.equal(first["video"], again["video"]) and not torch.equal(first["video"], other["video"])
    reference = plain[(1, 7)]
    assert not torch.equal(first["video"], reference["video"]) and first["video"].dtype == torch.uint8
    assert torch.equal(first["flow"], reference["flow"])


def test_off_by_default_the_frames_and_draws_are_byte_identical(synth):
    """No setting, or settings that change nothing, draw nothing: every item is, to the last byte,
    the decode-crop-flip pipeline alone, the second clip (drawn after the first) included."""
    from vlmask_plugins.data.decode import decode_clip

    default = dataset(synth[0], second_clip=True)
    neutral = dataset(synth[0], second_clip=True, color_jitter={"p": 1.0, "per_frame": True}, blur={"p": 0.0})
    jittered = dataset(synth[0], second_clip=True, color_jitter={"grayscale": 0.5})
    data = default.dataset
    clip = data.clips[2]
    for seed in range(3):
        torch.manual_seed(seed)
        expected = []
        for _ in range(2):  # the first clip, then the second: decode (temporal draw), crop and flip
            frames, _ = decode_clip(clip.video, data.sampler, train=True, short_side=data.decode_short_side, start=clip.start,
                                    end=clip.end, decoder=data.requested_decoder, info=data._infos[2])
            video, _ = data.transform(torch.from_numpy(frames).permute(0, 3, 1, 2), None)
            expected.append(video.permute(1, 0, 2, 3))
        for item in (default[(2, seed)], neutral[(2, seed)]):
            assert torch.equal(item["video"], expected[0]) and torch.equal(item["second_video"], expected[1])
    assert any(not torch.equal(default[(2, s)]["second_video"], jittered[(2, s)]["second_video"]) for s in range(3))
    assert not ClipColorAugment(None, None).active and not ClipColorAugment({"p": 1.0}, {"p": 0.0}).active


def test_the_second_clip_draws_its_own_colour(synth):
    """CoCLR's key view gets its own augmentation: with clip-wise greyscale at p = 0.5 the two
    clips of an item are grey or not independently."""
    data = dataset(synth[0], second_clip=True, color_jitter={"grayscale": 0.5})

    def grey(video: torch.Tensor) -> bool:
        return bool((video[0] == video[1]).all() and (video[1] == video[2]).all())

    pairs = {(grey(item["video"]), grey(item["second_video"])) for item in (data[(0, seed)] for seed in range(12))}
    assert (True, False) in pairs and (False, True) in pairs, pairs


def test_blur_lowers_the_high_frequencies(synth):
    """CoCLR's Gaussian blur (sigma in [0.1, 2.0] px, p = 0.5 in the recipes; here p = 1 and a
    fixed sigma): neighbouring pixels differ much less; a sigma of 0.1 px changes almost nothing."""
    plain = dataset(synth[0])
    strong = dataset(synth[0], blur={"p": 1.0, "sigma": [2.0, 2.0]})
    faint = dataset(synth[0], blur={"p": 1.0, "sigma": [0.1, 0.1]})
    for seed in range(3):
        reference = high_frequency(plain[(3, seed)]["video"])
        assert high_frequency(strong[(3, seed)]["video"]) < 0.6 * reference
        assert high_frequency(faint[(3, seed)]["video"]) == pytest.approx(reference, rel=0.02)


def test_evaluation_and_finetuning_datasets_never_augment_colour(synth):
    """Training-only settings: evaluation reads with train=False; finetuning (train=True) gets
    them turned off like the flow and second clip (vlmask.kinds.TRAINING_AUGMENTATIONS)."""
    from vlmask.evaluate import without_training_views

    settings = {"color_jitter": {**BRIGHTNESS, "per_frame": True}, "blur": {"p": 1.0}}
    evaluation = dataset(synth[0], train=False, **settings)
    assert torch.equal(evaluation[(0, 1)]["video"], dataset(synth[0], train=False)[(0, 1)]["video"])
    off = without_training_views(VideoManifestDataset)
    assert off["color_jitter"] is None and off["blur"] is None and off["flow"] is False
    finetuning = VideoManifestDataset(str(synth[0]), num_frames=4, size=32, hflip=False, **{**settings, **off})
    assert not finetuning.color_augment.active


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("color_jitter", {"hue": 0.7}, r"color_jitter\.hue: should be less than or equal to 0\.5, got 0\.7"),
    ("color_jitter", {"brightness": -0.1}, r"color_jitter\.brightness: should be greater than or equal to 0"),
    ("color_jitter", {"p": 1.5}, r"color_jitter\.p: should be less than or equal to 1"),
    ("color_jitter", {"per_frame": "yes"}, r"color_jitter\.per_frame: should be a valid boolean"),
    ("color_jitter", {"britghness": 0.4}, r"color_jitter\.britghness: unknown key; known: brightness, contrast"),
    ("color_jitter", 0.4, r"color_jitter must be a mapping"),
    ("blur", {"sigma": [2.0, 0.1]}, r"blur\.sigma: should be \[low, high\] with low <= high"),
    ("blur", {"sigma": [0.0, 1.0]}, r"blur\.sigma\.?: should be greater than 0"),
    ("blur", {"kernel_size": 4}, r"blur\.kernel_size: should be odd, got 4"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(synth, setting, value, message):
    with pytest.raises(ValueError, match=message):
        VideoManifestDataset(str(synth[0]), num_frames=4, size=32, hflip=False, probe=False, **{setting: value})


def test_validate_names_the_recipe_key(tmp_path):
    """``vlmask validate``: a wrong type or range is reported at data.dataset.color_jitter before
    anything is built; the shipped family recipes validate."""
    from vlmask.config import load_recipe
    from vlmask.plugins import default_plugins
    from vlmask.schema import validate

    registry = default_plugins().registry
    problems = validate(load_recipe(RECIPES / "dpc.yaml", ["data.dataset.color_jitter.hue=0.7"]), registry)
    assert any("key data.dataset.color_jitter: " in p and "0.5" in p for p in problems), problems
    problems = validate(load_recipe(RECIPES / "coclr" / "infonce.yaml", ["data.dataset.blur.sigma=[0.1]"]), registry)
    assert any("key data.dataset.blur: " in p for p in problems), problems
    for recipe in ("dpc.yaml", "memdpc.yaml", "dpc_faithful.yaml", "coclr/infonce.yaml", "coclr/coclr.yaml"):
        assert validate(load_recipe(RECIPES / recipe), registry) == [], recipe
