"""The settings of the recipe sections that commands above the engine read: ``finetune``
(``vlmask finetune``) and ``evaluation`` (``vlmask eval``, ``embed``, ``compare``).

Plain data, with no dependency on those commands, so that ``vlmask.schema.validate`` checks
these sections without importing the commands (layers: see CONTRIBUTING.md). The checking
functions are ``vlmask.schema.finetune_settings`` and ``vlmask.schema.evaluation_settings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


#: eval.json section -> evaluator plugin node, used unless the recipe's ``evaluation.evaluators`` changes it.
DEFAULT_EVALUATORS: dict[str, dict[str, Any]] = {
    "linear_probe": {"name": "linear_probe"},
    "linear_probe_temporal": {"name": "linear_probe", "pooling": "temporal"},
    "knn": {"name": "knn"},
    "attentive_probe": {"name": "attentive_probe"},
    "retrieval": {"name": "retrieval"},
    "zero_shot": {"name": "zero_shot"},
}

EVALUATION_KEYS = ("batch_size", "num_workers", "features", "evaluators")

#: What ``evaluation.features`` may name: ``encoder``, the encoder's token features (FILS,
#: VideoMAE: the default), or ``context``, the predictor's aggregated context c_t of the whole
#: clip (DPC and MemDPC: a predictor with ``vlmask.kinds.ContextFeatures``).
EVALUATION_FEATURES: tuple[str, ...] = ("encoder", "context")


@dataclass
class EvaluationSettings:
    batch_size: int
    num_workers: int
    evaluators: dict[str, dict[str, Any]]
    features: str = "encoder"  # one of EVALUATION_FEATURES: which features every evaluator probes


@dataclass
class FinetuneSettings:
    """The recipe's ``finetune`` section (VideoMAE finetuning defaults unless noted)."""

    max_steps: int | None = None  # optimizer steps; takes precedence over epochs
    epochs: float = 20.0  # VideoMAE: 30-100 epochs on real data; 20 suits the demo set
    batch_size: int | None = None  # None: train.batch_size
    lr: float = 1.0e-3  # peak lr of the last layer (absolute; VideoMAE: 1e-3 x batch / 256)
    min_lr: float = 1.0e-6
    warmup_lr: float = 1.0e-6
    warmup_steps: int | None = None  # takes precedence over warmup_epochs
    warmup_epochs: float = 2.0  # VideoMAE: 5 of 30-100 epochs
    layer_decay: float = 0.75  # 1.0: the same lr for every layer
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    grad_clip: float | None = None  # VideoMAE: no clipping
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha; VideoMAE 0.8 (0: off)
    cutmix: float = 0.0  # cutmix alpha; VideoMAE 1.0 (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup
    drop_path: float | None = 0.1  # stochastic depth of the encoder; None: as the run's encoder
    head_init_scale: float = 1.0e-3  # head weight ~ trunc_normal(0.02) * this
    keep_encoder_norm: bool = False  # False: VideoMAE mean pooling (encoder's final norm dropped)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # train RandomResizedCrop area
    hflip: bool | None = None  # None: as the recipe's data.dataset says
    eval_every: int | None = None  # also validate every N steps; None: only after the last step
    log_every: int = 10
    num_workers: int | None = None  # None: data.num_workers
    seed: int | None = None  # None: the recipe's seed


FINETUNE_KEYS = tuple(f.name for f in fields(FinetuneSettings))


def finetune_range_problems(s: FinetuneSettings, valid: set[str]) -> dict[str, str]:
    """key -> what is wrong with its value, for keys whose type was right."""
    checks: dict[str, tuple[bool, str]] = {
        "max_steps": (s.max_steps is None or s.max_steps >= 1, "an integer >= 1 or null"),
        "epochs": (s.epochs > 0, "a number > 0"),
        "batch_size": (s.batch_size is None or s.batch_size >= 1, "an integer >= 1 or null"),
        "lr": (s.lr > 0, "a number > 0"),
        "min_lr": (s.min_lr >= 0, "a number >= 0"),
        "warmup_lr": (s.warmup_lr >= 0, "a number >= 0"),
        "warmup_steps": (s.warmup_steps is None or s.warmup_steps >= 0, "an integer >= 0 or null"),
        "warmup_epochs": (s.warmup_epochs >= 0, "a number >= 0"),
        "layer_decay": (0 < s.layer_decay <= 1, "a number in (0, 1]"),
        "weight_decay": (s.weight_decay >= 0, "a number >= 0"),
        "betas": (len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas), "two numbers in [0, 1)"),
        "eps": (s.eps > 0, "a number > 0"),
        "grad_clip": (s.grad_clip is None or s.grad_clip > 0, "a number > 0 or null"),
        "label_smoothing": (0 <= s.label_smoothing < 1, "a number in [0, 1)"),
        "mixup": (s.mixup >= 0, "a number >= 0 (0: off)"),
        "cutmix": (s.cutmix >= 0, "a number >= 0 (0: off)"),
        "mixup_prob": (0 <= s.mixup_prob <= 1, "a number in [0, 1]"),
        "mixup_switch_prob": (0 <= s.mixup_switch_prob <= 1, "a number in [0, 1]"),
        "drop_path": (s.drop_path is None or 0 <= s.drop_path < 1, "a number in [0, 1) or null"),
        "head_init_scale": (s.head_init_scale >= 0, "a number >= 0"),
        "crop_scale": (len(s.crop_scale) == 2 and 0 < s.crop_scale[0] <= s.crop_scale[1] <= 1,
                       "[low, high] with 0 < low <= high <= 1"),
        "eval_every": (s.eval_every is None or s.eval_every >= 1, "an integer >= 1 or null"),
        "log_every": (s.log_every >= 1, "an integer >= 1"),
        "num_workers": (s.num_workers is None or s.num_workers >= 0, "an integer >= 0 or null"),
    }
    return {key: need for key, (ok, need) in checks.items() if key in valid and not ok}
