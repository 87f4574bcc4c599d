"""Exponential-moving-average teacher (BYOL; data2vec; V-JEPA; FILS)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with ``requires_grad`` off everywhere."""
    duplicate = copy.deepcopy(module)
    for parameter in duplicate.parameters():
        parameter.grad = None
    duplicate.requires_grad_(False)
    return duplicate.eval()


class EMATeacher(nn.Module):
    """Teacher whose mirrored parts track the student: ``teacher <- tau * teacher + (1 - tau) * student``.

    BYOL (Grill et al., NeurIPS 2020), data2vec (Baevski et al., ICML 2022), V-JEPA (Bardes et al.,
    2024) and FILS (Ahmadian et al., BMVC 2024). At construction the teacher holds exact deep
    copies of the student's ``mirror`` parts (absent or None parts are skipped), with
    ``requires_grad`` off and in eval mode (``train()`` does not change that).

    The engine calls :meth:`update` after *every* optimizer step (the released FILS code
    updates once per epoch: a bug, not copied) with ``step`` the number of optimizer steps
    taken so far (1 after the first step, as in the ``vlmask_after_optimizer_step`` hook).
    :meth:`tau` rises linearly from ``tau_start`` (the first update, step 1) to ``tau_end``
    (step ``tau_steps + 1``) and then stays, V-JEPA's schedule ``tau_start + i * (tau_end -
    tau_start) / tau_steps`` for update ``i = step - 1``; ``tau_steps=None`` uses
    ``total_steps`` (the whole run). FILS: 0.996 -> 1.0; V-JEPA: 0.998 -> 1.0. Buffers are copied.

    ``half_life_fraction`` (a vlmask option, not the paper's): a constant ``tau = 2 ** (-1 /
    (half_life_fraction * total_steps))``, so the teacher's share of its initial (random) weights
    halves every ``half_life_fraction`` of the run, whatever the run's length, and ends at
    ``2 ** (-1 / half_life_fraction)`` (0.2: 3.1%). Why: FILS's 0.996 -> 1.0 is made for runs of
    many thousand updates; over a demo's 200 updates it leaves the teacher about 67% its random
    initialisation (:meth:`init_share`), so feature prediction mostly predicts random features.
    Set with it, ``tau_start``/``tau_end``/``tau_steps`` must keep their defaults (they are unused).

    :meth:`init_share` is the share of the initial weights the teacher still holds after ``step``
    updates, the product of every update's tau (logged as ``teacher_init_share``).
    """

    def __init__(
        self,
        student: nn.Module,
        total_steps: int,
        mirror: tuple[str, ...] = ("encoder", "projection"),
        tau_start: float = 0.996,
        tau_end: float = 1.0,
        tau_steps: int | None = None,
        half_life_fraction: float | None = None,
    ) -> None:
        super().__init__()
        if half_life_fraction is not None:
            if isinstance(half_life_fraction, bool) or not 0.0 < float(half_life_fraction) <= 1.0:
                raise ValueError(f"half_life_fraction must be in (0, 1] or None, got {half_life_fraction!r}")
            if (tau_start, tau_end, tau_steps) != (0.996, 1.0, None):
                raise ValueError(
                    "half_life_fraction sets tau itself: leave tau_start, tau_end and tau_steps unset "
                    "(or drop half_life_fraction, e.g. ~teacher.half_life_fraction on the command line)"
                )
        if not 0.0 <= tau_start <= 1.0:
            raise ValueError(f"tau_start must be in [0, 1], got {tau_start}")
        if not 0.0 <= tau_end <= 1.0:
            raise ValueError(f"tau_end must be in [0, 1], got {tau_end}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if tau_steps is not None and tau_steps < 1:
            raise ValueError(f"tau_steps must be >= 1 or None (use total_steps), got {tau_steps}")
        if isinstance(mirror, str):
            raise ValueError(f"mirror must be a list of student part names, got the string {mirror!r}")
        self.tau_start = float(tau_start)
        self.tau_end = float(tau_end)
        self.tau_steps = int(tau_steps) if tau_steps is not None else int(total_steps)
        self.half_life_fraction = float(half_life_fraction) if half_life_fraction is not None else None
        self.constant_tau = (
            2.0 ** (-1.0 / (self.half_life_fraction * total_steps)) if self.half_life_fraction is not None else None
        )
        self._share: tuple[int, float] = (0, 1.0)  # (step, init_share(step)) last computed
        if getattr(student, "encoder", None) is None:
            raise ValueError("teacher 'ema' needs a student with an encoder")
        self.copies = nn.ModuleDict(
            {name: frozen_copy(getattr(student, name)) for name in mirror if getattr(student, name, None) is not None}
        )

    @property
    def mirrored(self) -> list[str]:
        """Names of the student parts this teacher holds a copy of."""
        return list(self.copies.keys())

    def module(self, name: str) -> nn.Module | None:
        """The teacher's copy of the student part ``name``, or None when it does not mirror it."""
        return self.copies[name] if name in self.copies else None

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.copies.eval()  # the teacher never runs dropout or batch-statistics updates
        return self

    def forward(self, video: Tensor) -> Tensor:
        """Features of every token (B, N, D) from the encoder copy, without gradient."""
        with torch.no_grad():
            return self.copies["encoder"](video, None)

    def tau(self, step: int) -> float:
        """The momentum of the update after optimizer step ``step`` (1-based; the first update is step 1)."""
        if self.constant_tau is not None:
            return self.constant_tau
        updates_before = min(max(step - 1, 0), self.tau_steps)
        progress = updates_before / self.tau_steps
        return self.tau_start + (self.tau_end - self.tau_start) * progress

    def init_share(self, step: int) -> float:
        """The share of its initial weights the teacher holds after ``step`` updates: the product of
        the taus of updates 1..step (each update keeps tau of what the teacher held).

        >>> class Student(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.encoder = nn.Linear(2, 2)
        >>> round(EMATeacher(Student(), total_steps=200).init_share(200), 2)  # FILS's schedule over 200 steps
        0.67
        >>> round(EMATeacher(Student(), total_steps=200, half_life_fraction=0.2).init_share(200), 4)
        0.0312
        """
        if step <= 0:
            return 1.0
        if self.constant_tau is not None:
            return self.constant_tau**step
        # the loop asks at every log step, counting up: extend the last product instead of
        # multiplying every tau again (O(log interval) a call, not O(step) over a long run)
        done, share = self._share if self._share[0] <= step else (0, 1.0)
        share *= float(np.prod([self.tau(s) for s in range(done + 1, step + 1)]))
        self._share = (step, share)
        return share

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """One EMA update of every mirrored part from ``student``; buffers are copied."""
        tau = self.tau(step)
        for name, teacher_part in self.copies.items():
            student_part = getattr(student, name, None)
            if student_part is None:
                raise ValueError(f"teacher 'ema' mirrors {name!r} but the student passed to update() has none")
            teacher_params = dict(teacher_part.named_parameters())
            student_params = dict(student_part.named_parameters())
            teacher_buffers = dict(teacher_part.named_buffers())
            student_buffers = dict(student_part.named_buffers())
            if teacher_params.keys() != student_params.keys() or teacher_buffers.keys() != student_buffers.keys():
                raise ValueError(f"student part {name!r} changed its parameters or buffers since the teacher copied it")
            if teacher_params:
                targets = list(teacher_params.values())
                sources = [student_params[key].detach().to(targets[i].dtype) for i, key in enumerate(teacher_params)]
                torch._foreach_mul_(targets, tau)  # V-JEPA: param_k.mul_(m).add_((1 - m) * param_q)
                torch._foreach_add_(targets, sources, alpha=1.0 - tau)
            for key, buffer in teacher_buffers.items():
                buffer.copy_(student_buffers[key])
