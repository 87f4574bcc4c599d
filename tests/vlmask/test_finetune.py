"""vlmask.finetune: VideoMAE-protocol finetuning of a tiny run (finetune.json, weights), the
layer-wise lr decay groups, label smoothing / mixup / cutmix targets and the settings checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from vlmask.checkpoint import latest_checkpoint, load_tensors
from vlmask.config import RecipeError, load_recipe
from vlmask.engine import Trainer, lr_at
from vlmask.evaluate import class_parts, eval_dataset
from vlmask.finetune import (
    FinetuneSettings,
    MixupCutmix,
    VideoClassifier,
    evaluate_classifier,
    finetune_dataset,
    finetune_optimizer,
    finetune_run,
    finetune_settings,
    finetune_step,
    layer_decay_groups,
    layer_id,
    load_finetuned,
    set_group_lrs,
    smoothed_targets,
    soft_target_cross_entropy,
)
from vlmask.runs import open_run
from vlmask_plugins.encoders.vit import VideoViT

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrix products stall when two threads compete for two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mae_run(tiny_synth, tiny_scale, tmp_path_factory) -> Path:
    """recipes/mae.yaml trained 2 steps at the shared tiny scale, with a val manifest."""
    train, val = tiny_synth
    run_dir = tmp_path_factory.mktemp("runs") / "mae"
    overrides = [*tiny_scale, f"data.train={train}", f"data.val={val}", "train.max_steps=2",
                 "train.log_every=1", "train.ckpt_every=2", f"run.dir={run_dir}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    return run_dir


FINETUNE = ["finetune.max_steps=5", "finetune.batch_size=4", "finetune.eval_every=3", "finetune.log_every=2",
            "finetune.warmup_steps=1", "finetune.mixup=0.8", "finetune.cutmix=1.0"]


@pytest.fixture(scope="module")
def finetuned(mae_run) -> tuple[Path, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return mae_run, finetune_run(mae_run, FINETUNE, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_finetune_writes_finetune_json_and_weights(finetuned):
    run_dir, result = finetuned
    saved = json.loads((run_dir / "finetune.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["checkpoint"] == "checkpoints/step_00000002"
    assert saved["num_classes"] == 18 and saved["chance_top1"] == pytest.approx(1 / 18)
    assert saved["steps"] == 5
    assert saved["data"]["train_clips"] == 18 and saved["data"]["val_clips"] == 6
    for key in ("top1", "verb_top1", "noun_top1"):  # the synthetic manifests carry verb and noun
        correct = saved[key] * 6  # a fraction of the 6 validation clips
        assert 0 <= round(correct) <= 6 and correct == pytest.approx(round(correct), abs=1e-6), (key, saved[key])
    settings = saved["settings"]
    assert settings["max_steps"] == 5 and settings["batch_size"] == 4 and settings["layer_decay"] == 0.75
    assert settings["label_smoothing"] == 0.1 and settings["crop_scale"] == [0.08, 1.0]
    assert settings["num_workers"] == 0  # from data.num_workers of the run
    # history: logged every 2 steps, validated every 3 steps and after the last
    assert [row["step"] for row in saved["history"]] == [2, 3, 4, 5]
    assert ["top1" in row for row in saved["history"]] == [False, True, False, True]
    assert saved["history"][-1]["top1"] == saved["top1"]
    assert all(row["loss"] > 0 for row in saved["history"])
    assert (run_dir / saved["weights"]).is_file() and saved["weights"] == "finetune/model.safetensors"
    assert not list((run_dir / "finetune").glob(".*"))  # no temporary file left behind


def test_finetuned_weights_load_strictly_and_reproduce_the_reported_top1(finetuned, tiny_synth):
    run_dir, result = finetuned
    model, classes = load_finetuned(run_dir)
    assert len(classes) == result["num_classes"] and not model.training
    tensors = load_tensors(run_dir / "finetune" / "model.safetensors")
    assert set(tensors) == set(model.state_dict())
    assert "encoder.norm.weight" not in tensors  # VideoMAE mean pooling: fc_norm replaces the final norm
    assert {"fc_norm.weight", "head.weight", "head.bias"} <= set(tensors)
    # the encoder was trained end to end from the pretrained checkpoint
    pretrained = load_tensors(latest_checkpoint(run_dir / "checkpoints") / "student.safetensors")
    moved = tensors["encoder.blocks.0.attn.qkv.weight"] - pretrained["encoder.blocks.0.attn.qkv.weight"]
    assert 0 < moved.abs().max() < 0.1
    # the reloaded model classifies the val manifest exactly as reported
    run = open_run(run_dir)
    val_set = eval_dataset(run, tiny_synth[1])
    train_set = eval_dataset(run, tiny_synth[0])
    verbs, nouns = class_parts(train_set, classes)
    again = evaluate_classifier(model, val_set, classes, verbs, nouns, batch_size=4)
    assert again["top1"] == pytest.approx(result["top1"])
    assert again["verb_top1"] == pytest.approx(result["verb_top1"])


def test_finetuning_and_its_evaluation_decode_no_training_only_views(mae_run, tiny_synth):
    """A CoCLR run's dataset node asks for optical flow and a second clip of every video; the
    classifier reads the clip alone, so finetuning (and its val set, eval_dataset) builds the
    dataset without them: decoding each clip once, no flow computed, nothing unused on the device."""
    run = open_run(mae_run, ["data.dataset.flow=true", "data.dataset.second_clip=true"])
    classes = list(run.train_set.classes)
    train_set = finetune_dataset(run, finetune_settings(run.recipe), classes)
    val_set = eval_dataset(run, tiny_synth[1])
    for dataset in (train_set, val_set):
        item = dataset[0]
        assert {"flow", "second_video", "second_flow"}.isdisjoint(item) and item["video"].shape == (3, 4, 32, 32)
    assert "flow" in run.train_set[0] and "second_video" in run.train_set[0]  # training's own set keeps them


def test_layer_decay_groups_give_videomae_lrs():
    encoder = VideoViT(num_frames=4, img_size=16, patch=8, embed_dim=16, depth=3, num_heads=2, pos_embed="learned")
    model = VideoClassifier(encoder, num_classes=5)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter once
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # depth 3: patch_embed/pos_embed layer 0 -> 0.5**4, block i -> 0.5**(3 - i), head/fc_norm -> 1
    assert scale["encoder.patch_embed.weight"] == scale["encoder.pos_embed"] == 0.5**4
    assert scale["encoder.blocks.0.attn.qkv.weight"] == 0.5**3
    assert scale["encoder.blocks.2.mlp.fc2.bias"] == 0.5
    assert scale["head.weight"] == scale["fc_norm.bias"] == 1.0
    assert decay["encoder.blocks.1.mlp.fc1.weight"] == decay["head.weight"] == 0.05
    assert decay["encoder.blocks.1.mlp.fc1.bias"] == decay["encoder.pos_embed"] == decay["fc_norm.weight"] == 0.0
    assert [layer_id("encoder.mask_token", 3), layer_id("encoder.blocks.2.norm1.weight", 3)] == [0, 3]
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1.0)
    peak = lr_at(5, 10, 2, 1e-3, 1e-6, 1e-6)
    set_group_lrs(optimizer, peak)
    lrs = {n: group["lr"] for group, g in zip(optimizer.param_groups, groups) for n in g["names"]}
    assert lrs["encoder.blocks.0.norm1.weight"] == pytest.approx(peak * 0.125)
    assert lrs["head.bias"] == pytest.approx(peak)
    flat = layer_decay_groups(model, weight_decay=0.05, layer_decay=1.0)
    assert {g["lr_scale"] for g in flat} == {1.0}


def test_head_starts_videomae_small_and_mean_pools():
    torch.manual_seed(0)
    encoder = VideoViT(num_frames=4, img_size=16, patch=8, embed_dim=16, depth=1, num_heads=2)
    model = VideoClassifier(encoder, num_classes=7, head_init_scale=1e-3)
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    # VideoMAE: trunc_normal(std=0.02) (timm's, truncated at +-2 absolute) times init_scale 1e-3
    assert 1e-5 < float(model.head.weight.detach().std()) < 4e-5 and model.head.bias.abs().max() == 0
    video = torch.randn(2, 3, 4, 16, 16)
    expected = model.head(model.fc_norm(encoder(video).mean(dim=1)))
    assert torch.allclose(model(video), expected)
    assert model(video).shape == (2, 7)


def test_label_smoothing_targets_by_hand():
    targets = smoothed_targets(torch.tensor([0, 2]), 4, 0.1)
    expected = torch.tensor([[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]])
    assert torch.allclose(targets, expected)
    logits = torch.randn(2, 4)
    assert torch.isclose(soft_target_cross_entropy(logits, targets),
                         F.cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=0.1))


def test_mixup_blends_clips_and_targets_by_hand():
    mixing = MixupCutmix(mixup=0.8, cutmix=0.0, smoothing=0.0, num_classes=3)
    video = torch.stack([torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4)])  # clip 0 all 0, clip 1 all 1
    mixed, targets, lam = mixing.apply(video, torch.tensor([0, 2]), 0.3, use_cutmix=False)
    assert lam == 0.3
    assert torch.allclose(mixed[0], torch.full((3, 2, 4, 4), 0.7)) and torch.allclose(mixed[1], torch.full((3, 2, 4, 4), 0.3))
    assert torch.allclose(targets, torch.tensor([[0.3, 0.0, 0.7], [0.7, 0.0, 0.3]]))
    smoothed = MixupCutmix(mixup=0.8, cutmix=0.0, smoothing=0.3, num_classes=3)
    _, targets, _ = smoothed.apply(video, torch.tensor([0, 2]), 0.5, use_cutmix=False)
    assert torch.allclose(targets, torch.tensor([[0.45, 0.1, 0.45], [0.45, 0.1, 0.45]]))


def test_cutmix_pastes_one_box_in_every_frame_and_corrects_lam():
    mixing = MixupCutmix(mixup=0.0, cutmix=1.0, smoothing=0.0, num_classes=2)
    video = torch.stack([torch.zeros(3, 4, 16, 16), torch.ones(3, 4, 16, 16)])
    mixed, targets, lam = mixing.apply(video, torch.tensor([0, 1]), 0.75, True, torch.Generator().manual_seed(3))
    pasted = mixed[0] == 1.0  # pixels of clip 0 that came from clip 1
    assert torch.equal(pasted, pasted[:1, :1].expand_as(pasted))  # the same box in every channel and frame
    assert lam == pytest.approx(1.0 - float(pasted[0, 0].float().mean()))
    assert torch.allclose(targets[0], torch.tensor([lam, 1.0 - lam]))
    assert torch.equal(mixed[1] == 0.0, pasted)  # and the reverse for clip 1
    # the drawn lam follows Beta(alpha, alpha) from the generator: reproducible
    draws = [MixupCutmix(0.8, 1.0).draw(torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1] and 0.0 < draws[0][0] < 1.0
    assert MixupCutmix(0.8, 1.0, prob=0.0).draw(torch.Generator().manual_seed(7)) == (1.0, False)


def test_settings_defaults_and_errors_name_file_and_key():
    defaults = finetune_settings(load_recipe(RECIPES / "mae.yaml"))
    assert defaults == FinetuneSettings()
    assert (defaults.layer_decay, defaults.label_smoothing, defaults.mixup, defaults.cutmix) == (0.75, 0.1, 0.0, 0.0)
    recipe = load_recipe(RECIPES / "mae.yaml", ["finetune.layer_decay=1.5", "finetune.lr_decay=0.7",
                                                 "finetune.mixup=lots", "finetune.crop_scale=[0.5, 0.2]"])
    with pytest.raises(RecipeError) as caught:
        finetune_settings(recipe)
    problems = caught.value.problems
    assert len(problems) == 4
    assert any("command line: finetune.layer_decay=1.5" in p and "key finetune.layer_decay" in p and "(0, 1]" in p for p in problems)
    assert any("unknown key finetune.lr_decay" in p and "layer_decay" in p for p in problems)
    assert any("key finetune.mixup: 'lots' is not of type float" in p for p in problems)
    assert any("key finetune.crop_scale" in p for p in problems)


def test_finetune_rejects_bad_overrides_before_loading(mae_run):
    with pytest.raises(RecipeError, match="finetune.label_smoothing"):
        finetune_run(mae_run, ["finetune.label_smoothing=1.0"], progress=False)
    with pytest.raises(RecipeError, match="finetune.batch_size"):
        finetune_run(mae_run, ["finetune.batch_size=64", "finetune.max_steps=1"], progress=False)


def test_finetuning_is_reproducible(finetuned, tmp_path):
    import shutil

    run_dir, result = finetuned
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("finetune", "finetune.json", "features"))
    again = finetune_run(copy, FINETUNE, progress=False)
    assert [row["loss"] for row in again["history"]] == [row["loss"] for row in result["history"]]
    assert again["top1"] == result["top1"]


def _videomae_groups_by_hand(model: VideoClassifier, weight_decay: float, layer_decay: float) -> dict[str, tuple[float, float]]:
    """The hand-written groups vlmask used before timm's (VideoMAE ``get_parameter_groups``):
    parameter name -> (lr_scale, weight_decay)."""
    depth, found = model.depth, {}
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.endswith(".bias") or name.rpartition(".")[2] in ("pos_embed", "cls_token")
        found[name] = (layer_decay ** (depth + 1 - layer_id(name, depth)), 0.0 if skip else weight_decay)
    return found


@pytest.mark.parametrize("layer_decay", [0.5, 0.75, 1.0])
def test_timm_layer_decay_groups_equal_the_hand_written_ones(layer_decay):
    encoder = VideoViT(num_frames=4, img_size=16, patch=8, embed_dim=16, depth=3, num_heads=2, pos_embed="learned")
    model = VideoClassifier(encoder, num_classes=5)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=layer_decay)
    by_timm = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["names"]}
    by_hand = _videomae_groups_by_hand(model, 0.05, layer_decay)
    assert by_timm.keys() == by_hand.keys()
    # pytest.approx compares a dict of floats, not of tuples (pytest 9.2 refuses nested values)
    for field in (0, 1):
        assert {n: v[field] for n, v in by_timm.items()} == pytest.approx({n: v[field] for n, v in by_hand.items()})
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_timm_soft_target_loss_equals_the_hand_written_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    targets = torch.softmax(torch.randn(6, 5, generator=g), dim=-1)  # mixup-like soft targets
    by_hand = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    assert torch.allclose(soft_target_cross_entropy(logits, targets), by_hand, atol=1e-6)


def test_finetune_step_is_one_clipped_layer_decay_adamw_step():
    """``finetune_optimizer`` + ``finetune_step`` (what ``vlmask finetune`` and
    benchmarks/eval_costs.py run) equal the step written out: AdamW over the layer-decay groups
    at ``warmup_lr``, soft-target cross-entropy, backward, clipping at ``grad_clip``."""
    import copy
    from contextlib import nullcontext

    torch.manual_seed(0)
    encoder = VideoViT(num_frames=4, img_size=16, patch=8, embed_dim=16, depth=2, num_heads=2)
    model = VideoClassifier(encoder, num_classes=3, head_init_scale=1.0)
    reference = copy.deepcopy(model)
    settings = FinetuneSettings(layer_decay=0.5, weight_decay=0.05, betas=[0.8, 0.99], eps=1e-7, grad_clip=0.01,
                                warmup_lr=0.1)
    optimizer = finetune_optimizer(model, settings, torch.device("cpu"))
    groups = layer_decay_groups(reference, 0.05, 0.5)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [g["lr_scale"] for g in groups]
    assert {(g["lr"], g["betas"], g["eps"]) for g in optimizer.param_groups} == {(0.1, (0.8, 0.99), 1e-7)}
    video, targets = torch.randn(2, 3, 4, 16, 16), smoothed_targets(torch.tensor([0, 2]), 3, 0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss = finetune_step(model, optimizer, scaler, video, targets, nullcontext, settings.grad_clip)

    by_hand = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=0.1,
                                betas=(0.8, 0.99), eps=1e-7)
    expected = soft_target_cross_entropy(reference(video), targets)
    expected.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    by_hand.step()
    assert torch.equal(loss.detach(), expected.detach())
    for (name, value), (_, wanted) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(value, wanted), name
