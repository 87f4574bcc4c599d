"""The ``video_manifest`` dataset: items, batches, skipped lines, and exact box augmentation."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch

from vlmask.registry import Registry
from vlmask.types import Batch
from vlmask_plugins.data import register_plugins
from vlmask_plugins.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropWindow,
    EmptyManifestError,
    VideoManifestDataset,
    collate,
    crop_box,
    flip_box,
    random_resized_crop,
)


def quiet(*args, **kwargs) -> VideoManifestDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VideoManifestDataset(*args, **kwargs)


def unnormalise(video: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] of an item's uint8 video."""
    assert video.dtype == torch.uint8, "items leave the dataset as uint8"
    return video.float() / 255.0


def test_registered_as_video_manifest():
    registry = Registry()
    register_plugins(registry.registrar("test"))
    assert registry.get("dataset", "video_manifest").factory is VideoManifestDataset


def test_items_and_batches(synth, read_rows):
    torch.manual_seed(0)
    train, val = synth
    data = quiet(str(train), num_frames=8, size=32, hflip=False)
    assert len(data) == 6 and data.skipped == [] and data.skip_counts == {"manifest": 0, "probe": 0, "load": 0}
    assert data.classes == sorted({r["label"] for r in read_rows(train)})
    assert data.captions == [r["caption"] for r in read_rows(train)]
    item = data[2]
    assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.uint8
    assert item["index"] == 2 and item["caption"] == data.captions[2]
    assert data.classes[item["label"]] == read_rows(train)[2]["label"]
    assert item["action_box"].shape == (4,) and not torch.isnan(item["action_box"]).any()
    pixels = unnormalise(item["video"])
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0 + 1e-5 and float(pixels.std()) > 0.05
    batch = collate([data[i] for i in range(3)])
    assert isinstance(batch, Batch) and batch.video.shape == (3, 3, 8, 32, 32) and batch.video.dtype == torch.uint8
    # Normalised where the batch is moved to (ImageNet mean/std, float32), and only there.
    moved = batch.to("cpu")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    assert moved.video.dtype == torch.float32
    torch.testing.assert_close(moved.video, (batch.video.float() / 255 - mean) / std, rtol=0, atol=1e-5)
    assert torch.equal(moved.to("cpu").video, moved.video), "a float video is not normalised twice"
    assert batch.index.tolist() == [0, 1, 2] and batch.label.shape == (3,) and batch.action_box.shape == (3, 4)
    assert batch.caption == data.captions[:3] and batch.text_embedding is None and batch.extra == {}

    evaluation = quiet(str(val), num_frames=4, size=48, train=False, classes=data.classes)
    assert evaluation.classes == data.classes
    first = evaluation[0]
    assert first["video"].shape == (3, 4, 48, 48)
    assert torch.equal(first["video"], evaluation[0]["video"]), "evaluation is deterministic"


def test_collate_without_boxes_or_labels(tmp_path, synth, read_rows):
    video = synth[0].parent / read_rows(synth[0])[0]["video"]
    manifest = tmp_path / "plain.jsonl"
    manifest.write_text(json.dumps({"video": str(video)}) + "\n")
    data = quiet(str(manifest), num_frames=4, size=32)
    item = data[0]
    assert item["label"] == -1 and item["caption"] == "" and torch.isnan(item["action_box"]).all()
    batch = collate([item, data[0]])
    assert batch.action_box is None and batch.label is None and batch.caption == ["", ""]


def test_exactly_the_four_bad_lines_are_skipped(mixed_manifest):
    data = quiet(str(mixed_manifest), num_frames=4, size=32)
    assert [c.line for c in data.clips] == [1, 3, 6, 8]
    skipped = {s.line: s for s in data.skipped}
    assert sorted(skipped) == [2, 4, 5, 7]
    assert skipped[2].video.endswith("truncated.mp4") and skipped[5].video.endswith("notes.mp4")
    assert "file not found" in skipped[4].reason and "invalid JSON" in skipped[7].reason
    assert data.skip_counts == {"manifest": 2, "probe": 2, "load": 0}
    assert data.clips[0].label == "grow square" and data.clips[1].extra == {"colour": "red"}
    assert data[3]["video"].shape == (3, 4, 32, 32)  # the start/end segment clip


