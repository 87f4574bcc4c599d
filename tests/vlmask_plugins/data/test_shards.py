"""Streamed shards: ``vlmask data shard`` and dataset ``video_shards`` (real clips, real tars,
real DataLoader workers; ranks simulated by arguments)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("webdataset")

from vlmask_plugins.data.shards import VideoShardsDataset, rank_positions, write_shards  # noqa: E402

RECIPES = Path(__file__).parents[3] / "recipes"


@pytest.fixture(scope="module")
def shards(tiny_synth, tmp_path_factory) -> Path:
    """The 18 training clips of tiny_synth in 5 shards of at most 4 (the last one holds 2)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(tiny_synth[0], out, shard_size=4, seed=0)
    return out


def dataset(source: str | Path, **kw) -> VideoShardsDataset:
    return VideoShardsDataset(str(source), num_frames=2, size=32, hflip=False, decoder="pyav", **kw)


def epoch_batches(ds: VideoShardsDataset, batch: int, seed: int, rank: int, world: int, epoch: int,
                  workers: int, start_sample: int = 0) -> list[list[int]]:
    """The clip indices of every batch one rank's loader yields (the engine's loader settings)."""
    ds.plan(batch, seed, rank, world)
    ds.epoch, ds.start_sample = epoch, start_sample
    loader = DataLoader(ds, batch_size=batch, drop_last=True, num_workers=workers, collate_fn=ds.collate,
                        persistent_workers=False)
    return [b.index.tolist() for b in loader]


