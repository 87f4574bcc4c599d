"""Finetuning a pretrained run for action recognition: ``vlmask finetune RUN_DIR [KEY=VALUE ...]``.

The protocol is VideoMAE's end-to-end finetuning (Tong et al., NeurIPS 2022, code
``run_class_finetuning.py`` / ``modeling_finetune.py`` / ``optim_factory.py``), which FILS
(Ahmadian et al., BMVC 2024) uses for its action-recognition results:

* the run's latest checkpoint gives the encoder (loaded strictly, as ``vlmask eval`` does);
  a new head is added: mean over all tokens, ``fc_norm`` LayerNorm, Linear to the classes.
  As in VideoMAE's ``use_mean_pooling``, the encoder's own final norm is dropped (``fc_norm``
  after pooling takes its place; ``keep_encoder_norm: true`` keeps it). The head is
  ``trunc_normal(std=0.02)`` scaled by ``head_init_scale`` (VideoMAE ``--init_scale 0.001``,
  so std 2e-5), bias zero; ``fc_norm`` starts at weight 1, bias 0;
* every parameter is trained with AdamW, linear warmup then cosine (:func:`vlmask.schedules.lr_at`)
  scaled per parameter group by layer-wise lr decay: ``patch_embed``/``pos_embed`` are layer 0,
  block ``i`` is layer ``i + 1``, everything else (head, ``fc_norm``) layer ``depth + 1``, and a
  layer's lr is ``lr * layer_decay ** (depth + 1 - layer)`` (VideoMAE ``LayerDecayValueAssigner``).
  No weight decay on biases, 1-D parameters and ``pos_embed``;
* training clips use the train augmentation with ``crop_scale`` (0.08, 1.0) (VideoMAE's
  finetuning RandomResizedCrop) and the recipe's ``hflip``; loss is cross-entropy on label-
  smoothed targets (0.1), optionally on mixup / cutmix targets (VideoMAE: mixup 0.8, cutmix 1.0,
  switch 0.5, one draw per batch). Mixup and cutmix are OFF by default here: at demo scale (a few
  hundred clips, tens of steps) they slow convergence far more than they regularise;
* stochastic depth ``drop_path`` (VideoMAE 0.1) is set on the encoder's blocks;
* the validation manifest is classified with centre crops (one view; VideoMAE's multi-view
  test is not done) after the last step, and also every ``eval_every`` steps when set: ``top1``
  and, when the manifests carry ``verb`` and ``noun``, ``verb_top1`` / ``noun_top1``
  marginalised from the action probabilities (EPIC-Kitchens, as FILS reports). The reported
  numbers are the final model's: no checkpoint is picked on the validation set.

Settings come from the recipe's optional ``finetune`` section (:class:`FinetuneSettings`,
every key optional), overridable on the command line (``finetune.max_steps=20``). The result
is ``RUN_DIR/finetune.json`` and the finetuned classifier ``RUN_DIR/finetune/model.safetensors``
(both written atomically); :func:`load_finetuned` rebuilds the classifier from them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: F401 (the doctests use it)
from omegaconf import OmegaConf
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vlmask.checkpoint import load_strict, load_tensors
from vlmask.config import Recipe, RecipeError, load_recipe, parse_override
from vlmask.data_loading import EpochBatches, SeededItems, collate_of, infinite, worker_init
from vlmask.schedules import lr_at
from vlmask.evaluate import class_parts, data_record, eval_dataset, keep_previous_eval, split_features, val_manifest
from vlmask.io import relative_path, write_json
from vlmask.schema import build
from vlmask.kinds import WITHOUT_TRAINING_VIEWS, HasBlocks, HasFinalNorm, LabelledDataset, VerbNounDataset
from vlmask.metrics import group_top1, top1
from vlmask.runs import OpenRun, open_run
from vlmask.schema import finetune_settings, top_settings
from vlmask.schema import settings as section_settings
from vlmask.sections import FinetuneSettings

__all__ = [
    "FINETUNE_FORMAT",
    "FinetuneSettings",
    "MixupCutmix",
    "VideoClassifier",
    "evaluate_classifier",
    "finetune_record",
    "finetune_optimizer",
    "finetune_run",
    "finetune_settings",
    "finetune_step",
    "layer_decay_groups",
    "layer_id",
    "load_finetuned",
    "set_group_lrs",
    "smoothed_targets",
    "soft_target_cross_entropy",
]

#: ``format`` of the finetuned weights' safetensors metadata.
FINETUNE_FORMAT = "vlmask-finetune/1"

console = Console(stderr=True, soft_wrap=True)


# --------------------------------------------------------------------------- settings


# --------------------------------------------------------------------------- the model


class VideoClassifier(nn.Module):
    """A pretrained video encoder with VideoMAE's finetuning head (Tong et al., NeurIPS 2022,
    ``modeling_finetune.VisionTransformer`` with ``use_mean_pooling``): tokens (B, N, D) are
    averaged, normalised by ``fc_norm`` (LayerNorm, eps 1e-6) and mapped to class logits by
    ``head``. With ``keep_encoder_norm=False`` the encoder's final ``norm`` (when it has one)
    is replaced by the identity, as in VideoMAE, where ``fc_norm`` after pooling replaces it.
    ``head`` starts at ``trunc_normal(std=0.02) * head_init_scale`` with zero bias.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, head_init_scale: float = 1e-3,
                 keep_encoder_norm: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        dim = int(encoder.embed_dim)
        if not keep_encoder_norm and isinstance(encoder, HasFinalNorm) and isinstance(encoder.norm, nn.Module):
            encoder.norm = nn.Identity()
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
        nn.init.zeros_(self.head.bias)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's layer grouping (``param_groups_layer_decay``): a parameter name -> :func:`layer_id`."""
        depth = self.depth
        return lambda name: layer_id(name, depth)

    @property
    def depth(self) -> int:
        """Transformer blocks of the encoder (0 when it has no ``blocks``)."""
        blocks = self.encoder.blocks if isinstance(self.encoder, HasBlocks) else None
        return len(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else 0

    def forward(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> logits (B, num_classes)."""
        tokens = self.encoder(video)
        return self.head(self.fc_norm(tokens.mean(dim=1)))


def layer_id(name: str, depth: int) -> int:
    """VideoMAE's ``get_num_layer_for_vit`` on a :class:`VideoClassifier` parameter name:
    ``pos_embed`` / ``cls_token`` / ``mask_token`` / ``patch_embed.*`` of the encoder are layer 0,
    ``encoder.blocks.i.*`` layer ``i + 1``, anything else (head, fc_norm) layer ``depth + 1``.

    >>> [layer_id(n, 4) for n in ("encoder.patch_embed.weight", "encoder.blocks.2.mlp.fc1.bias", "head.weight")]
    [0, 3, 5]
    """
    if name.startswith("encoder."):
        local = name[len("encoder."):]
        if local in ("cls_token", "mask_token", "pos_embed") or local.startswith("patch_embed"):
            return 0
        if local.startswith("blocks."):
            return int(local.split(".")[1]) + 1
    return depth + 1


def _no_decay(name: str, param: Tensor) -> bool:
    """VideoMAE ``get_parameter_groups``: 1-D parameters, biases and the skip list (pos_embed, cls_token)."""
    local = name.rpartition(".")[2]
    return param.ndim <= 1 or name.endswith(".bias") or local in ("pos_embed", "cls_token")


def layer_decay_groups(model: VideoClassifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups from timm's ``param_groups_layer_decay`` (BEiT's layer-wise decay):
    one per (layer, decay or not), each with ``lr_scale`` = ``layer_decay ** (depth + 1 - layer)``
    (VideoMAE ``LayerDecayValueAssigner``; layers from :func:`layer_id` through
    :meth:`VideoClassifier.group_matcher`), ``weight_decay`` (0 for 1-D parameters, biases,
    ``pos_embed`` and ``cls_token``), and, for logging, ``layer`` and ``names``.
    ``layer_decay=1`` gives every group scale 1."""
    from timm.optim import param_groups_layer_decay

    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=("encoder.pos_embed", "encoder.cls_token"))
    depth = model.depth
    for group in groups:
        group["names"] = [names[id(p)] for p in group["params"]]
        group["layer"] = layer_id(group["names"][0], depth)
    return sorted(groups, key=lambda g: (g["layer"], g["weight_decay"] == 0.0))


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr * group["lr_scale"]`` (VideoMAE's per-iteration schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def finetune_optimizer(model: VideoClassifier, settings: FinetuneSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`layer_decay_groups` (VideoMAE ``optim_factory.create_optimizer``):
    ``settings.weight_decay``, ``layer_decay``, ``betas`` and ``eps``, starting at ``warmup_lr``
    (:func:`set_group_lrs` sets each step's lr); fused on CUDA."""
    groups = layer_decay_groups(model, settings.weight_decay, settings.layer_decay)
    return torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=settings.warmup_lr, betas=(settings.betas[0], settings.betas[1]), eps=settings.eps,
        fused=device.type == "cuda",
    )


def finetune_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, video: Tensor,
                  targets: Tensor, autocast: Callable[[], Any], grad_clip: float | None) -> Tensor:
    """One optimizer step of finetuning (VideoMAE ``engine_for_finetuning.train_one_epoch``):
    forward under ``autocast``, :func:`soft_target_cross_entropy` on ``targets``, backward
    through ``scaler`` (a no-op unless fp16), gradient clipping at ``grad_clip`` when set, the
    optimizer step. Returns the loss (not synchronised)."""
    with autocast():
        logits = model(video)
    loss = soft_target_cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss


# --------------------------------------------------------------------------- targets


def smoothed_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot targets with label smoothing: ``1 - smoothing + smoothing / C`` on the label,
    ``smoothing / C`` elsewhere (timm / VideoMAE ``mixup_target``; the same distribution as
    ``F.cross_entropy(..., label_smoothing=smoothing)``).

    >>> smoothed_targets(torch.tensor([1]), 4, 0.2).tolist()
    [[0.05000000074505806, 0.8500000238418579, 0.05000000074505806, 0.05000000074505806]]
    """
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))`` (timm ``SoftTargetCrossEntropy``).

    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> loss = soft_target_cross_entropy(logits, smoothed_targets(torch.tensor([0]), 3, 0.1))
    >>> bool(torch.isclose(loss, F.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.1)))
    True
    """
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()(logits.float(), targets)


class MixupCutmix:
    """Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) for video batches, as
    VideoMAE's finetuning applies them (its ``mixup.py``, timm's ``Mixup`` in ``batch`` mode):
    one draw per batch; with probability ``prob`` the batch is mixed with its reverse
    (``x.flip(0)``): mixup blends whole clips with ``lam ~ Beta(mixup, mixup)``, cutmix pastes
    one box of area about ``1 - lam`` (``lam ~ Beta(cutmix, cutmix)``) into every frame and
    corrects ``lam`` to the kept area. With both on, cutmix is used with probability
    ``switch_prob``. Targets are ``lam * y + (1 - lam) * y.flip(0)`` of label-smoothed one-hots.
    """

    def __init__(self, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
                 smoothing: float = 0.1, num_classes: int = 1) -> None:
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"mixup and cutmix must be >= 0, got {mixup} and {cutmix}")
        if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError(f"prob and switch_prob must be in [0, 1], got {prob} and {switch_prob}")
        self.mixup, self.cutmix, self.prob, self.switch_prob = mixup, cutmix, prob, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def draw(self, generator: torch.Generator) -> tuple[float, bool]:
        """(lam, use_cutmix) of one batch; lam 1.0 means no mixing."""
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or float(torch.rand((), generator=generator)) < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        if alpha <= 0 or float(torch.rand((), generator=generator)) >= self.prob:
            return 1.0, False
        beta = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator))).beta(alpha, alpha)
        return float(beta), use_cutmix

    def apply(self, video: Tensor, labels: Tensor, lam: float, use_cutmix: bool,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, float]:
        """Mix ``video`` (B, C, T, H, W) with its reverse; returns (video, soft targets, lam used)."""
        if lam < 1.0:
            other = video.flip(0)
            if use_cutmix:
                height, width = video.shape[-2:]
                top, bottom, left, right = cutmix_box(height, width, lam, generator)
                video = video.clone()
                video[..., top:bottom, left:right] = other[..., top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (height * width)
            else:
                video = video * lam + other * (1.0 - lam)
        y = smoothed_targets(labels, self.num_classes, self.smoothing)
        return video, y * lam + y.flip(0) * (1.0 - lam), lam

    def __call__(self, video: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
        lam, use_cutmix = self.draw(generator)
        return self.apply(video, labels, lam, use_cutmix, generator)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of side ``sqrt(1 - lam)`` of the frame around a uniform
    centre, clipped to the frame; (top, bottom, left, right), bottom/right exclusive."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (), generator=generator))
    cx = int(torch.randint(0, width, (), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


# --------------------------------------------------------------------------- evaluation


class _Rows(Dataset):
    """``dataset`` restricted to ``rows`` (item ``i`` is ``dataset[rows[i]]``)."""

    def __init__(self, dataset: Any, rows: list[int]) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.rows[index]]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Any, classes: list[str], class_verbs: list[str | None],
                        class_nouns: list[str | None], batch_size: int, num_workers: int = 0,
                        device: torch.device | str = "cpu", autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    """Centre-crop classification of ``dataset`` (built with ``classes``): ``top1`` over its
    labelled clips (a label outside ``classes`` counts as an error), ``verb_top1`` /
    ``noun_top1`` from marginalised action probabilities when every class has a verb and a
    noun, and ``clips`` (clips that loaded). Empty when no clip is labelled."""
    from contextlib import nullcontext

    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    size = len(dataset)
    probabilities = torch.full((size, len(classes)), float("nan"))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_of(dataset), pin_memory=torch.device(device).type == "cuda")
    try:
        for batch in loader:
            with autocast():
                logits = model(batch.to(device).video)  # uint8 -> normalised float on the device
            probabilities[batch.index] = logits.float().softmax(dim=-1).cpu()
    finally:
        model.train(was_training)
    split, _ = split_features(dataset, {"probabilities": probabilities})  # the clips that loaded
    if not bool(split.labelled.any()):
        return {}
    kept = split.pooled["probabilities"]
    result = {"top1": top1(kept, split.labels, split.labelled), "clips": float(len(split.labels))}
    present = isinstance(dataset, VerbNounDataset)
    for key, class_groups, truth in (("verb_top1", class_verbs, split.verbs), ("noun_top1", class_nouns, split.nouns)):
        if not present:
            continue
        truth_rows = [value if labelled else None for value, labelled in zip(truth, split.labelled.tolist())]
        accuracy = group_top1(kept, class_groups, truth_rows)
        if accuracy is not None:
            result[key] = accuracy
    return result


# --------------------------------------------------------------------------- the run


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(finetune.* overrides, the others)."""
    ours, others = [], []
    for text in overrides:
        key = parse_override(text)[0]
        (ours if key == "finetune" or key.startswith("finetune.") else others).append(text)
    return ours, others


def _load_pretrained(run_dir: Path, overrides: list[str], drop_path: float | None) -> OpenRun:
    """``open_run`` without the ``finetune`` section (the engine does not read it), with the
    encoder's ``drop_path`` set when asked."""
    extra = []
    if (run_dir / "config.yaml").is_file() and "finetune" in OmegaConf.load(run_dir / "config.yaml"):
        extra.append("~finetune")
    if drop_path is not None:
        extra.append(f"model.encoder.drop_path={drop_path}")
    return open_run(run_dir, [*overrides, *extra])


def _save_weights(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def _progress(enabled: bool, total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("val top1 {task.fields[top1]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
    )


#: FinetuneSettings fields left out of finetune.json's ``requested``: how the work is done, not
#: which numbers come out (workers load the same seeded clips; logging does not touch the model).
NOT_REQUESTED = ("num_workers", "log_every")


def finetune_record(recipe: Recipe, settings: FinetuneSettings, device: torch.device, precision: str,
                    train: Path | None, val: Path | None) -> dict[str, Any]:
    """finetune.json's ``requested``: what determines its numbers besides the checkpoint, as
    asked (before the run's defaults fill ``batch_size`` and ``seed``, and steps are counted):
    every finetune setting but :data:`NOT_REQUESTED`, the manifests and dataset node
    (vlmask.evaluate.data_record), the device and precision. ``vlmask compare --finetune`` reuses
    a finetune.json only when this record is the one it asks (vlmask.evaluate.eval_mismatch)."""
    asked = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in NOT_REQUESTED}
    return {"finetune": json.loads(json.dumps(asked, default=str)), "data": data_record(recipe, train, val),
            "device": device.type, "precision": precision}


def finetune_run(run_dir: Path | str, overrides: Sequence[str] = (), progress: bool = True,
                 finetune: Recipe | None = None) -> dict[str, Any]:
    """Finetune the latest checkpoint of ``run_dir`` for action recognition (module docstring)
    and write ``RUN_DIR/finetune.json`` and ``RUN_DIR/finetune/model.safetensors``; returns the json.

    ``overrides`` are KEY=VALUE on the run's ``config.yaml``: ``finetune.*`` settings
    (:class:`FinetuneSettings`) and any other key (``data.val=...``, ``device=cpu``).
    The classes are the training manifest's labels; training uses its labelled clips.
    ``finetune``: a recipe whose ``finetune`` section is used instead of the run's (``vlmask
    compare --finetune`` passes the compared recipe with its overrides, so every run is
    fine-tuned with the same settings). An existing finetune.json of another checkpoint or other
    settings (``requested``: :func:`finetune_record`) is kept as ``finetune-<hash>.json``.
    """
    run_dir = Path(run_dir)
    ours, others = _split_overrides(list(overrides))
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    settings = finetune_settings(finetune if finetune is not None
                                 else load_recipe(config, [*others, *ours, f"run.dir={run_dir}"]))
    return _finetune(_load_pretrained(run_dir, others, settings.drop_path), run_dir, settings, progress)


def finetune_dataset(run: OpenRun, settings: FinetuneSettings, classes: list[str]) -> Any:
    """The recipe's dataset on the training manifest with finetuning augmentation (train=True,
    ``finetune.crop_scale`` and ``finetune.hflip``), ``classes`` and no training-only views
    (vlmask.evaluate.TRAINING_VIEWS: the classifier reads ``video`` alone)."""
    recipe: Recipe = run.recipe
    wanted: dict[str, Any] = {"crop_scale": tuple(settings.crop_scale)}
    if settings.hflip is not None:
        wanted["hflip"] = settings.hflip
    name = section_settings(recipe, "data").dataset.get("name")
    if ("dataset", name) in run.plugins.registry:  # else build names the unknown dataset
        takes = run.plugins.registry.get("dataset", name).signature.parameters
        for key in wanted:
            if key not in takes:
                raise RecipeError([f"{recipe.where('finetune.' + key)}: key finetune.{key}: dataset "
                                   f"{name!r} has no argument {key!r}"])
    return build(run.plugins.registry, recipe, "data.dataset", "dataset", manifest=str(run.train_manifest), train=True,
                 if_taken={**WITHOUT_TRAINING_VIEWS, "classes": classes}, **wanted)


def _finetune(run: OpenRun, run_dir: Path, settings: FinetuneSettings, progress: bool) -> dict[str, Any]:
    recipe: Recipe = run.recipe
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise RuntimeError("vlmask finetune runs in one process; start it without torchrun")
    classes = list(run.train_set.classes or [])
    if not classes:
        raise ValueError(f"{run.train_manifest}: no clip has a label; finetuning needs labelled training clips")
    requested = finetune_record(recipe, settings, run.device, run.precision, run.train_manifest, val_manifest(run))
    # settings that default to the run's
    train, data = section_settings(recipe, "train"), section_settings(recipe, "data")
    settings.batch_size = settings.batch_size or int(train.batch_size)
    settings.num_workers = int(data.num_workers) if settings.num_workers is None else settings.num_workers
    settings.seed = int(top_settings(recipe).seed) if settings.seed is None else settings.seed

    # data: the train manifest with finetuning augmentation, labelled clips only
    train_set = finetune_dataset(run, settings, classes)
    rows = [i for i, label in enumerate(train_set.label_ids if isinstance(train_set, LabelledDataset) else []) if label >= 0]
    if len(rows) < settings.batch_size:
        raise RecipeError([f"{recipe.where('finetune.batch_size')}: key finetune.batch_size: {settings.batch_size} "
                           f"is more than the {len(rows)} labelled training clips of {run.train_manifest}"])
    batches = EpochBatches(len(rows), settings.batch_size, settings.seed)
    device = run.device
    loader = DataLoader(
        SeededItems(_Rows(train_set, rows)), batch_sampler=batches, num_workers=settings.num_workers,
        collate_fn=collate_of(train_set), pin_memory=device.type == "cuda", worker_init_fn=worker_init,
        persistent_workers=settings.num_workers > 0,
    )
    steps_per_epoch = batches.batches_per_epoch
    total = settings.max_steps or max(1, round(settings.epochs * steps_per_epoch))
    warmup = settings.warmup_steps if settings.warmup_steps is not None else round(settings.warmup_epochs * steps_per_epoch)
    val_path = val_manifest(run)
    val_set = eval_dataset(run, val_path) if val_path is not None else None
    if val_set is None:
        console.print(f"{run_dir}: no validation manifest (set data.val=...): finetuning without evaluation", style="yellow", markup=False)
    class_verbs, class_nouns = class_parts(train_set, classes)

    # model and optimizer
    torch.manual_seed(settings.seed)
    model = VideoClassifier(run.encoder, len(classes), settings.head_init_scale,
                            settings.keep_encoder_norm).to(device)
    if settings.layer_decay < 1 and model.depth == 0:
        raise RecipeError([f"{recipe.where('finetune.layer_decay')}: key finetune.layer_decay: the encoder "
                           f"{type(model.encoder).__name__} has no .blocks to decay over; set finetune.layer_decay=1.0"])
    optimizer = finetune_optimizer(model, settings, device)
    scaler = torch.amp.GradScaler("cuda", enabled=run.precision == "fp16")
    mixing = MixupCutmix(settings.mixup, settings.cutmix, settings.mixup_prob, settings.mixup_switch_prob,
                         settings.label_smoothing, len(classes))

    def validate() -> dict[str, float]:
        if val_set is None:
            return {}
        return evaluate_classifier(model, val_set, classes, class_verbs, class_nouns, settings.batch_size,
                                   settings.num_workers, device, run.autocast)

    history: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    loss_sum, loss_count, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    batch_iter = infinite(loader, batches, 0, 0)
    model.train()
    with _progress(progress, total) as bar:
        task = bar.add_task("finetune", total=total, loss="-", top1="-")
        for step in range(total):
            set_group_lrs(optimizer, lr_at(step, total, warmup, settings.lr, settings.min_lr, settings.warmup_lr))
            batch = next(batch_iter)
            video = batch.to(device).video  # uint8 -> normalised float on the device
            labels = batch.label.to(device, non_blocking=True)
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            if mixing.active:
                video, targets, _ = mixing(video, labels, generator)
            else:
                targets = smoothed_targets(labels, len(classes), settings.label_smoothing)
            loss = finetune_step(model, optimizer, scaler, video, targets, run.autocast, settings.grad_clip)
            loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
            done = step + 1
            evaluate_now = done == total or (settings.eval_every is not None and done % settings.eval_every == 0)
            if done % settings.log_every == 0 or evaluate_now:
                row: dict[str, Any] = {"step": done, "epoch": round(done / steps_per_epoch, 3),
                                       "loss": float(loss_sum / loss_count),
                                       "lr": max(g["lr"] for g in optimizer.param_groups)}
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"finetune loss is {row['loss']} at step {done}; try a lower finetune.lr")
                loss_sum, loss_count = torch.zeros((), device=device), 0
                if evaluate_now:
                    metrics = validate()
                    row.update({k: v for k, v in metrics.items() if k != "clips"})
                history.append(row)
                bar.update(task, loss=f"{row['loss']:.4f}", top1=f"{metrics['top1']:.3f}" if "top1" in metrics else "-")
            bar.update(task, completed=done)
    wall = time.perf_counter() - t0

    weights = run_dir / "finetune" / "model.safetensors"
    checkpoint = relative_path(Path(run.checkpoint), run_dir)
    _save_weights(weights, model, {
        "format": FINETUNE_FORMAT, "checkpoint": checkpoint, "steps": str(total),
        "classes": json.dumps(classes), "keep_encoder_norm": json.dumps(settings.keep_encoder_norm),
    })
    result: dict[str, Any] = {"checkpoint": checkpoint, "num_classes": len(classes), "chance_top1": 1.0 / len(classes)}
    for key in ("top1", "verb_top1", "noun_top1"):
        if key in metrics:
            result[key] = float(metrics[key])
    resolved = asdict(settings)
    resolved.update({"warmup_steps": warmup, "max_steps": total})
    result.update({
        "steps": total,
        "weights": relative_path(weights, run_dir),
        "data": {"train": str(run.train_manifest), "val": str(val_path) if val_path else None,
                 "train_clips": len(rows), "val_clips": int(metrics.get("clips", 0))},
        "device": str(device),
        "precision": run.precision,
        "wall_s": round(wall, 3),
        "settings": resolved,
        "requested": requested,
        "history": history,
    })
    keep_previous_eval(run_dir, checkpoint, requested, "finetune.json", "requested", "finetuning")
    write_json(run_dir / "finetune.json", result)
    return result


def load_finetuned(run_dir: Path | str, overrides: Sequence[str] = ()) -> tuple[VideoClassifier, list[str]]:
    """The finetuned classifier of ``run_dir`` (weights loaded strictly, eval mode, on the run's
    device) and its class names (logit ``i`` is class ``i``)."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    weights = run_dir / "finetune" / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no finetuned weights at {weights}; run vlmask finetune first")
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FINETUNE_FORMAT:
        raise ValueError(f"{weights}: not vlmask finetuned weights (format {metadata.get('format')!r})")
    classes = list(json.loads(metadata["classes"]))
    _, others = _split_overrides(list(overrides))
    run = _load_pretrained(run_dir, others, None)
    model = VideoClassifier(run.encoder, len(classes), keep_encoder_norm=bool(json.loads(metadata["keep_encoder_norm"])))
    load_strict(model, load_tensors(weights), weights)
    model.to(run.device).eval()
    return model, classes
