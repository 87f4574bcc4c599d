"""Teachers against the reference semantics: EMA (exact copy at start, linear tau schedule,
an update after every optimizer step) and a frozen network."""

from __future__ import annotations

import math

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vlmask_plugins.teachers import EMATeacher, FrozenTeacher, register_plugins


class TinyEncoder(nn.Module):
    """(video (B, 3, T, H, W), token index (B, K) or None) -> features (B, K or N, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv3d(3, 6, kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.norm = nn.BatchNorm1d(6)  # has buffers (running statistics)
        self.dropout = nn.Dropout(0.5)

    def forward(self, video: Tensor, index: Tensor | None) -> Tensor:
        tokens = self.patch(video).flatten(2)  # B, 6, N
        tokens = self.dropout(self.norm(tokens)).transpose(1, 2)  # B, N, 6
        if index is not None:
            tokens = torch.gather(tokens, 1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))
        return tokens


class TinyStudent(nn.Module):
    def __init__(self, with_projection: bool = True) -> None:
        super().__init__()
        self.encoder = TinyEncoder()
        self.predictor = None
        self.projection = nn.Linear(6, 4) if with_projection else None


def video(seed: int = 0) -> Tensor:
    return torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def perturb(student: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
        student.encoder.norm.running_mean.add_(1.0)


def test_register_plugins_registers_both_teachers() -> None:
    seen: list[tuple[str, str]] = []
    register_plugins(lambda kind, name, factory: seen.append((kind, name)))
    assert sorted(seen) == [("teacher", "ema"), ("teacher", "frozen")]


# ---- EMA --------------------------------------------------------------------------------------


def test_ema_starts_as_an_exact_frozen_copy_in_eval_mode() -> None:
    torch.manual_seed(0)
    student = TinyStudent()
    teacher = EMATeacher(student, total_steps=100)
    assert teacher.mirrored == ["encoder", "projection"]
    for name in ("encoder", "projection"):
        copy = teacher.module(name)
        assert copy is not None and copy is not getattr(student, name)
        original = getattr(student, name).state_dict()
        assert list(copy.state_dict()) == list(original)
        assert all(torch.equal(value, original[key]) for key, value in copy.state_dict().items())
        assert all(not p.requires_grad for p in copy.parameters())
    teacher.train()
    assert not teacher.module("encoder").training  # type: ignore[union-attr]
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched


def test_ema_forward_is_the_encoder_copy_on_all_tokens_without_gradient() -> None:
    torch.manual_seed(1)
    student = TinyStudent()
    student.eval()
    teacher = EMATeacher(student, total_steps=10)
    features = teacher(video())
    assert features.shape == (2, 8, 6) and not features.requires_grad
    torch.testing.assert_close(features, student.encoder(video(), None).detach())


def test_ema_skips_absent_parts() -> None:
    teacher = EMATeacher(TinyStudent(with_projection=False), total_steps=10)
    assert teacher.mirrored == ["encoder"]
    assert teacher.module("projection") is None and teacher.module("predictor") is None
    only_encoder = EMATeacher(TinyStudent(), total_steps=10, mirror=["encoder"])
    assert only_encoder.module("projection") is None


def test_tau_rises_linearly_then_stays() -> None:
    teacher = EMATeacher(TinyStudent(), total_steps=1000, tau_start=0.996, tau_end=1.0, tau_steps=100)
    # step = optimizer steps taken (the engine's convention): the first update is step 1
    assert teacher.tau(1) == pytest.approx(0.996)
    assert teacher.tau(26) == pytest.approx(0.997)
    assert teacher.tau(51) == pytest.approx(0.998)
    assert teacher.tau(100) == pytest.approx(0.996 + 0.004 * 99 / 100)
    assert teacher.tau(101) == pytest.approx(1.0)
    assert teacher.tau(500) == pytest.approx(1.0)
    whole_run = EMATeacher(TinyStudent(), total_steps=200, tau_start=0.998)  # tau_steps None -> total_steps
    assert whole_run.tau(101) == pytest.approx(0.999)
    assert whole_run.tau(200) == pytest.approx(0.998 + 0.002 * 199 / 200)  # V-JEPA: the last update is just below 1


def test_ema_update_is_tau_teacher_plus_one_minus_tau_student_and_copies_buffers() -> None:
    torch.manual_seed(2)
    student = TinyStudent()
    teacher = EMATeacher(student, total_steps=10, tau_start=0.9, tau_end=0.5, tau_steps=4)
    before = {name: t.detach().clone() for name, t in teacher.copies.named_parameters()}
    perturb(student, seed=1)
    teacher.update(student, step=3)  # third update: tau = 0.9 - 0.4 * 2 / 4 = 0.7
    for name, value in teacher.copies.named_parameters():
        part, key = name.split(".", 1)
        student_value = dict(getattr(student, part).named_parameters())[key]
        torch.testing.assert_close(value, 0.7 * before[name] + 0.3 * student_value.detach())
    teacher_encoder = teacher.module("encoder")
    assert teacher_encoder is not None
    torch.testing.assert_close(teacher_encoder.norm.running_mean, student.encoder.norm.running_mean)


def test_ema_applies_every_update_with_its_own_tau() -> None:
    torch.manual_seed(3)
    student = TinyStudent()
    teacher = EMATeacher(student, total_steps=4, tau_start=0.5, tau_end=0.9)  # tau 0.5, 0.6, 0.7, 0.8
    expected = student.projection.weight.detach().clone()  # type: ignore[union-attr]
    for step in range(1, 5):  # one update per optimizer step, not per epoch
        perturb(student, seed=10 + step)
        previous = teacher.module("projection").weight.clone()  # type: ignore[union-attr]
        teacher.update(student, step)
        tau = 0.5 + 0.1 * (step - 1)
        expected = tau * expected + (1 - tau) * student.projection.weight.detach()  # type: ignore[union-attr]
        current = teacher.module("projection").weight  # type: ignore[union-attr]
        assert not torch.equal(current, previous)
        torch.testing.assert_close(current, expected)


def test_ema_with_tau_one_stops_following() -> None:
    student = TinyStudent()
    teacher = EMATeacher(student, total_steps=1, tau_start=1.0, tau_end=1.0)
    before = teacher.module("encoder").patch.weight.clone()  # type: ignore[union-attr]
    perturb(student, seed=4)
    teacher.update(student, step=1)
    assert torch.equal(teacher.module("encoder").patch.weight, before)  # type: ignore[union-attr]


def test_ema_state_dict_round_trips_for_resume() -> None:
    student = TinyStudent()
    teacher = EMATeacher(student, total_steps=5)
    perturb(student, seed=5)
    teacher.update(student, step=1)
    restored = EMATeacher(TinyStudent(), total_steps=5)
    original = teacher.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in restored.state_dict().items()), "differs before loading"
    restored.load_state_dict(original)
    loaded = restored.state_dict()
    assert original.keys() == loaded.keys()  # parameters and buffers
    for key in original:
        assert torch.equal(original[key], loaded[key]), key


def test_init_share_is_the_product_of_the_taus_and_matches_a_real_teacher() -> None:
    """The diagnostic is the real share: a teacher whose student is all zeros holds exactly its
    initial weights times init_share after any number of updates."""
    for kwargs in ({}, {"tau_start": 0.9, "tau_end": 0.99, "tau_steps": 5}, {"half_life_fraction": 0.25}):
        torch.manual_seed(0)
        student = TinyStudent()
        teacher = EMATeacher(student, total_steps=12, **kwargs)
        initial = teacher.module("projection").weight.detach().clone()
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.zero_()
        for step in range(1, 13):
            teacher.update(student, step)
            share = teacher.init_share(step)
            assert share == pytest.approx(math.prod(teacher.tau(s) for s in range(1, step + 1)))
            torch.testing.assert_close(teacher.module("projection").weight, initial * share)
        assert teacher.init_share(0) == 1.0
        # asked out of order (a resume, another caller): the same products
        assert teacher.init_share(7) == pytest.approx(math.prod(teacher.tau(s) for s in range(1, 8)))
        assert teacher.init_share(12) == pytest.approx(math.prod(teacher.tau(s) for s in range(1, 13)))


def test_half_life_fraction_halves_the_initial_share_every_fraction_of_the_run() -> None:
    for total in (20, 200, 100_000):
        teacher = EMATeacher(TinyStudent(), total_steps=total, half_life_fraction=0.2)
        assert teacher.init_share(total // 5) == pytest.approx(0.5)
        assert teacher.init_share(total) == pytest.approx(2.0**-5)  # 3.1% left at the end, whatever the length
    # FILS's schedule compressed into 200 updates leaves the teacher about two thirds random
    assert EMATeacher(TinyStudent(), total_steps=200).init_share(200) == pytest.approx(0.67, abs=0.01)
    with pytest.raises(ValueError, match="half_life_fraction must be in"):
        EMATeacher(TinyStudent(), total_steps=10, half_life_fraction=0.0)
    with pytest.raises(ValueError, match="leave tau_start, tau_end and tau_steps unset"):
        EMATeacher(TinyStudent(), total_steps=10, half_life_fraction=0.2, tau_start=0.99)


def test_ema_argument_errors() -> None:
    with pytest.raises(ValueError, match="tau_start"):
        EMATeacher(TinyStudent(), total_steps=10, tau_start=1.5)
    with pytest.raises(ValueError, match="tau_steps"):
        EMATeacher(TinyStudent(), total_steps=10, tau_steps=0)
    with pytest.raises(ValueError, match="mirror"):
        EMATeacher(TinyStudent(), total_steps=10, mirror="encoder")  # type: ignore[arg-type]


# ---- frozen ---------------------------------------------------------------------------------------


def test_frozen_without_checkpoint_is_a_fixed_copy_of_the_initial_encoder() -> None:
    torch.manual_seed(6)
    student = TinyStudent()
    initial = {k: v.clone() for k, v in student.encoder.state_dict().items()}
    teacher = FrozenTeacher(student)
    perturb(student, seed=6)
    teacher.update(student, step=1)
    for key, value in teacher.module("encoder").state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(value, initial[key])
    assert teacher.module("projection") is None
    assert not teacher(video()).requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())


def test_frozen_loads_a_safetensors_checkpoint_strictly(tmp_path: Path) -> None:
    torch.manual_seed(7)
    pretrained = TinyEncoder()
    weights = {k: v.contiguous() for k, v in pretrained.state_dict().items()}
    save_file(weights, str(tmp_path / "plain.safetensors"))
    save_file({f"encoder.{k}": v for k, v in weights.items()}, str(tmp_path / "prefixed.safetensors"))
    for name in ("plain", "prefixed"):
        teacher = FrozenTeacher(TinyStudent(), checkpoint=str(tmp_path / f"{name}.safetensors"))
        for key, value in teacher.module("encoder").state_dict().items():  # type: ignore[union-attr]
            assert torch.equal(value, weights[key])
    save_file({**weights, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        FrozenTeacher(TinyStudent(), checkpoint=str(tmp_path / "extra.safetensors"))
    partial = {k: v for k, v in weights.items() if not k.startswith("norm.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        FrozenTeacher(TinyStudent(), checkpoint=str(tmp_path / "partial.safetensors"))
    with pytest.raises(FileNotFoundError):
        FrozenTeacher(TinyStudent(), checkpoint=str(tmp_path / "absent.safetensors"))