def test_a_manifest_of_only_bad_lines_is_a_clear_error(tmp_path):
    (tmp_path / "text.mp4").write_text("not a video")
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"video": "gone.mp4"}\n{"video": "text.mp4"}\nnot json\n')
    with pytest.raises(EmptyManifestError, match=r"bad\.jsonl.*all 3 lines were skipped"):
        VideoManifestDataset(str(manifest))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyManifestError, match="empty"):
        VideoManifestDataset(str(empty))


def test_a_file_broken_after_the_probe_is_replaced_not_fatal(tmp_path, synth, read_rows):
    root = synth[0].parent
    lines = []
    for i, row in enumerate(read_rows(synth[0])[:3]):
        copy = tmp_path / f"clip{i}.mp4"
        copy.write_bytes((root / row["video"]).read_bytes())
        lines.append(json.dumps({"video": copy.name, "caption": f"clip {i}"}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    data = quiet(str(manifest), num_frames=4, size=32)
    (tmp_path / "clip1.mp4").write_text("overwritten after the probe")
    torch.manual_seed(0)
    item = data[1]
    assert item["index"] in (0, 2) and item["caption"] == f"clip {item['index']}"
    assert item["load_failures"][0][0] == 2 and data.skip_counts["load"] == 1
    batch = collate([item, data[0]])
    assert batch.extra["load_failures"][0][1].endswith("clip1.mp4")
    assert pickle.loads(pickle.dumps(data)).clips == data.clips  # spawn-started workers can have it


def test_real_sample_videos_through_the_dataset(tmp_path, sample_videos):
    manifest = tmp_path / "samples.jsonl"
    manifest.write_text("".join(json.dumps({"video": str(p), "label": p.suffix}) + "\n" for p in sample_videos))
    for train in (True, False):
        data = quiet(str(manifest), num_frames=4, size=32, sampling="fixed", stride=2, train=train)
        assert data.skipped == [] and len(data) == len(sample_videos)
        batch = collate([data[i] for i in range(len(data))])
        assert batch.video.shape == (len(sample_videos), 3, 4, 32, 32) and torch.isfinite(batch.video).all()


# ----------------------------------------------------------------------------- the box follows the pixels


def test_crop_and_flip_box_math_is_exact():
    frame = torch.zeros(40, 60)
    frame[10:30, 12:24] = 1  # box [12, 10, 24, 30] px of 60 x 40
    box = torch.tensor([12 / 60, 10 / 40, 24 / 60, 30 / 40])
    for window in (CropWindow(5, 8, 30, 40, 40, 60), CropWindow(0, 0, 40, 60, 40, 60), CropWindow(15, 20, 20, 30, 40, 60)):
        crop = frame[window.top:window.top + window.height, window.left:window.left + window.width]
        for flipped in (False, True):
            pixels = crop.flip(-1) if flipped else crop
            expected = crop_box(box, window)
            expected = flip_box(expected) if flipped else expected
            ys, xs = torch.nonzero(pixels, as_tuple=True)
            truth = torch.tensor([xs.min() / window.width, ys.min() / window.height,
                                  (xs.max() + 1) / window.width, (ys.max() + 1) / window.height])
            assert torch.allclose(expected, truth, atol=1e-6), (window, flipped)
    # Wholly outside the crop: an empty (zero-width) box, never one outside [0, 1].
    outside = crop_box(box, CropWindow(0, 40, 40, 20, 40, 60))
    assert outside[0] == outside[2] == 0.0


def test_random_resized_crop_respects_scale_and_frame():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        w = random_resized_crop(72, 128, (0.3, 1.0), generator=generator)
        assert 0 <= w.top and w.top + w.height <= 72 and 0 <= w.left and w.left + w.width <= 128
        assert 0.25 <= w.height * w.width / (72 * 128) <= 1.0


def test_augmented_box_still_bounds_the_bright_box(tmp_path, box_video):
    # A 96 x 64 clip with a white rectangle at known pixels; after random crops, resizes and
    # flips, the bright pixels of every frame lie inside the transformed box, and touch it.
    box_px = (56, 14, 88, 40)  # x0, y0, x1, y1 of 96 x 64: right of centre, so flips show
    video = box_video(tmp_path / "box.mp4", box_px)
    box = [box_px[0] / 96, box_px[1] / 64, box_px[2] / 96, box_px[3] / 64]
    manifest = tmp_path / "box.jsonl"
    manifest.write_text(json.dumps({"video": str(video), "action_box": box}) + "\n")
    size = 48
    data = VideoManifestDataset(str(manifest), num_frames=4, size=size, crop_scale=(0.3, 1.0), hflip=True,
                                decode_short_side=64)
    torch.manual_seed(0)
    sides = set()
    for _ in range(16):
        item = data[0]
        x0, y0, x1, y1 = (item["action_box"] * size).tolist()
        bright = unnormalise(item["video"]).mean(0) > 0.5  # (T, H, W)
        tolerance = 1.5  # pixels: bilinear resize and H.264 soften the edges
        if not bright.any():  # the crop missed the box: the box must be (nearly) empty too
            assert x1 - x0 <= tolerance or y1 - y0 <= tolerance
            continue
        ts, ys, xs = torch.nonzero(bright, as_tuple=True)
        assert xs.min() >= x0 - tolerance and xs.max() + 1 <= x1 + tolerance
        assert ys.min() >= y0 - tolerance and ys.max() + 1 <= y1 + tolerance
        assert abs(xs.min() - x0) <= tolerance + 1 and abs(xs.max() + 1 - x1) <= tolerance + 1
        assert abs(ys.min() - y0) <= tolerance + 1 and abs(ys.max() + 1 - y1) <= tolerance + 1
        sides.add((x0 + x1) / 2 < size / 2)
    assert sides == {True, False}, "some samples were flipped, some not"
    # Evaluation: short-side resize and centre crop keep the same relation.
    evaluation = VideoManifestDataset(str(manifest), num_frames=4, size=size, train=False)
    item = evaluation[0]
    x0, y0, x1, y1 = (item["action_box"] * size).tolist()
    ys, xs = torch.nonzero(unnormalise(item["video"]).mean(0)[0] > 0.5, as_tuple=True)
    assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5
    assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5


def test_hflip_warns_on_direction_words(synth):
    with pytest.warns(UserWarning, match="hflip"):
        VideoManifestDataset(str(synth[0]), num_frames=4, size=32, probe=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VideoManifestDataset(str(synth[0]), num_frames=4, size=32, probe=False, hflip=False)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("num_frames", 0), ("sampling", "uniform"), ("stride", 0), ("crop_scale", (0.9, 0.5)),
     ("decoder", "ffmpeg"), ("decode_short_side", 16), ("size", 0)],
)
def test_arguments_are_validated(synth, argument, value):
    with pytest.raises(ValueError, match=argument):
        VideoManifestDataset(str(synth[0]), **{argument: value})


def test_dataset_mean_and_std_reach_the_device_normalisation(synth):
    data = quiet(str(synth[0]), num_frames=4, size=32, hflip=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batch = data.collate([data[0], data[1]])
    assert batch.extra["video_mean"] == (0.5, 0.5, 0.5) and batch.extra["video_std"] == (0.25, 0.25, 0.25)
    torch.testing.assert_close(batch.to("cpu").video, (batch.video.float() / 255 - 0.5) / 0.25, rtol=0, atol=1e-5)


def test_decoder_choice_is_exposed_and_checked(synth):
    data = quiet(str(synth[0]), num_frames=4, size=32, hflip=False, decoder="pyav")
    assert (data.decoder, data.decoder_reason) == ("pyav", "data.dataset.decoder=pyav")
    auto = quiet(str(synth[0]), num_frames=4, size=32, hflip=False)
    assert auto.decoder in ("decord", "torchcodec", "pyav") and auto.decoder_reason.startswith("auto: ")
    with pytest.raises(ValueError, match=r"^data.dataset.decoder: unknown decoder 'ffmpeg'; choose one of auto, pyav"):
        quiet(str(synth[0]), decoder="ffmpeg")
    with pytest.raises(ValueError, match="decode_device='cuda' needs decoder torchcodec, got pyav"):
        quiet(str(synth[0]), decoder="pyav", decode_device="cuda")
