"""Learning-rate schedules shared by pretraining (``vlmask.engine``) and ``vlmask finetune``."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float, warmup_lr: float) -> float:
    """Linear warmup from ``warmup_lr`` to ``lr`` over ``warmup`` steps, then cosine to ``min_lr``."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
