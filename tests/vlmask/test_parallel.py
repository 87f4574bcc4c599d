"""vlmask.parallel in one process (the two-process behaviour is in test_distributed.py)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from vlmask import parallel
from vlmask_plugins.teachers.ema import EMATeacher
from vlmask_plugins.teachers.frozen import FrozenTeacher


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
        self.projection = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))


def test_clip_gradients_equals_clip_grad_norm_on_plain_gradients():
    torch.manual_seed(0)
    a = Student()
    b = copy.deepcopy(a)
    x = torch.randn(5, 4)
    for model in (a, b):
        (model.projection(model.encoder(x)).square().sum() * model.scale).backward()
    norm_a = parallel.clip_gradients(a.parameters(), 0.5)
    norm_b = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    torch.testing.assert_close(norm_a, norm_b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_teacher_parts_are_the_mirrored_copies_or_the_teacher():
    student = Student()
    ema = EMATeacher(student, total_steps=10)
    assert parallel.teacher_parts(ema) == [ema.module("encoder"), ema.module("projection")]
    frozen = FrozenTeacher(student)
    assert parallel.teacher_parts(frozen) == [frozen.encoder]
    plain = nn.Linear(2, 2)
    assert parallel.teacher_parts(plain) == [plain]


def test_training_state_bytes_counts_parameters_gradients_optimizer_and_teacher():
    student = Student()
    optimizer = torch.optim.AdamW(student.parameters())
    student.projection(student.encoder(torch.randn(2, 4))).sum().mul(student.scale).backward()
    optimizer.step()
    params = sum(p.numel() for p in student.parameters()) * 4
    record = parallel.training_state_bytes(student, None, optimizer)
    assert record["student_parameters"] == params and record["student_gradients"] == params
    assert record["optimizer_state"] == 2 * params + 4 * len(list(student.parameters()))  # moments + step counters
    assert record["teacher"] == 0 and record["total"] == sum(v for k, v in record.items() if k != "total")


def test_gradient_sync_is_a_no_op_for_a_plain_module():
    module = nn.Linear(2, 2)
    with parallel.gradient_sync(module, enabled=False):
        module(torch.ones(1, 2)).sum().backward()
    assert module.weight.grad is not None
    assert parallel.local_parameter_count(module) == 6 and not parallel.is_sharded(module)
