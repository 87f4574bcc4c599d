"""CoCLR's head (thesis eq. 4.1-4.5): hand-checked wiring of queries, keys, queues and positives, the
momentum update, stage switches; then the recipes end to end at tiny scale on real H.264 clips
with DIS flow from the loader: the loss is finite and a run SIGKILLed in stage 2 resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmask.checkpoint import latest_checkpoint, load_tensors
from vlmask.config import load_recipe
from vlmask.engine import Trainer
from vlmask.types import Batch, Mask, StepOutputs, TokenGrid
from vlmask_plugins.encoders.vit import VideoViT
from vlmask_plugins.heads.coclr import CoCLRHead, crop_resize
from vlmask_plugins.targets.coclr import multi_instance_infonce, queue_infonce, topk_positive_mask

RECIPES = Path(__file__).parents[3] / "recipes"


def tiny_head(**kwargs) -> tuple[VideoViT, CoCLRHead]:
    torch.manual_seed(0)
    encoder = VideoViT(num_frames=4, img_size=32, tubelet=2, patch=8, embed_dim=32, depth=1, num_heads=2)
    return encoder, CoCLRHead(encoder, 32, dim=8, queue_size=6, momentum=0.9, **kwargs)


def outputs(encoder: VideoViT, batch_size: int = 3, seed: int = 1, labelled: bool = True,
            index: list[int] | None = None) -> StepOutputs:
    g = torch.Generator().manual_seed(seed)
    clip = (batch_size, 3, 4, 32, 32)
    batch = Batch(video=torch.randn(clip, generator=g), flow=torch.randn(clip, generator=g),
                  second_video=torch.randn(clip, generator=g), second_flow=torch.randn(clip, generator=g),
                  label=torch.arange(batch_size) % 2 if labelled else None,  # 0, 1, 0, ...
                  index=torch.tensor(index) if index is not None else None)
    mask = Mask(torch.arange(4).expand(batch_size, 4), torch.arange(4, 8).expand(batch_size, 4))
    return StepOutputs(batch=batch, grid=TokenGrid(2, 4, 4, 2, 8), mask=mask, visible_features=torch.zeros(batch_size, 4, 32),
                       encoder=encoder)


@pytest.mark.parametrize("key_view", ["clip", "crop"])
def test_topk_loss_is_eq_4_4_over_the_other_streams_neighbours(key_view):
    encoder, head = tiny_head(stream="rgb", positives="topk", topk=2, key_view=key_view)
    out = outputs(encoder)
    rgb_queue, flow_queue = head.rgb_queue.clone(), head.flow_queue.clone()
    torch.manual_seed(7)
    loss, stats = head(out)
    # recompute by hand: the key is the second clip, or the same crop window (same random draws)
    # of the clip; the queues are those before the enqueue
    torch.manual_seed(7)
    key_video = out.batch.second_video if key_view == "clip" else crop_resize(out.batch.video, *head._key_window(32, 32))
    with torch.no_grad():
        q_flow = F.normalize(head.flow_projection(head.flow_encoder(out.batch.flow).mean(1)), dim=1)
        k_rgb = F.normalize(head.rgb_key_projection(head.rgb_key_encoder(key_video).mean(1)), dim=1)
    q_rgb = F.normalize(head.rgb_projection(encoder(out.batch.video).mean(1)), dim=1)
    positives = topk_positive_mask(q_flow, flow_queue, 2)
    expected = multi_instance_infonce(q_rgb, k_rgb, rgb_queue, positives, 0.07)
    assert torch.allclose(loss, expected, atol=1e-6) and stats["rgb_positives"] == 3.0 and "flow" not in stats
    loss.backward()
    assert all(p.grad is None for p in head.flow_encoder.parameters())  # stream=rgb: flow only mines
    assert encoder.patch_embed.weight.grad is not None
    # the keys went into both queues at the same rows (0..2), the pointer moved on
    assert int(head.queue_pointer) == 3 and torch.allclose(head.rgb_queue[:3], k_rgb, atol=1e-6)
    assert torch.equal(head.rgb_queue[3:], rgb_queue[3:]) and not torch.equal(head.flow_queue[:3], flow_queue[:3])
    assert head.queue_labels.tolist() == [0, 1, 0, -1, -1, -1]


def test_a_batch_without_labels_enqueues_label_minus_one():
    """Rows that take the keys of clips without a label lose the label of the clip they held."""
    encoder, head = tiny_head()
    head(outputs(encoder))
    assert head.queue_labels.tolist() == [0, 1, 0, -1, -1, -1]
    head(outputs(encoder, seed=2, labelled=False))
    head(outputs(encoder, seed=3, labelled=False))  # wraps around onto rows 0..2
    assert head.queue_labels.tolist() == [-1] * 6 and int(head.queue_pointer) == 3


def test_a_step_with_more_keys_than_the_queue_is_refused_also_on_meta():
    """The keys of a step (world size x batch size) must fit in the queue; the check reads shapes,
    so a FLOP count on the meta device (which enqueues nothing) refuses the batch too."""
    message = r"7 keys \(world size 1 x batch size 7\), more than heads\.coclr\.queue_size=6"
    encoder, head = tiny_head()
    head(outputs(encoder, batch_size=6))  # exactly the queue: fine
    with pytest.raises(ValueError, match=message):
        head(outputs(encoder, batch_size=7))
    encoder.to("meta"), head.to("meta")
    head(_on_meta(encoder, 6))
    with pytest.raises(ValueError, match=message):
        head(_on_meta(encoder, 7))


def _on_meta(encoder: VideoViT, batch_size: int) -> StepOutputs:
    out = outputs(encoder, batch_size=batch_size)
    return StepOutputs(batch=out.batch.to("meta"), grid=out.grid, mask=out.mask.to("meta"), visible_features=out.visible_features.to("meta"),
                       encoder=encoder)


def test_labels_give_ubernce_positives_and_stream_both_sums_two_terms():
    encoder, head = tiny_head(positives="labels")
    head(outputs(encoder))  # fills labels 0, 1, 0 in rows 0..2
    loss, stats = head(outputs(encoder, seed=2))
    assert set(stats) == {"rgb", "flow", "rgb_positives", "flow_positives", "same_clip"}
    assert torch.allclose(loss, stats["rgb"] + stats["flow"]) and stats["rgb_positives"] == pytest.approx(1 + 5 / 3)


def embeddings(head: CoCLRHead, encoder: VideoViT, out: StepOutputs) -> tuple[torch.Tensor, ...]:
    """The head's queries and keys (key view: the second clip), recomputed without gradient."""
    def embed(encoder, projection, clip):
        return F.normalize(projection(encoder(clip).mean(1)), dim=1)

    batch = out.batch
    with torch.no_grad():
        return (embed(encoder, head.rgb_projection, batch.video), embed(head.flow_encoder, head.flow_projection, batch.flow),
                embed(head.rgb_key_encoder, head.rgb_key_projection, batch.second_video),
                embed(head.flow_key_encoder, head.flow_key_projection, batch.second_flow))


