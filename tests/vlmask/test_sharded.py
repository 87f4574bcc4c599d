"""Sharded checkpoints (``vlmask.sharded``) in one process: layout, atomic writes, faults (a kill
mid-write, a full disk, truncated or missing shards) and hostile files (pickles that would run
code, lying headers), each a one-line ``CheckpointError`` with nothing executed. Two-process
FSDP writes and re-sharding resumes are in test_distributed.py."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vlmask import sharded
from vlmask.checkpoint import CheckpointError, latest_checkpoint, load_state, orphan_temporaries


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("seen", torch.arange(6).view(2, 3))


def trained(seed: int = 0) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    (model.linear(torch.randn(5, 3)).sum() * model.scale).backward()
    optimizer.step()
    return model, optimizer


def save(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int = 2) -> Path:
    optim = sharded.parallel.sharded_optimizer_state(model, optimizer)
    tensors = {"student": sharded.parallel.sharded_state_dict(model), "optimizer": {"state": optim["state"]}}
    state = {"optimizer_param_groups": optim["param_groups"], "rng": {"torch": torch.get_rng_state()}}
    return sharded.save_sharded(folder, step, tensors, state, keep=keep)


def shard_of(checkpoint: Path) -> Path:
    (shard,) = (checkpoint / sharded.SHARDS).glob("*.safetensors")
    return shard


class Marker:
    """A pickle that touches ``path`` when unpickled (what a hostile checkpoint would do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_sharded_checkpoint_is_written_atomically_rotated_and_read_whole(tmp_path):
    model, optimizer = trained()
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        path = save(folder, step, model, optimizer)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert latest_checkpoint(folder) == path and sharded.is_sharded(path)
    assert sorted(p.name for p in path.iterdir()) == ["sharded.json", "shards", "state.pt"]
    index = sharded.read_index(path)
    assert index["world_size"] == 1 and index["step"] == 3 and list(index["files"]) == [f"shards/{shard_of(path).name}"]
    full = sharded.load_full(path, "student")
    assert full.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(full[key], tensor), key
    assert load_state(path / "state.pt")["step"] == 3


def test_a_sharded_checkpoint_loads_back_into_a_model_and_optimizer_exactly(tmp_path):
    model, optimizer = trained(0)
    path = save(tmp_path / "checkpoints", 1, model, optimizer)
    other, other_optimizer = trained(1)
    sharded.load_training_state(path, other, None, other_optimizer, load_state(path / "state.pt")["optimizer_param_groups"])
    for key, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], tensor), key
    mine, theirs = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    for index in mine:
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(theirs[index][moment], mine[index][moment])


def test_a_model_that_does_not_match_is_refused_listing_the_keys(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "checkpoints", 1, model, optimizer)
    other = Tiny()
    other.extra = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"shards: checkpoint does not match the model\n  missing: student.extra.bias\n  missing: student.extra.weight$"):
        sharded.load_training_state(path, other, None, torch.optim.AdamW(other.parameters()), [])


def test_consolidate_writes_the_full_format_one_process_writes(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "checkpoints", 4, model, optimizer)
    full = sharded.consolidate(path, tmp_path / "full")
    assert full == tmp_path / "full" / "step_00000004" and not sharded.is_sharded(full)
    assert sorted(p.name for p in full.iterdir()) == ["state.pt", "student.safetensors"]
    state = load_state(full / "state.pt")
    assert state["step"] == 4 and set(state["optimizer"]["state"]) == {"linear.weight", "linear.bias", "scale"}
    assert sorted(state["optimizer"]["param_groups"][0]["params"]) == ["linear.bias", "linear.weight", "scale"]


# --------------------------------------------------------------------------- faults