def test_shard_command_writes_webdataset_tars_with_each_clip_and_its_manifest_line(tiny_synth, tmp_path, capsys):
    from vlmask.cli import main

    assert main(["data", "shard", str(tiny_synth[0]), "--out", str(tmp_path / "s"), "--shard-size", "7"]) == 0
    assert "wrote 18 clips in 3 shards" in capsys.readouterr().out
    index = json.loads((tmp_path / "s" / "shards.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [7, 7, 4] and index["samples"] == 18
    source = {Path(json.loads(line)["video"]).name: json.loads(line) for line in tiny_synth[0].read_text().splitlines()}
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.json", "000000000.mp4"]
        row = json.loads(tar.extractfile("000000000.json").read())
        video = tar.extractfile("000000000.mp4").read()
    original = source[Path(row["video"]).name]
    assert row["caption"] == original["caption"] and row["label"] == original["label"]
    assert video == (tiny_synth[0].parent / original["video"]).read_bytes()
    assert row["info"]["num_frames"] == 8 and row["line"] >= 1


def test_shard_command_leaves_out_bad_lines_and_refuses_a_folder_with_shards(tiny_synth, tmp_path):
    lines = tiny_synth[0].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    bad.write_text("\n".join([lines[0], json.dumps({"video": "broken.mp4"}), "{not json", lines[1]]) + "\n")
    for row in map(json.loads, lines[:2]):  # the good lines' videos beside the manifest
        (tmp_path / row["video"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / row["video"]).write_bytes((tiny_synth[0].parent / row["video"]).read_bytes())
    report = write_shards(bad, tmp_path / "out", shard_size=10)
    assert report.clips == 2 and [s.line for s in report.skipped] == [2, 3]
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(bad, tmp_path / "out")


def test_every_clip_once_per_epoch_across_two_ranks_of_two_workers(shards):
    ds = dataset(shards)
    for epoch in (0, 1):
        per_rank = [epoch_batches(ds, batch=3, seed=5, rank=r, world=2, epoch=epoch, workers=2) for r in (0, 1)]
        assert [len(b) for b in per_rank] == [3, 3]  # equal steps per rank: 18 clips / (3 x 2)
        seen = Counter(i for batches in per_rank for batch in batches for i in batch)
        assert sorted(seen) == list(range(18)) and set(seen.values()) == {1}
    # the order is a function of (seed, epoch), not of the number of workers
    one = epoch_batches(ds, batch=3, seed=5, rank=1, world=2, epoch=1, workers=0)
    assert epoch_batches(ds, batch=3, seed=5, rank=1, world=2, epoch=1, workers=2) == one
    assert epoch_batches(ds, batch=3, seed=5, rank=1, world=2, epoch=0, workers=0) != one


def test_a_resumed_epoch_sees_the_same_clips_and_pixels_from_the_sample_on(shards):
    ds = dataset(shards, train=True)
    whole = epoch_batches(ds, batch=2, seed=1, rank=0, world=2, epoch=3, workers=2)
    assert epoch_batches(ds, batch=2, seed=1, rank=0, world=2, epoch=3, workers=2, start_sample=4) == whole[2:]

    ds.plan(2, 1, 0, 2)
    ds.epoch = 3
    positions = rank_positions(ds.counts, 1, 3, 0, 2)
    uninterrupted = {item["index"]: item["video"] for item in DataLoader(ds, batch_size=None, num_workers=2)}
    ds.start_sample = 5  # not on a batch boundary: the clips from sample 5 on, each with its own augmentation
    resumed = {item["index"]: item["video"] for item in DataLoader(ds, batch_size=None, num_workers=2)}
    expected = [ds.offsets[shard] + j for shard, j in positions[5:8]]
    assert sorted(resumed) == sorted(expected)
    assert all(torch.equal(resumed[i], uninterrupted[i]) for i in resumed)


def test_brace_patterns_and_urls_read_the_same_clips(shards):
    by_folder = dataset(shards, train=False)  # evaluation crops: the same pixels every time
    by_pattern = dataset(f"{shards}/shard-{{000000..000004}}.tar", train=False)
    by_url = dataset(f"file://{shards}/shard-{{000000..000004}}.tar", train=False)
    assert by_folder.counts == by_pattern.counts == by_url.counts == [4, 4, 4, 4, 2]
    first = by_folder[7]
    assert first["index"] == 7 and first["video"].shape == (3, 2, 32, 32) and first["video"].dtype == torch.uint8
    assert torch.equal(by_url[7]["video"], first["video"]) and by_url[7]["caption"] == first["caption"]
    assert by_folder.captions == by_pattern.captions and len(by_folder.captions) == 18


def test_missing_shards_and_an_index_of_another_format_are_one_line_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shard-000005\.tar does not exist \(5 of 10 missing\)"):
        dataset(f"{shards}/shard-{{000000..000009}}.tar")
    (tmp_path / "shards.json").write_text(json.dumps({"format": "other", "shards": []}))
    with pytest.raises(ValueError, match="key format: not a vlmask-shards/1 shard index"):
        dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no shard index here"):
        dataset(tmp_path / "nothing")


def test_a_run_trains_from_shards(shards, tiny_scale, tmp_path):
    from vlmask.config import load_recipe
    from vlmask.engine import Trainer

    overrides = [*tiny_scale, f"data.train={shards}", "data.dataset.name=video_shards",
                 f"run.dir={tmp_path / 'run'}", "train.max_steps=3", "train.log_every=1", "train.ckpt_every=3",
                 "data.num_workers=2"]
    with Trainer(load_recipe(RECIPES / "mae.yaml", overrides)) as trainer:
        assert trainer.data.batches is trainer.data.dataset and trainer.data.steps_per_epoch == 4
        summary = trainer.train()
    assert summary["steps"] == 3
    assert (tmp_path / "run" / "config.yaml").read_text().count("video_shards") >= 1


# ---------------------------------------------------------------------------- mixture


def test_a_mixture_draws_each_source_by_weight_reproducibly(tiny_synth, shards):
    from vlmask_plugins.data.mixture import MixtureDataset

    def mixture(seed: int) -> MixtureDataset:
        return MixtureDataset(str(tiny_synth[1]), sources=[{"path": f"{shards}/shard-{{000000..000004}}.tar", "weight": 1}],
                              weight=3, seed=seed, num_frames=2, size=32, hflip=False, decoder="pyav", train=False)

    mix = mixture(0)  # 6 val clips at weight 3, 18 shard clips at weight 1: 24 draws, 18 and 6
    assert [(m["clips"], m["draws"]) for m in mix.mix] == [(6, 18), (18, 6)]
    assert mix.table == mixture(0).table and mix.table != mixture(1).table
    item = mix[len(mix) - 1]
    assert item["index"] == len(mix) - 1 and item["caption"] == mix.captions[-1] and item["video"].shape == (3, 2, 32, 32)


@pytest.mark.parametrize("sources, weight, message", [
    ([{"path": "nowhere.jsonl", "weight": 1}], 1, r"sources\[0\]\.path: no such manifest or shard set: nowhere.jsonl"),
    ([{"path": "SHARDS", "weight": 0}], 1, r"sources\[0\]\.weight: must be a number > 0, got 0"),
    ([{"path": "SHARDS", "weight": -2}], 1, r"sources\[0\]\.weight: must be a number > 0, got -2"),
    ([{"path": "SHARDS", "weight": 1}], 0, r"^weight: must be a number > 0, got 0"),
    ([{"path": "SHARDS"}, {"path": "SHARDS", "wieght": 1}], 1, r"sources\[1\]: needs path and weight only"),
])
def test_a_mixture_names_the_bad_entry(tiny_synth, shards, sources, weight, message):
    from vlmask_plugins.data.mixture import MixtureDataset

    sources = [{k: (str(shards) if v == "SHARDS" else v) for k, v in s.items()} for s in sources]
    with pytest.raises(ValueError, match=message):
        MixtureDataset(str(tiny_synth[1]), sources=sources, weight=weight, num_frames=2, size=32)


def test_a_mixture_of_empty_sources_is_refused_naming_the_source(tiny_synth, tmp_path):
    from vlmask_plugins.data.mixture import MixtureDataset

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"sources\[0\]\.path: manifest .*empty.jsonl has no usable clip \(it is empty\)"):
        MixtureDataset(str(tiny_synth[1]), sources=[{"path": str(empty), "weight": 1}], num_frames=2, size=32)
