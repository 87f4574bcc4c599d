"""CoCLR's queues with several processes: two CPU processes (gloo) started by torchrun train
``coclr/infonce.yaml`` at tiny scale. Every rank's keys go into every rank's queues, in rank order
(MoCo's ``concat_all_gather`` before the enqueue), under DDP and under FSDP, and a rank whose batch
has no labels still joins the gather (its rows get label -1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vlmask.checkpoint import load_tensors
from vlmask.data_loading import EpochBatches

RECIPE = Path(__file__).parents[3] / "recipes" / "coclr" / "infonce.yaml"
BATCH, WORLD, STEPS, QUEUE, MOMENTUM = 4, 2, 2, 32, 0.5
TINY = (f"train.batch_size={BATCH}", "data.num_workers=0", "data.dataset.num_frames=4", "data.dataset.size=32",
        "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2", "optim.warmup_steps=1",
        "device=cpu", f"heads.coclr.queue_size={QUEUE}", "heads.coclr.dim=8", f"heads.coclr.momentum={MOMENTUM}",
        f"train.max_steps={STEPS}", "train.ckpt_every=1", "train.log_every=1",
        # the clips as drawn before the recipe's colour augmentation existed: its draws move the second
        # clips' temporal and crop draws, and two of those then give flow keys closer than the 1e-3
        # that the distinct-keys check below allows (queues, not augmentation, are tested here)
        "data.dataset.color_jitter=null", "data.dataset.blur=null")
HEAD = "objective_modules.coclr."

pytestmark = [pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH"), pytest.mark.slow]


def first_batches(size: int, rank: int) -> list[list[int]]:
    """The clip indices of steps 1..STEPS on ``rank`` (the engine's sampler, seed 0)."""
    sampler = EpochBatches(size, BATCH, 0, rank, WORLD)
    return [[index for index, _ in batch] for batch in sampler][:STEPS]


@pytest.fixture(scope="module")
def runs(tiny_synth, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """infonce.yaml, 2 steps of 4 clips on each of 2 processes, with DDP and with FSDP, on a manifest
    whose clips of rank 1's first batch have no label."""
    from vlmask_plugins.data.dataset import VideoManifestDataset

    root = tmp_path_factory.mktemp("coclr-distributed")
    source = Path(tiny_synth[0])
    lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    unlabelled = set(first_batches(len(lines), rank=1)[0])
    for i, line in enumerate(lines):
        line["video"] = str(source.parent / line["video"])
        if i in unlabelled:  # no label, and no verb and noun to make one from
            for field in ("label", "verb", "noun"):
                line.pop(field, None)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(line) + "\n" for line in lines))
    label_ids = VideoManifestDataset(str(train), num_frames=4, size=32, hflip=False).label_ids
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(root / "cache")}
    for parallel in ("ddp", "fsdp"):
        result = subprocess.run(
            ["torchrun", "--standalone", "--nproc_per_node", str(WORLD), "-m", "vlmask", "run", str(RECIPE),
             f"data.train={train}", f"run.dir={root / parallel}", f"train.parallel={parallel}", *TINY],
            capture_output=True, text=True, env=env, timeout=300, cwd=root,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "train": train, "label_ids": label_ids, "size": len(lines)}