KILL_WHILE_INDEXING = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[2])
import test_sharded as t
from vlmask import sharded
from pathlib import Path
model, optimizer = t.trained()
t.save(Path(sys.argv[1]), 1, model, optimizer)
sharded._write_index = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # the shards are written, nothing else
t.save(Path(sys.argv[1]), 2, model, optimizer)
"""


def test_a_kill_mid_write_leaves_the_previous_checkpoint_and_an_orphan_the_next_save_removes(tmp_path):
    folder = tmp_path / "checkpoints"
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_INDEXING, str(folder), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (orphan,) = orphan_temporaries(folder)
    assert orphan.name.startswith(".tmp-step_00000002") and list((orphan / sharded.SHARDS).iterdir())
    assert latest_checkpoint(folder).name == "step_00000001"
    model, optimizer = trained()
    save(folder, 2, model, optimizer)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000001", "step_00000002"]


def test_a_full_disk_while_shards_are_written_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model, optimizer = trained()
    folder = tmp_path / "checkpoints"
    save(folder, 1, model, optimizer)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save", no_space)  # what DCP's safetensors writer calls per shard
    with pytest.raises(CheckpointError) as caught:
        save(folder, 2, model, optimizer)
    assert str(caught.value) == (f"no space left on device while writing checkpoint step 2 in {folder}; the previous "
                                 f"checkpoint {folder / 'step_00000001'} is kept; free space, then run the same "
                                 "command again to resume")
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000001"], "the temporary folder is removed"


def test_a_truncated_or_missing_shard_is_one_clear_line(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "checkpoints", 1, model, optimizer)
    shard = shard_of(path)
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"^{shard}: {size // 2} bytes, .*sharded.json says {size}; the shard is truncated"):
        sharded.load_full(path, "student")
    index = json.loads((path / sharded.INDEX).read_text())  # an index that agrees with the truncated file
    index["files"][f"shards/{shard.name}"] = size // 2
    (path / sharded.INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"cannot read the shards' headers .*a shard is truncated") as caught:
        sharded.load_full(path, "student")
    assert "\n" not in str(caught.value)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"^{shard}: missing \(listed in .*\); the checkpoint is incomplete$"):
        sharded.load_full(path, "student")


def test_shards_that_do_not_cover_a_tensor_are_refused(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "checkpoints", 1, model, optimizer)
    shard = shard_of(path)  # one shard holding only the second half of a tensor: the first half's shard is gone
    save_file({"student.w": torch.ones(2)}, str(shard),
              metadata={"DCP_SHARDING_INFO": json.dumps({"student.w": {"saved_offsets": [2]}}), "format": "pt"})
    index = json.loads((path / sharded.INDEX).read_text())
    index["files"] = {f"shards/{shard.name}": shard.stat().st_size}
    (path / sharded.INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"the shards hold 2 of the 4 elements of student.w; a shard is missing"):
        sharded.load_full(path, "student")


# --------------------------------------------------------------------------- hostile files

def test_a_pickle_beside_the_shards_is_never_unpickled(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "checkpoints", 1, model, optimizer)
    marker = tmp_path / "executed"
    (path / ".metadata").write_bytes(pickle.dumps(Marker(marker)))  # DCP's FileSystemReader would pickle.load it
    assert sharded.load_full(path, "student").keys() == model.state_dict().keys()
    (path / sharded.SHARDS / ".metadata").write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(CheckpointError, match=r"files not listed in .*sharded.json: \.metadata$"):
        sharded.load_full(path, "student")
    assert not marker.exists(), "nothing was executed"


def test_a_checkpoint_in_dcps_pickle_layout_is_refused_unread(tmp_path):
    import torch.distributed.checkpoint as dcp

    from vlmask.runs import checkpoint_tensors

    checkpoint = tmp_path / "step_00000001"
    model, _ = trained()
    dcp.save({"student": model.state_dict()}, checkpoint_id=str(checkpoint), no_dist=True)
    marker = tmp_path / "executed"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: a torch.distributed.checkpoint folder in its pickle layout"):
        checkpoint_tensors(checkpoint, "student")
    assert not marker.exists()


def test_a_hostile_state_or_header_is_one_clear_line_and_runs_nothing(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "checkpoints", 1, model, optimizer)
    marker = tmp_path / "executed"
    shard = shard_of(path)
    save_file({"student.linear.weight": torch.zeros(4, 3)}, str(shard),  # a header that names no offsets
              metadata={"DCP_SHARDING_INFO": json.dumps({"student.linear.weight": {"os.system": "touch x"}})})
    index = json.loads((path / sharded.INDEX).read_text())
    index["files"] = {f"shards/{shard.name}": shard.stat().st_size}
    (path / sharded.INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"cannot read the shards' headers \(KeyError") as caught:
        sharded.load_full(path, "student")
    assert "\n" not in str(caught.value)
    torch.save({"step": 1, "evil": Marker(marker)}, path / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt: cannot read training state \(UnpicklingError"):
        load_state(path / "state.pt")
    assert not marker.exists()


def test_an_index_that_points_outside_the_shards_is_refused(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "checkpoints", 1, model, optimizer)
    index = json.loads((path / sharded.INDEX).read_text())
    index["files"] = {"shards/../../../../etc/passwd": 1}
    (path / sharded.INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"bad entry"):
        sharded.read_index(path)