def same_clip_columns(rows: int, *pairs: tuple[int, int]) -> torch.Tensor:
    same = torch.zeros(rows, 6, dtype=torch.bool)
    for row, column in pairs:
        same[row, column] = True
    return same


def test_infonce_leaves_queue_keys_of_the_querys_own_clip_out_of_the_softmax():
    """eq. 4.1's negatives are N_i = {psi(x_n; a) | n != i}: a queue entry enqueued from the
    query's own clip (same Batch.index) is excluded from the denominator, in both streams."""
    encoder, head = tiny_head()
    head(outputs(encoder, index=[0, 1, 2]))  # queue rows 0..2 now hold keys of clips 0, 1, 2
    assert head.queue_clips.tolist() == [0, 1, 2, -1, -1, -1]
    out = outputs(encoder, seed=2, index=[2, 7, 0])  # clip 2 is in row 2, clip 0 in row 0
    rgb_queue, flow_queue = head.rgb_queue.clone(), head.flow_queue.clone()
    q_rgb, q_flow, k_rgb, k_flow = embeddings(head, encoder, out)
    loss, stats = head(out)
    same = same_clip_columns(3, (0, 2), (2, 0))
    masked = queue_infonce(q_rgb, k_rgb, rgb_queue, 0.07, same) + queue_infonce(q_flow, k_flow, flow_queue, 0.07, same)
    unmasked = queue_infonce(q_rgb, k_rgb, rgb_queue, 0.07) + queue_infonce(q_flow, k_flow, flow_queue, 0.07)
    assert torch.allclose(loss, masked, atol=1e-6) and not torch.allclose(loss, unmasked, atol=1e-3)
    assert stats["same_clip"] == pytest.approx(2 / 3)
    assert head.queue_clips.tolist() == [0, 1, 2, 2, 7, 0]  # enqueued with the keys
    _, stats = head(outputs(encoder, seed=3))  # a batch without index: nothing matches, -1 enqueued
    assert stats["same_clip"] == 0 and head.queue_clips.tolist() == [-1, -1, -1, 2, 7, 0]


