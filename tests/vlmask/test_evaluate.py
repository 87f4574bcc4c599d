"""vlmask.evaluate end to end at tiny scale: eval.json, embed, compare (contract: "eval.json",
"comparison.json", ``vlmask embed``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlmask.config import RecipeError, load_recipe
from vlmask.engine import Trainer
from vlmask.compare import compare
from vlmask.evaluate import embed_manifest, evaluate_run

RECIPES = Path(__file__).parents[2] / "recipes"


class OneThread:
    """Tiny matrix products stall when two threads compete for two busy cores."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with OneThread():
        yield


@pytest.fixture(scope="module")
def tiny_data(tiny_synth, tiny_scale) -> tuple[Path, Path, list[str]]:
    """(train, val, the shared tiny-scale overrides of tests/conftest.py)."""
    return (*tiny_synth, tiny_scale)


def tiny_overrides(data: tuple[Path, Path, list[str]], steps: int = 3) -> list[str]:
    """The shared tiny scale with a val manifest and without run.dir."""
    train, val, scale = data
    return [*scale, f"data.train={train}", f"data.val={val}", f"train.max_steps={steps}",
            "train.log_every=1", "train.ckpt_every=3"]


@pytest.fixture(scope="module")
def mae_run(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "mae"
    with OneThread():
        with Trainer(load_recipe(RECIPES / "mae.yaml", [*tiny_overrides(tiny_data), f"run.dir={run_dir}"])) as trainer:
            trainer.train()
    return run_dir


def fraction_of(value: float, clips: int) -> bool:
    """Whether an accuracy is k / clips for some k in 0..clips (a real count over the clips)."""
    return 0 <= round(value * clips) <= clips and value * clips == pytest.approx(round(value * clips), abs=1e-6)


def test_eval_writes_the_contract_eval_json_and_reuses_cached_features(mae_run, tiny_data):
    result = evaluate_run(mae_run, progress=False)
    saved = json.loads((mae_run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["checkpoint"] == "checkpoints/step_00000003"
    assert (mae_run / saved["checkpoint"]).is_dir()
    assert saved["num_classes"] == 18  # 18 training clips, classes cycle: one clip per class
    assert saved["chance_top1"] == pytest.approx(1 / 18)
    val_clips = len(tiny_data[1].read_text().splitlines())
    for section in ("linear_probe", "linear_probe_temporal", "knn", "attentive_probe"):
        assert fraction_of(saved[section]["top1"], val_clips), (section, saved[section]["top1"])
    # the synthetic manifests carry verb and noun
    assert {"top1", "verb_top1", "noun_top1"} == set(saved["linear_probe"]) == set(saved["attentive_probe"])
    # mae.yaml has no text encoder and no projection: these sections cannot be computed
    assert "retrieval" not in saved and "zero_shot" not in saved
    assert saved["data"]["train_clips"] == 18 and saved["data"]["val_clips"] == 6
    assert saved["evaluators"]["knn"] == {"name": "knn"}  # the settings behind each section
    assert set(saved["evaluators"]) == {"linear_probe", "linear_probe_temporal", "knn", "attentive_probe"}

    cached = sorted((mae_run / "features").glob("*.safetensors"))
    assert len(cached) == 6  # (train, val) x (mean, temporal, tokens)
    tokens = load_file(str(next(p for p in cached if p.name.endswith("-tokens.safetensors"))))["features"]
    assert tokens.dtype == torch.float16 and tokens.ndim == 3 and tokens.shape[1] <= 64  # the probe's token budget
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = evaluate_run(mae_run, progress=False)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not extracted again
    assert again == result


def test_eval_sections_and_evaluator_settings_come_from_the_recipe(mae_run):
    dropped = evaluate_run(mae_run, ["evaluation.evaluators.linear_probe_temporal=null"], progress=False)
    assert "linear_probe_temporal" not in dropped and {"linear_probe", "knn"} <= set(dropped)
    only_knn = evaluate_run(mae_run, ["evaluation.evaluators.knn.k=1", "evaluation.evaluators.linear_probe=null"],
                            evaluators=["knn"], progress=False)
    assert only_knn["linear_probe"] == dropped["linear_probe"]  # kept from eval.json of the same checkpoint
    assert only_knn["evaluators"]["knn"] == {"name": "knn", "k": 1}
    assert only_knn["evaluators"]["linear_probe"] == {"name": "linear_probe"}
    assert set(only_knn) == set(dropped)
    assert json.loads((mae_run / "eval.json").read_text()) == json.loads(json.dumps(only_knn))
    with pytest.raises(ValueError, match="unknown evaluation section"):
        evaluate_run(mae_run, evaluators=["no_such_section"], progress=False)
    with pytest.raises(RecipeError, match=r"evaluation\.evaluators\.knn\.kk.*has no argument 'kk'"):
        evaluate_run(mae_run, ["evaluation.evaluators.knn.kk=3"], progress=False)
    with pytest.raises(RecipeError, match="k must be >= 1"):
        evaluate_run(mae_run, ["evaluation.evaluators.knn.k=0"], progress=False)


def test_embed_writes_one_row_per_manifest_line_in_order(mae_run, tiny_data, tmp_path):
    _, val, _ = tiny_data
    good = val.read_text().splitlines()
    lines = good[:2] + ["{not json"] + good[2:4] + ['{"video": "videos/missing.mp4"}'] + good[4:]
    manifest = val.with_name("with_bad_lines.jsonl")
    manifest.write_text("\n".join(lines) + "\n")

    reference = np.load(embed_manifest(mae_run, val, tmp_path / "val", progress=False))
    assert reference.shape == (6, 32) and np.isfinite(reference).all()
    out = embed_manifest(mae_run, manifest, tmp_path / "bad.npy", progress=False)
    rows = np.load(out)
    assert out == tmp_path / "bad.npy" and rows.shape == (8, 32) and rows.dtype == np.float32
    bad = [2, 5]  # 0-based rows of lines 3 and 6
    assert np.isnan(rows[bad]).all()
    assert np.allclose(np.delete(rows, bad, axis=0), reference, atol=1e-5)  # good lines, in manifest order
    info = json.loads((tmp_path / "bad.json").read_text())
    assert [r["line"] for r in info["nan_rows"]] == [3, 6]
    assert "invalid JSON" in info["nan_rows"][0]["reason"] and "not found" in info["nan_rows"][1]["reason"]


def test_compare_writes_the_table_and_reuses_finished_runs(tiny_data, tmp_path):
    out_dir = tmp_path / "cmp"
    overrides = tiny_overrides(tiny_data, steps=2)
    out = compare([str(RECIPES / "mae.yaml")], overrides, seeds=[0, 1], out_dir=out_dir, progress=False)
    assert out == out_dir
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["overrides"] == overrides
    runs = comparison["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [("mae", 0), ("mae", 1)]
    for run in runs:
        assert run["recipe"] == str(RECIPES / "mae.yaml")
        assert run["summary"]["steps"] == 2 and "knn" in run["eval"]
        assert run["eval"] == json.loads((Path(run["run_dir"]) / "eval.json").read_text())
    table = (out / "comparison.md").read_text()
    assert "| mae | 2 |" in table and "knn.top1" in table and "±" in table and "clips/s" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    watched = [Path(r["run_dir"]) / name for r in runs for name in ("summary.json", "eval.json")]
    stamps = [p.stat().st_mtime_ns for p in watched]
    compare([str(RECIPES / "mae.yaml")], overrides, seeds=[0, 1], out_dir=out_dir, progress=False)
    assert [p.stat().st_mtime_ns for p in watched] == stamps  # neither retrained nor re-evaluated
    assert json.loads((out / "comparison.json").read_text())["runs"] == runs

    with pytest.raises(ValueError, match=r"mae-seed0 was trained with other settings: masker\.ratio: 0\.9 in the run, 0\.8 now"):
        compare([str(RECIPES / "mae.yaml")], [*overrides, "masker.ratio=0.8"], seeds=[0], out_dir=out_dir, progress=False)
    with pytest.raises(ValueError, match="mae-seed0 finished at train.max_steps=2, the compare asks 4; a compare does not continue"):
        compare([str(RECIPES / "mae.yaml")], [*overrides, "train.max_steps=4"], seeds=[0], out_dir=out_dir, progress=False)


@pytest.mark.gpu
def test_eval_on_cuda_gives_the_same_sections(tiny_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run_dir = tmp_path / "cuda"
    overrides = [o for o in tiny_overrides(tiny_data) if o != "device=cpu"] + ["device=cuda", f"run.dir={run_dir}"]
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        trainer.train()
    on_cuda = evaluate_run(run_dir, progress=False)  # bf16 autocast extraction, probes on CUDA
    on_cpu = evaluate_run(run_dir, ["device=cpu"], progress=False)
    assert set(on_cuda) == set(on_cpu)
    val_clips = len(tiny_data[1].read_text().splitlines())
    for section in ("linear_probe", "knn"):
        assert fraction_of(on_cuda[section]["top1"], val_clips)
    files = sorted((run_dir / "features").glob("*.safetensors"))
    assert len(files) == 8  # cached per device: (train, val) x 2 poolings x 2 devices
    pairs: dict[tuple[str, str], list[torch.Tensor]] = {}
    for path in files:  # <checkpoint>-<manifest>-<settings key>-<pooling>
        parts = path.stem.split("-")
        pairs.setdefault((parts[1], parts[-1]), []).append(load_file(path)["features"].float())
    for (manifest, pooling), (first, second) in pairs.items():  # bf16 CUDA features ~ fp32 CPU features
        similarity = torch.nn.functional.cosine_similarity(first, second, dim=1)
        assert bool((similarity > 0.99).all()), (manifest, pooling, similarity.min().item())


def test_eval_records_its_settings_keeps_other_evaluations_and_merges_only_the_same_data(mae_run, tiny_data):
    """eval.json ``settings`` (contract: "eval.json"): an eval.json of other settings is kept as
    eval-<hash>.json, one of the same settings is replaced; a partial evaluation keeps only
    sections made on the same data."""
    _, val, _ = tiny_data
    fast = ["evaluation.evaluators.attentive_probe=null", "evaluation.evaluators.linear_probe_temporal=null"]
    before = set(mae_run.glob("eval-*.json"))
    first = evaluate_run(mae_run, fast, progress=False)
    settings = first["settings"]
    assert settings["evaluation"]["evaluators"]["knn"] == {
        "name": "knn", "k": 20, "temperature": 0.07, "voting": "weighted", "pooling": "mean", "chunk": 1024, "device": "auto"}
    assert set(settings["evaluation"]["evaluators"]) == {"linear_probe", "knn", "retrieval", "zero_shot"}  # asked, even if absent
    assert settings["data"]["val"] == str(val.resolve()) and len(settings["data"]["val_sha256"]) == 64
    assert settings["data"]["dataset"]["num_frames"] == 4 and (settings["device"], settings["precision"]) == ("cpu", "fp32")
    made = set(mae_run.glob("eval-*.json"))
    evaluate_run(mae_run, fast, progress=False)
    assert set(mae_run.glob("eval-*.json")) == made  # the same evaluation again: replaced, nothing kept

    only_knn = evaluate_run(mae_run, [*fast, "evaluation.evaluators.knn.k=1"], evaluators=["knn"], progress=False)
    assert only_knn["linear_probe"] == first["linear_probe"]  # same checkpoint and data: kept
    assert only_knn["settings"]["evaluation"]["evaluators"]["linear_probe"] == settings["evaluation"]["evaluators"]["linear_probe"]
    new = set(mae_run.glob("eval-*.json")) - made
    assert len(new) == 1 and json.loads(next(iter(new)).read_text()) == first  # the k=20 evaluation, kept

    part = val.with_name("val_first_four.jsonl")
    part.write_text("\n".join(val.read_text().splitlines()[:4]) + "\n")
    other_data = evaluate_run(mae_run, [*fast, f"data.val={part}"], evaluators=["knn"], progress=False)
    assert "linear_probe" not in other_data  # made on the other val manifest: not mixed in
    assert set(other_data["settings"]["evaluation"]["evaluators"]) == {"knn"}
    assert other_data["settings"]["data"]["val"] == str(part.resolve()) and other_data["data"]["val_clips"] == 4
    assert len(set(mae_run.glob("eval-*.json")) - before) >= 2


@pytest.mark.parametrize("theirs", ['{"labels": ["a", "b"]}\n', "not JSON at all\n", '{"written_by": "someone else"}\n'],
                         ids=["json", "text", "other-writer"])
def test_embed_never_overwrites_a_json_beside_the_array_that_vlmask_did_not_write(theirs, mae_run, tiny_data, tmp_path,
                                                                                 capsys):
    """Issue 22.4: ``--out features.npy`` replaced a user's features.json without a word."""
    from vlmask.cli import main

    theirs_path = tmp_path / "features.json"
    theirs_path.write_text(theirs)
    assert main(["embed", str(mae_run), str(tiny_data[1]), "--out", str(tmp_path / "features.npy")]) == 1
    err = capsys.readouterr().err
    assert f"FileExistsError: {theirs_path} exists and was not written by vlmask embed" in " ".join(err.split()), err
    assert "Traceback" not in err
    assert theirs_path.read_text() == theirs and not (tmp_path / "features.npy").exists()  # nothing written


def test_embed_replaces_the_json_it_wrote_itself_marked_or_from_an_older_vlmask(mae_run, tiny_data, tmp_path, capsys):
    from vlmask.cli import main

    out, sidecar = tmp_path / "features.npy", tmp_path / "features.json"
    argv = ["embed", str(mae_run), str(tiny_data[1]), "--out", str(out)]
    assert main(argv) == 0
    first = json.loads(sidecar.read_text())
    assert first["written_by"] == "vlmask embed" and first["rows"] == 6
    assert main([*argv, "--pooling", "temporal"]) == 0  # its own file: replaced
    assert json.loads(sidecar.read_text())["pooling"] == "temporal"
    older = {k: v for k, v in first.items() if k not in ("written_by", "features")}  # as a vlmask before the mark wrote it
    sidecar.write_text(json.dumps(older))
    assert main(argv) == 0 and json.loads(sidecar.read_text()) == first
    capsys.readouterr()


# --------------------------------------------------------------------------- evaluation.features: context

#: The cheap sections: the context tests compare features, not probes.
FAST = ["evaluation.evaluators.attentive_probe=null", "evaluation.evaluators.linear_probe_temporal=null"]


@pytest.fixture(scope="module")
def dpc_run(tiny_data, tmp_path_factory) -> Path:
    """DPC as published (recipes/dpc_faithful.yaml, the ``future`` predictor), 3 steps at tiny
    scale with 8 frames: 4 temporal slots, 2 of context and 2 predicted."""
    run_dir = tmp_path_factory.mktemp("runs") / "dpc"
    overrides = [*tiny_overrides(tiny_data), "data.dataset.num_frames=8", f"run.dir={run_dir}"]
    with OneThread():
        with Trainer(load_recipe(RECIPES / "dpc_faithful.yaml", overrides)) as trainer:
            trainer.train()
    return run_dir


def cached_features(run_dir: Path) -> dict[tuple[str, str, str], torch.Tensor]:
    """Every file of the run's feature cache by (features of its key, manifest stem, pooling)."""
    found = {}
    for path in sorted((run_dir / "features").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            found[(json.loads(metadata["settings"]).get("features"), Path(metadata["manifest"]).stem,
                   metadata["pooling"])] = handle.get_tensor("features")
    return found


def context_by_hand(run_dir: Path, manifest: Path) -> torch.Tensor:
    """The thesis' evaluation embedding (sec. 3.4, line 678) of every clip, computed from the
    checkpoint's weights through the predictor's own layers: encoder tokens of the whole clip,
    the aggregating transformer on all of them, its final LayerNorm, the last temporal slot,
    mean over its spatial positions."""
    from vlmask.data_loading import collate_of
    from vlmask.evaluate import eval_dataset
    from vlmask.runs import open_run

    run = open_run(run_dir)
    weights = load_file(str(run.checkpoint / "student.safetensors"))
    transformer = run.student.predictor.aggregate
    assert torch.equal(transformer.embed.weight, weights["predictor.aggregate.embed.weight"])  # the checkpoint's
    dataset = eval_dataset(run, manifest)
    batch = collate_of(dataset)([dataset[i] for i in range(len(dataset))]).to(run.device)
    grid = run.student.encoder.grid
    with torch.no_grad():
        tokens = transformer.embed(run.student.encoder(batch.video)) + transformer.pos_embed
        for block in transformer.blocks:
            tokens = block(tokens)
        return transformer.norm(tokens)[:, -grid.h * grid.w:].mean(dim=1)


def test_context_features_are_the_predictors_context_cached_apart_from_the_encoders(dpc_run, tiny_data, tmp_path):
    """``evaluation.features: context`` probes DPC's c_T (thesis eq. 2.2, sec. 3.4): the features
    equal the context computed by hand from the checkpoint, differ from the encoder's, live under
    another cache key (the encoder's, extracted first, are never read for them), and eval.json,
    its settings and vlmask embed's record say which were probed."""
    _, val, _ = tiny_data
    encoder = evaluate_run(dpc_run, FAST, progress=False)  # first: the encoder's features fill the cache
    context = evaluate_run(dpc_run, [*FAST, "evaluation.features=context"], progress=False)
    assert (encoder["features"], context["features"]) == ("encoder", "context")
    assert "features" not in encoder["settings"]["evaluation"]  # as every eval.json before the setting: reusable
    assert context["settings"]["evaluation"]["features"] == "context"
    assert json.loads(json.dumps(encoder)) in [json.loads(p.read_text()) for p in dpc_run.glob("eval-*.json")]  # kept

    cached = cached_features(dpc_run)
    assert {k[0] for k in cached} == {"encoder", "context"}
    expected = context_by_hand(dpc_run, val)
    assert torch.allclose(cached[("context", val.stem, "mean")], expected, atol=1e-5)
    assert not torch.allclose(cached[("encoder", val.stem, "mean")], expected, atol=1e-2)
    stems = {f: {p.name.rsplit("-", 1)[0] for p in (dpc_run / "features").glob("*.safetensors")
                 if json.loads(safe_open(str(p), framework="pt").metadata()["settings"])["features"] == f}
             for f in ("encoder", "context")}
    assert not stems["encoder"] & stems["context"]  # other files, not only other metadata

    out = embed_manifest(dpc_run, val, tmp_path / "context.npy", ["evaluation.features=context"], progress=False)
    assert np.allclose(np.load(out), expected.numpy(), atol=1e-5)
    assert json.loads(out.with_suffix(".json").read_text())["features"] == "context"
    plain = embed_manifest(dpc_run, val, tmp_path / "encoder.npy", progress=False)
    assert json.loads(plain.with_suffix(".json").read_text())["features"] == "encoder"
    assert np.allclose(np.load(plain), cached[("encoder", val.stem, "mean")].numpy())


def test_a_partial_context_evaluation_keeps_no_section_of_an_encoder_one(dpc_run):
    """``vlmask eval --only`` merges the other sections of an eval.json of the same settings only:
    never the encoder's numbers into a context evaluation."""
    evaluate_run(dpc_run, FAST, progress=False)
    only_knn = evaluate_run(dpc_run, [*FAST, "evaluation.features=context"], evaluators=["knn"], progress=False)
    assert "knn" in only_knn and "linear_probe" not in only_knn
    again = evaluate_run(dpc_run, [*FAST, "evaluation.features=context"], evaluators=["linear_probe"], progress=False)
    assert again["knn"] == only_knn["knn"]  # the context evaluation's own section is kept


def test_context_for_a_predictor_without_it_is_one_line_naming_file_and_key(mae_run, capsys):
    from vlmask.cli import main

    assert main(["eval", str(mae_run), "evaluation.features=context"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("command line: evaluation.features=context: key evaluation.features: 'context' probes the predictor's "
            "aggregated context c_t (DPC, MemDPC), and predictor 'transformer'") in err, err
    assert "Traceback" not in err


def test_a_predictor_made_by_a_factory_function_is_checked_for_context_once_built():
    """validate cannot read a factory function's product (vlmask.kinds.offers_context: None);
    the built predictor is checked before any feature is extracted: one line naming file and key."""
    from types import SimpleNamespace

    from vlmask.evaluate import context_of
    from vlmask.kinds import offers_context
    from vlmask.sections import EvaluationSettings
    from vlmask.types import TokenGrid
    from vlmask_plugins.encoders.future_predictor import FuturePredictor
    from vlmask_plugins.encoders.predictor import TransformerPredictor

    def transformer_factory(**arguments):
        return TransformerPredictor(**arguments)

    assert offers_context(transformer_factory) is None
    recipe = load_recipe(RECIPES / "mae.yaml", ["evaluation.features=context"])
    grid = TokenGrid(t=2, h=1, w=1)
    plain = SimpleNamespace(recipe=recipe, student=SimpleNamespace(predictor=transformer_factory(
        encoder_dim=4, grid=grid, dim=4, depth=1, num_heads=1)))
    context = EvaluationSettings(batch_size=1, num_workers=0, evaluators={}, features="context")
    with pytest.raises(RecipeError) as refused:
        context_of(plain, context)
    assert refused.value.problems == [
        "command line: evaluation.features=context: key evaluation.features: 'context' probes the predictor's "
        "aggregated context c_t, and this run's predictor (TransformerPredictor) offers none (vlmask.kinds.ContextFeatures)"]
    future = FuturePredictor(encoder_dim=4, grid=grid, dim=4, depth=1, num_heads=1)
    assert context_of(SimpleNamespace(recipe=recipe, student=SimpleNamespace(predictor=future)), context) is future
    assert context_of(plain, EvaluationSettings(batch_size=1, num_workers=0, evaluators={})) is None  # encoder
