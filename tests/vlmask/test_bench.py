"""``vlmask.bench``: FLOP counts pinned to the reference table, throughput keys, the split step."""

from __future__ import annotations

import argparse
import copy
import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from vlmask.bench import (
    CONTRACT_KEYS,
    PHASES,
    add_bench_arguments,
    benchmark,
    bf16_peak_tflops,
    cmd_bench,
    count_flops,
    count_step_flops,
    synthetic_batch,
    timed_step,
)
from vlmask.config import load_recipe
from vlmask.plugins import default_plugins
from vlmask.step import ON_META, TrainStep, build_step

RECIPES = Path(__file__).parents[2] / "recipes"

#: A 1-block, width-32 model on 4 x 32 x 32 clips: every code path, milliseconds per step.
TINY = [
    "device=cpu",
    "train.batch_size=2",
    "data.dataset.num_frames=4",
    "data.dataset.size=32",
    "model.encoder.embed_dim=32",
    "model.encoder.depth=1",
    "model.encoder.num_heads=2",
    "model.predictor.dim=16",
    "model.predictor.depth=1",
    "model.predictor.num_heads=2",
]


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An isolated ``VLMASK_CACHE`` (text-embedding cache, built-in data) for the whole module."""
    cache = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLMASK_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def paper_counts(module_cache: Path) -> dict[str, dict[str, Any]]:
    return {name: count_flops(RECIPES / "paper" / f"{name}.yaml") for name in ("mae", "fils")}


def vit_blocks_forward_gflops(tokens: int, width: int, depth: int) -> float:
    """Hand count of ``depth`` ViT blocks: qkv + proj + 4x MLP = 12 width^2 MACs per token, plus
    QK^T and AV (2 tokens^2 width MACs); 2 FLOPs per MAC."""
    return depth * (24 * tokens * width**2 + 4 * tokens**2 * width) / 1e9


def test_paper_videomae_step_matches_the_reference_table(paper_counts: dict[str, dict[str, Any]]) -> None:
    mae = paper_counts["mae"]
    assert mae["gflops_per_clip"] == pytest.approx(207, rel=0.03)
    assert mae["tokens"] == {"total": 1568, "visible": 160, "predict": 1408}
    parts = mae["breakdown"]
    assert parts["teacher"] == 0.0
    # The encoder sees only the 160 visible tokens (its patch embedding sees every tubelet).
    patch_embed = 2 * 1568 * 768 * (3 * 2 * 16 * 16) / 1e9
    assert parts["encoder_forward"] == pytest.approx(patch_embed + vit_blocks_forward_gflops(160, 768, 12), abs=2e-3)
    # The decoder runs on all 1568 tokens (160 visible + 1408 mask tokens), after a 768 -> 384
    # input projection of the 160 visible features, with a pixel head (384 -> 2*16*16*3) on the 1408.
    decoder = vit_blocks_forward_gflops(1568, 384, 4) + 2 * 160 * 768 * 384 / 1e9 + 2 * 1408 * 384 * 1536 / 1e9
    assert parts["predictor_forward"] == pytest.approx(decoder, abs=2e-3)
    # Backward = 2x forward, except the patch embedding (no gradient for the pixels).
    assert parts["encoder_backward"] == pytest.approx(2 * parts["encoder_forward"] - patch_embed, abs=2e-3)
    total = parts["student_forward"] + parts["student_backward"] + parts["teacher"]
    assert total == pytest.approx(mae["gflops_per_clip"], abs=2e-3)
    forward = patch_embed + vit_blocks_forward_gflops(160, 768, 12) + decoder
    assert mae["gflops_per_clip"] == pytest.approx(3 * forward - patch_embed, abs=5e-3)  # 208.94, the hand count


def test_paper_fils_step_matches_the_reference_table(paper_counts: dict[str, dict[str, Any]]) -> None:
    fils = paper_counts["fils"]
    assert fils["gflops_per_clip"] == pytest.approx(625, rel=0.03)
    parts = fils["breakdown"]
    # The teacher encodes all 1568 tokens, forward only (no graph kept, no backward).
    patch_embed = 2 * 1568 * 768 * (3 * 2 * 16 * 16) / 1e9
    teacher_encoder = patch_embed + vit_blocks_forward_gflops(1568, 768, 12)
    # theta on the teacher's masked-position features: the student's theta without gradient (the
    # default targets.fp.projection=student), so it is counted in the student's forward, with no backward
    target_projection = 2 * 1408 * 768 * 384 / 1e9
    assert parts["teacher"] == pytest.approx(teacher_encoder, abs=2e-3)
    # Only the student's parts are trained: backward is 2x their forward (minus the pixel gradient and the
    # target side's theta, which runs without gradient).
    assert parts["student_backward"] == pytest.approx(2 * (parts["student_forward"] - target_projection) - patch_embed,
                                                      rel=1e-3)
    # Predictor: 768 -> 384 input projection of the visible features, 6 blocks on all tokens,
    # a 384 -> 768 output head on the 1408 predictions; then theta (768 -> 384) on them.
    predictor = vit_blocks_forward_gflops(1568, 384, 6) + 2 * 160 * 768 * 384 / 1e9 + 2 * 1408 * 384 * 768 / 1e9
    assert parts["predictor_forward"] == pytest.approx(predictor, abs=2e-3)
    total = parts["student_forward"] + parts["student_backward"] + parts["teacher"]
    assert total == pytest.approx(fils["gflops_per_clip"], abs=2e-3)
    trained_forward = patch_embed + vit_blocks_forward_gflops(160, 768, 12) + predictor + 2 * 1408 * 768 * 384 / 1e9
    assert fils["gflops_per_clip"] == pytest.approx(  # 626.41, the hand count
        3 * trained_forward - patch_embed + teacher_encoder + target_projection, abs=5e-3)


def test_encoder_flops_follow_the_visible_tokens(module_cache: Path) -> None:
    # Demo grid 4 x 8 x 8: ratio 0.9 masks 57 of 64 positions per slot (28 visible tokens),
    # ratio 0.75 masks 48 (64 visible tokens).
    dense = count_flops(RECIPES / "mae.yaml", ["masker.ratio=0.75"])
    sparse = count_flops(RECIPES / "mae.yaml", ["masker.ratio=0.9"])
    assert (dense["tokens"]["visible"], sparse["tokens"]["visible"]) == (64, 28)
    patch_embed = 2 * 256 * 192 * (3 * 2 * 8 * 8) / 1e9
    for counts, visible in ((dense, 64), (sparse, 28)):
        expected = patch_embed + vit_blocks_forward_gflops(visible, 192, 4)
        assert counts["breakdown"]["encoder_forward"] == pytest.approx(expected, abs=2e-3)
    blocks_ratio = (dense["breakdown"]["encoder_forward"] - patch_embed) / (
        sparse["breakdown"]["encoder_forward"] - patch_embed
    )
    expected_ratio = vit_blocks_forward_gflops(64, 192, 4) / vit_blocks_forward_gflops(28, 192, 4)
    assert blocks_ratio == pytest.approx(expected_ratio, rel=0.02)
    # The decoder always runs on visible + predicted = all 256 tokens.
    assert dense["breakdown"]["predictor_forward"] == pytest.approx(sparse["breakdown"]["predictor_forward"], rel=0.02)


def test_benchmark_reports_every_contract_key(module_cache: Path) -> None:
    result = benchmark(RECIPES / "mae.yaml", TINY, steps=2, warmup=1, split_steps=1)
    for key in CONTRACT_KEYS:
        assert key in result
    for key in ("clips_per_s", "step_ms", "peak_mem_mb", "gflops_per_clip"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["device"] == "cpu" and result["mfu"] is None and result["threads"] >= 1
    assert result["compile"] is False and len(result["warmup_step_ms"]) == 1 and result["warmup_step_ms"][0] > 0
    assert isinstance(result["warmup_overhead_s"], float)
    state = result["training_state_mb_per_rank"]
    assert result["world_size"] == 1 and result["parallel"] == "none"
    assert state["optimizer_state"] == pytest.approx(2 * state["student_parameters"], rel=0.05), "AdamW: two moments"
    assert state["total"] == pytest.approx(sum(v for k, v in state.items() if k != "total"), abs=0.01)
    assert set(result["split_ms"]) == {
        "mask", "student_forward", "teacher", "student_backward", "optimizer", "teacher_update", "hooks"
    }  # fmt: skip
    assert result["split_ms"]["student_backward"] > 0
    json.dumps(result)  # serialisable as is


def test_benchmark_through_the_data_loader(module_cache: Path, tmp_path: Path) -> None:
    from vlmask_plugins.data.synthetic import generate

    train, _ = generate(tmp_path / "synth", clips=6, seed=3, frames=8, size=32, progress=False)
    overrides = [*TINY, f"data.train={train}", "data.num_workers=0", f"run.dir={tmp_path / 'run'}"]
    result = benchmark(RECIPES / "fils.yaml", overrides, steps=2, warmup=1, split_steps=1, loader=True)
    assert result["data"] == "loader" and result["data_ms"] >= 0 and result["clips_per_s"] > 0
    assert result["split_ms"]["teacher"] > 0  # FILS has an EMA teacher
    assert not (tmp_path / "run").exists()  # benchmarking writes no run directory


def test_the_synthetic_batch_has_the_views_the_recipe_s_data_gives(module_cache: Path) -> None:
    """Flow and a second clip only where the dataset gives them (CoCLR): a MAE benchmark must not
    hold three unused clip-sized tensors on the device, in its peak memory."""
    coclr = [o for o in TINY if not o.startswith("model.predictor.")]  # CoCLR has no predictor
    for recipe, overrides, views in (("mae.yaml", TINY, set()),
                                     ("coclr/infonce.yaml", coclr, {"flow", "second_video", "second_flow"})):
        with build_step(load_recipe(RECIPES / recipe, overrides), default_plugins(), process=ON_META) as train_step:
            batch = synthetic_batch(train_step, 2, "cpu")
        present = {view for view in ("flow", "second_video", "second_flow") if getattr(batch, view) is not None}
        assert present == views, recipe
        assert all(getattr(batch, view).shape == batch.video.shape for view in present)
    key_crop = [*coclr, "data.dataset.second_clip=false", "heads.coclr.key_view=crop"]
    recipe = load_recipe(RECIPES / "coclr" / "infonce.yaml", key_crop)
    with build_step(recipe, default_plugins(), process=ON_META) as train_step:
        batch = synthetic_batch(train_step, 2, "cpu")
        assert batch.flow is not None and batch.second_video is None and batch.second_flow is None
        assert count_step_flops(train_step, 2)["gflops_per_clip"] > 0  # the crop key view steps without a second clip


def test_the_split_times_the_engine_step_itself_in_its_phases(module_cache: Path) -> None:
    """``timed_step`` runs ``TrainStep.step`` (no copy): from the same state it leaves the
    same parameters, teacher and optimizer state as an untimed step, and reports a time for
    every phase of :data:`PHASES`. How much of the call the phases cover is a measurement, not
    asserted here (timing is never asserted in tests): ``vlmask bench`` reports it as
    ``split_total_ms`` beside ``split_step_ms`` (benchmarks/README.md)."""
    with build_step(load_recipe(RECIPES / "fils.yaml", TINY), default_plugins()) as train_step:
        batch = synthetic_batch(train_step, 2, train_step.device, seed=5)
        start = (copy.deepcopy(train_step.student.state_dict()), copy.deepcopy(train_step.teacher.state_dict()),
                 copy.deepcopy(train_step.optimizer.state_dict()))  # fmt: skip

        def restore() -> None:
            train_step.student.load_state_dict(start[0])
            train_step.teacher.load_state_dict(start[1])
            train_step.optimizer.load_state_dict(copy.deepcopy(start[2]))

        train_step.step(batch, 3)
        engine = (copy.deepcopy(train_step.student.state_dict()), copy.deepcopy(train_step.teacher.state_dict()))
        restore()
        phases = timed_step(train_step, batch, 3)
        assert train_step.phase_watch is None  # removed after the timed call
        wall = phases.pop("step")
        assert set(phases) == set(PHASES)
        assert all(phases[k] > 0 for k in ("mask", "student_forward", "teacher", "student_backward", "optimizer", "teacher_update"))
        assert wall > 0
        for expected, module in zip(engine, (train_step.student, train_step.teacher)):
            for name, value in module.state_dict().items():
                assert torch.equal(value, expected[name]), name
        assert any(not torch.equal(v, start[0][k]) for k, v in train_step.student.state_dict().items())  # it trained


def test_cli_prints_one_json_object_and_writes_out(module_cache: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="vlmask")  # wired as the engine's CLI wires it
    add_bench_arguments(parser.add_subparsers(dest="command").add_parser("bench"))
    out = tmp_path / "flops.json"
    # The contract's order: options after RECIPE, overrides after options.
    args = parser.parse_args(["bench", str(RECIPES / "mae.yaml"), "--flops", "--out", str(out), "masker.ratio=0.75"])
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert cmd_bench(args) == 0
    printed = json.loads(stdout.getvalue())
    assert printed["gflops_per_clip"] > 0 and printed["tokens"]["visible"] == 64
    assert json.loads(out.read_text()) == printed


def test_bf16_peaks() -> None:
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("Tesla T4") is None