@pytest.mark.parametrize("positives", ["topk", "labels"])
def test_under_topk_and_labels_the_own_clips_queue_keys_are_positives_never_mined_neighbours(positives):
    """eq. 4.3: P_1i holds every augmentation psi(x_1i; a), so a queue key of the query's own clip
    is a positive (never a negative); the K mined neighbours are other clips (released code:
    mask_sim[mask_source] = -inf before the top-K)."""
    encoder, head = tiny_head(stream="rgb", topk=2)
    head(outputs(encoder, index=[0, 1, 2], labelled=False))  # rows 0..2: clips 0, 1, 2, no labels
    head.positives = positives  # a stage switch
    out = outputs(encoder, seed=2, index=[2, 7, 0])
    rgb_queue, flow_queue = head.rgb_queue.clone(), head.flow_queue.clone()
    q_rgb, q_flow, k_rgb, _ = embeddings(head, encoder, out)
    loss, stats = head(out)
    same = same_clip_columns(3, (0, 2), (2, 0))
    own = torch.cat([torch.zeros(3, 1, dtype=torch.bool), same], dim=1)
    if positives == "topk":
        mined = topk_positive_mask(q_flow, flow_queue, 2, skip=same)
        assert not (mined & own).any() and mined.sum(1).tolist() == [3, 3, 3]
    else:  # labels 0, 1, 0 against a queue of unlabelled keys: no label positives
        mined = torch.zeros(3, 7, dtype=torch.bool)
        mined[:, 0] = True
    expected = multi_instance_infonce(q_rgb, k_rgb, rgb_queue, mined | own, 0.07)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert stats["rgb_positives"] == pytest.approx(mined.sum(1).float().mean() + 2 / 3)


def test_momentum_update_moves_keys_toward_the_online_streams():
    encoder, head = tiny_head()
    with torch.no_grad():
        encoder.patch_embed.weight.add_(1.0)
    before = head.rgb_key_encoder.patch_embed.weight.clone()
    head.vlmask_after_optimizer_step(step=1)
    expected = 0.9 * before + 0.1 * encoder.patch_embed.weight
    assert torch.allclose(head.rgb_key_encoder.patch_embed.weight, expected)
    assert not any(p.requires_grad for p in head.rgb_key_encoder.parameters())


def test_flow_is_required_by_validate(tmp_path):
    from vlmask.plugins import default_plugins
    from vlmask.schema import validate

    problems = validate(load_recipe(RECIPES / "coclr" / "infonce.yaml", ["data.dataset.flow=false"]), default_plugins().registry)
    assert any("key data.dataset.flow: head 'coclr'" in p and "optical-flow images" in p for p in problems), problems
    recipe = load_recipe(RECIPES / "coclr" / "infonce.yaml", ["data.dataset.second_clip=false"])
    problems = validate(recipe, default_plugins().registry)
    assert any("key data.dataset.second_clip: head 'coclr'" in p and "a second clip" in p for p in problems), problems
    recipe = load_recipe(RECIPES / "coclr" / "infonce.yaml", ["data.dataset.second_clip=false", "heads.coclr.key_view=crop"])
    assert validate(recipe, default_plugins().registry) == []


def test_the_key_view_is_an_independent_second_clip_with_its_own_flow(tiny_synth):
    """CoCLR's positive pair: two clips of the same video (Han et al. sec. 4.1), each drawn,
    cropped and given flow images on its own; the key view is not the query's frames."""
    from vlmask_plugins.action_area.flow import flow_images
    from vlmask_plugins.data.dataset import VideoManifestDataset, collate

    dataset = VideoManifestDataset(str(tiny_synth[0]), num_frames=4, size=32, flow=True, second_clip=True, hflip=False)
    torch.manual_seed(0)
    items = [dataset[i] for i in range(2)]
    for item in items:
        assert item["second_video"].shape == item["video"].shape == (3, 4, 32, 32)
        assert not torch.equal(item["second_video"], item["video"])  # another draw of frames and crop
        own_flow = flow_images(item["second_video"].permute(1, 2, 3, 0).contiguous().numpy())
        assert torch.equal(item["second_flow"], torch.from_numpy(own_flow).permute(3, 0, 1, 2))
    batch = collate(items).to("cpu")
    assert batch.second_video.dtype == torch.float32 and batch.second_flow.shape == batch.flow.shape
    plain = VideoManifestDataset(str(tiny_synth[0]), num_frames=4, size=32, hflip=False)
    assert "second_video" not in plain[0] and collate([plain[0]]).second_video is None