def checkpoint(runs, parallel: str, step: int) -> dict[str, torch.Tensor]:
    return load_tensors(runs["root"] / parallel / "checkpoints" / f"step_{step:08d}" / "student.safetensors")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_every_step_enqueues_the_keys_of_both_ranks_in_rank_order(runs, parallel):
    """MoCo's concat_all_gather: the pointer moves by world x batch per step, the rows of a step
    hold 2 x 4 distinct new keys, and their labels are rank 0's clips then rank 1's (-1 where
    rank 1's first batch had none), as are their clip identities (queue_clips)."""
    first, second = checkpoint(runs, parallel, 1), checkpoint(runs, parallel, 2)
    per_step = WORLD * BATCH
    for number, state in ((1, first), (2, second)):
        assert int(state[HEAD + "queue_pointer"]) == per_step * number, f"{parallel} step {number}: pointer"
    for name in ("rgb_queue", "flow_queue"):
        before, after = first[HEAD + name], second[HEAD + name]
        keys = after[:2 * per_step]  # step 1's keys (rows 0..7), then step 2's (rows 8..15)
        torch.testing.assert_close(keys.norm(dim=1), torch.ones(2 * per_step))
        assert torch.cdist(keys, keys).add(torch.eye(2 * per_step)).min() > 1e-3, f"{name}: distinct keys"
        torch.testing.assert_close(after[:per_step], before[:per_step], msg=f"{name}: step 1's keys stay")
        assert not torch.isclose(keys[per_step:], before[per_step:2 * per_step]).all(dim=1).any(), \
            f"{name}: step 2 wrote {per_step} new rows"
        torch.testing.assert_close(after[2 * per_step:], before[2 * per_step:], msg=f"{name}: rows not yet reached")
    labels = runs["label_ids"]
    batches = [first_batches(runs["size"], rank) for rank in range(WORLD)]
    expected = [labels[i] if not (step == 0 and rank == 1) else -1
                for step in range(STEPS) for rank in range(WORLD) for i in batches[rank][step]]
    assert expected[BATCH:2 * BATCH] == [-1] * BATCH and min(expected[:BATCH]) >= 0
    queue_labels = checkpoint(runs, parallel, STEPS)[HEAD + "queue_labels"].tolist()
    assert queue_labels == expected + [-1] * (QUEUE - len(expected))
    # the clip identities (manifest rows) travel with the keys, gathered the same way
    clips = [i for step in range(STEPS) for rank in range(WORLD) for i in batches[rank][step]]
    assert checkpoint(runs, parallel, STEPS)[HEAD + "queue_clips"].tolist() == clips + [-1] * (QUEUE - len(clips))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_momentum_update_reaches_every_key_encoder(runs, parallel):
    """key_2 = m key_1 + (1 - m) online_2 for both streams, also on FSDP's sharded parameters."""
    before, after = checkpoint(runs, parallel, 1), checkpoint(runs, parallel, 2)
    pairs = {"encoder.": HEAD + "rgb_key_encoder.", HEAD + "rgb_projection.": HEAD + "rgb_key_projection.",
             HEAD + "flow_encoder.": HEAD + "flow_key_encoder.", HEAD + "flow_projection.": HEAD + "flow_key_projection."}
    moved = 0.0
    for online, key in pairs.items():
        names = [k[len(key):] for k in after if k.startswith(key)]
        assert names, key
        for name in names:
            expected = before[key + name] * MOMENTUM + after[online + name] * (1 - MOMENTUM)
            torch.testing.assert_close(after[key + name], expected, rtol=1e-6, atol=1e-7, msg=key + name)
            moved = max(moved, float((after[key + name] - before[key + name]).abs().max()))
    assert moved > 1e-4, "the key encoders moved (the check above can tell a skipped update)"


def test_fsdp_trains_coclr_like_ddp(runs):
    """Identical queues on every rank make FSDP (no buffer broadcast) agree with DDP (which
    overwrites every rank's buffers with rank 0's at each forward)."""
    read = lambda p: [json.loads(line) for line in (runs["root"] / p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read("ddp"), read("fsdp"), strict=True):
        for key in ("loss", "coclr/rgb", "coclr/flow", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    ddp, fsdp = checkpoint(runs, "ddp", STEPS), checkpoint(runs, "fsdp", STEPS)
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_staged_recipe_that_freezes_a_stream_trains_under_ddp(tiny_synth, tmp_path):
    """coclr.yaml's stage 2 freezes one stream: DDP must not wait for its gradients (the Trainer
    turns find_unused_parameters on for recipes whose stages freeze anything; without it DDP
    fails at the first such stage: "Expected to have finished reduction in the prior iteration")."""
    staged = RECIPE.parent / "coclr.yaml"
    stages = [f"stages.{i}.steps=1" for i in range(5)]
    result = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", str(WORLD), "-m", "vlmask", "run", str(staged),
         f"data.train={tiny_synth[0]}", f"run.dir={tmp_path / 'run'}", *TINY[:-3], "train.max_steps=null", *stages],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "VLMASK_CACHE": str(tmp_path / "cache")},
        timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 5
