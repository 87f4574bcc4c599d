"""A real two-process gloo run of the video-text head: the gathered loss equals the
single-process loss on the concatenated batch, and DDP-averaged gradients equal its gradients."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def test_two_process_gather_matches_single_process_on_the_concatenated_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned processes inherit sys.path
    workers = importlib.import_module("gloo_video_text_worker")
    world = workers.WORLD
    mp.spawn(workers.worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    single = workers.loss_and_grads(slice(0, 6))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for result in ranks:
        torch.testing.assert_close(result["loss"], single["loss"])  # every rank: the global loss
        for name in ("theta_weight", "theta_bias", "logit_scale"):
            torch.testing.assert_close(result[name], single[name])
    # the local features' gradient is world-size times their single-process slice, which
    # DDP's averaging of the encoder's parameter gradients turns back into the slice
    torch.testing.assert_close(ranks[0]["features"], world * single["features"][:3])
    torch.testing.assert_close(ranks[1]["features"], world * single["features"][3:])
    # the fallback rate is local to each rank's clips (clip 2 of every 3 has no visible token inside)
    assert [r["fallback_rate"].item() for r in ranks] == [pytest.approx(1 / 3)] * world