TINY = ("train.batch_size=4", "data.num_workers=0", "data.dataset.num_frames=4", "data.dataset.size=32",
        "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2", "optim.warmup_steps=2",
        "device=cpu", "heads.coclr.queue_size=8", "heads.coclr.topk=2", "train.log_every=1", "train.ckpt_every=5",
        "stages.0.steps=2", "stages.1.steps=2", "stages.2.steps=2", "stages.3.steps=1", "stages.4.steps=1")



def test_coclr_killed_in_stage_two_resumes_exactly(tiny_synth, tmp_path, kill_at_checkpoint):
    recipe = RECIPES / "coclr" / "coclr.yaml"

    def args(run_dir: Path) -> list[str]:
        return [*TINY, f"data.train={tiny_synth[0]}", f"run.dir={run_dir}"]

    with Trainer(load_recipe(recipe, args(tmp_path / "a"))) as trainer:
        assert trainer.train_set[0]["flow"].shape == (3, 4, 32, 32) and trainer.total_steps == 8
        trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [("coclr/rgb" in m, "coclr/flow" in m) for m in metrics] == [(True, True)] * 2 + [(True, False)] * 2 + [
        (False, True)] * 2 + [(True, False), (False, True)]
    assert all(m["loss"] == m["loss"] for m in metrics)
    # killed right after step 5's checkpoint, in the middle of stage 2's flow_1 (steps 4 and 5)
    killed = subprocess.run([sys.executable, "-c", kill_at_checkpoint, str(recipe), *args(tmp_path / "b")], capture_output=True,
                            text=True, env={**os.environ, "KILL_AT": "5"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run([sys.executable, "-m", "vlmask", "run", str(recipe), *args(tmp_path / "b")],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = load_tensors(latest_checkpoint(tmp_path / "a" / "checkpoints") / "student.safetensors")
    b = load_tensors(latest_checkpoint(tmp_path / "b" / "checkpoints") / "student.safetensors")
    assert a.keys() == b.keys() and any("queue" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_flop_count_is_four_full_encoder_passes_and_one_or_two_backwards():
    """benchmarks/README.md, "CoCLR at demo scale": one full-clip pass of the demo ViT is 1.145
    GFLOP (blocks 1.107, patch embedding 0.038), the student's masked forward 0.139."""
    from vlmask.bench import count_flops

    both = count_flops(RECIPES / "coclr" / "infonce.yaml")
    # a stage-2 step's switches on the unstaged recipe (the count takes the first step: coclr.yaml's is stage 1's)
    rgb = count_flops(RECIPES / "coclr" / "infonce.yaml", ["heads.coclr.stream=rgb", "heads.coclr.positives=topk"])
    assert count_flops(RECIPES / "coclr" / "coclr.yaml", ["heads.coclr.stream=rgb"])["gflops_per_clip"] == \
        pytest.approx(both["gflops_per_clip"], abs=0.002)
    assert both["breakdown"]["student_forward"] == pytest.approx(4 * 1.145 + 0.139, abs=0.005)
    assert both["breakdown"]["student_backward"] == pytest.approx(2 * (2 * 1.107 + 0.038), abs=0.005)
    assert rgb["breakdown"]["student_backward"] == pytest.approx(2 * 1.107 + 0.038, abs=0.005)
    assert (both["gflops_per_clip"], rgb["gflops_per_clip"]) == (pytest.approx(9.226, abs=0.002), pytest.approx(6.973, abs=0.002))


def test_flow_bound_sets_the_displacement_that_saturates_the_flow_images(tiny_synth):
    """CoCLR clips flow at 20 px for ~256 px frames; at small frames a smaller bound keeps the
    motion visible: the images are flow_images(frames, bound) of the same crop."""
    from vlmask_plugins.action_area.flow import flow_images
    from vlmask_plugins.data.dataset import VideoManifestDataset

    spread = {}
    for bound in (20.0, 2.5):
        dataset = VideoManifestDataset(str(tiny_synth[0]), num_frames=4, size=32, flow=True, hflip=False, flow_bound=bound)
        torch.manual_seed(0)
        item = dataset[0]
        expected = flow_images(item["video"].permute(1, 2, 3, 0).contiguous().numpy(), bound=bound)
        assert torch.equal(item["flow"], torch.from_numpy(expected).permute(3, 0, 1, 2))
        spread[bound] = float((item["flow"][:2].float() - 128).abs().mean())
    assert spread[2.5] > 3 * spread[20.0] > 0
    with pytest.raises(ValueError, match="flow_bound must be > 0"):
        VideoManifestDataset(str(tiny_synth[0]), num_frames=4, size=32, flow=True, flow_bound=0)


def test_a_run_on_two_clips_excludes_their_queued_keys_and_resumes_from_an_old_checkpoint(tiny_synth, tmp_path):
    """recipes/coclr/infonce.yaml on a manifest of 2 clips with batch size 2: every step sees both
    clips, so from step 2 on the queue holds keys of each query's own clip (1 per query at step 2,
    2 at step 3). The loss of every step of the real run is the InfoNCE without those entries.
    Then a checkpoint written before ``queue_clips`` existed (the key removed) still resumes."""
    from safetensors.torch import save_file

    lines = tiny_synth[0].read_text().splitlines()[:2]
    manifest = tmp_path / "two.jsonl"
    manifest.write_text("".join(json.dumps({**json.loads(line), "video": str(tiny_synth[0].parent / json.loads(line)["video"])})
                                + "\n" for line in lines))
    args = ["train.batch_size=2", "data.num_workers=0", "data.dataset.num_frames=4", "data.dataset.size=32",
            "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2", "optim.warmup_steps=2",
            "device=cpu", "heads.coclr.queue_size=8", "train.log_every=1", "train.ckpt_every=3", "train.max_steps=3",
            f"data.train={manifest}", f"run.dir={tmp_path / 'run'}"]
    calls: list[dict[str, torch.Tensor]] = []

    def before(head, inputs):
        calls.append({"rgb_queue": head.rgb_queue.clone(), "flow_queue": head.flow_queue.clone(),
                      "queue_clips": head.queue_clips.clone()})

    def after(head, inputs, output):
        out, seen = inputs[0], calls[-1]
        q_rgb, q_flow, k_rgb, k_flow = embeddings(head, out.encoder, out)
        same = out.batch.index[:, None] == seen["queue_clips"][None, :]
        seen["loss"], seen["same"] = output[0].detach(), same
        seen["masked"] = (queue_infonce(q_rgb, k_rgb, seen["rgb_queue"], 0.07, same)
                          + queue_infonce(q_flow, k_flow, seen["flow_queue"], 0.07, same))
        seen["unmasked"] = (queue_infonce(q_rgb, k_rgb, seen["rgb_queue"], 0.07)
                            + queue_infonce(q_flow, k_flow, seen["flow_queue"], 0.07))

    recipe = RECIPES / "coclr" / "infonce.yaml"
    with Trainer(load_recipe(recipe, args)) as trainer:
        head = trainer.train_step.student.objective_modules["coclr"]
        handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
        trainer.train()
        for handle in handles:
            handle.remove()
        queue_clips = head.queue_clips.clone()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["coclr/same_clip"] for m in metrics] == [0.0, 1.0, 2.0]
    assert [int(c["same"].sum()) for c in calls] == [0, 2, 4]
    for call in calls:
        assert torch.allclose(call["loss"], call["masked"], atol=1e-5)
    assert all(not torch.allclose(c["loss"], c["unmasked"], atol=1e-4) for c in calls[1:])
    assert sorted(queue_clips.tolist()) == [-1, -1, 0, 0, 0, 1, 1, 1]

    # a checkpoint of a CoCLR run made before queue_clips existed: the key is absent
    weights = latest_checkpoint(tmp_path / "run" / "checkpoints") / "student.safetensors"
    tensors = load_tensors(weights)
    assert torch.equal(tensors["objective_modules.coclr.queue_clips"], queue_clips)  # a new run's checkpoint keeps it
    del tensors["objective_modules.coclr.queue_clips"]
    save_file(tensors, str(weights))
    with Trainer(load_recipe(recipe, [*args, "train.max_steps=4"])) as trainer:
        head = trainer.train_step.student.objective_modules["coclr"]
        assert trainer.start_step == 3 and head.queue_clips.tolist() == [-1] * 8  # filled: nothing known of any clip
        assert torch.equal(head.rgb_queue, tensors["objective_modules.coclr.rgb_queue"])
        trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4 and metrics[-1]["coclr/same_clip"] == 0.0
    # load_state_dict (PyTorch's own path) fills it too; any other missing key is still refused
    del tensors["objective_modules.coclr.queue_pointer"]
    state = {k.removeprefix("objective_modules.coclr."): v for k, v in tensors.items() if k.startswith("objective_modules.coclr.")}
    with pytest.raises(RuntimeError, match="queue_pointer"):
        head.load_state_dict(state)
    state["queue_pointer"] = torch.tensor(5)
    head.load_state_dict(state)
    assert head.queue_clips.tolist() == [-1] * 8 and int(head.queue_pointer) == 5
