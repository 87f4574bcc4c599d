"""Video-text InfoNCE heads: CLIP / MAE+CLIP global pooling and FILS ActCLIP pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmask
from vlmask.types import StepOutputs
from vlmask_plugins.heads.distributed import gather_with_local_gradient
from vlmask_plugins.heads.pooling import POOLING_STRATEGIES, pool_visible_in_box
from vlmask_plugins.precision import without_autocast

POOLINGS = ("mean", "action_area")


def symmetric_infonce(video: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE on L2-normalised embeddings (B, D): pair i matches pair i.

    ``logits = logit_scale * video @ text.T``; ``(CE(logits, arange) + CE(logits.T, arange)) / 2``.

    >>> z = torch.eye(3)
    >>> round(symmetric_infonce(z, z, torch.tensor(10.0)).item(), 4)
    0.0001
    """
    logits = logit_scale * video @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class VideoTextInfoNCEHead(nn.Module):
    """Video-text contrastive loss (CLIP, Radford et al. 2021; open_clip) with FILS ActCLIP pooling.

    ``z_V = normalize(theta(pooled visible features))``, ``z_T = normalize(text embedding)``,
    ``logits = exp(s) z_V z_T^T``, loss ``(CE(logits, arange) + CE(logits^T, arange)) / 2``.
    ``s`` is learnable, initialised to ``log(1 / init_temperature)`` and clamped to at most
    ``log(max_logit_scale)`` after every optimizer step (open_clip), through the
    ``vlmask_after_optimizer_step`` hook.

    Pooling: ``mean`` is the MAE+CLIP global baseline (mean of every visible token);
    ``action_area`` is ActCLIP (FILS, Ahmadian et al., BMVC 2024, eq. 3-6): the mean of the
    visible tokens whose patch centre lies in ``batch.action_box`` (``action_strategy=
    "patch-average"``) or one random such token (``"patch"``, Table 3a); clips without a visible
    token inside fall back to all visible tokens, reported as stat ``fallback_rate``.

    ``patch_iterations`` (Table 3a, "number of iteration"; sec. 4.2, "ActCLIP strategies"): the
    paper contrasts "the average feature extracted from patches within the action area" with
    "randomly selecting one patch within the action area", "repeated ... several times", and more
    iterations approach the patch-average strategy. vlmask reads it as: N in-area tokens drawn at
    random (with replacement) per clip and step, averaged into ONE pooled feature, scored by ONE
    contrastive loss; as N grows the mean of the draws tends to the patch-average feature, which
    is what the text says the results approach. (Until 2026-12 vlmask scored each draw by its own
    loss and averaged the losses; that reading does not approach the patch-average feature and
    was dropped.)

    Across processes (``gather`` and an initialised process group with more than one rank), z_V
    and z_T are gathered from every rank so that every clip of the global batch is a negative
    (open_clip, ``local_loss=False``; the FILS code does not). Each rank computes the loss of
    the whole global batch, equal to the single-process loss on the concatenated batch; see
    :func:`~vlmask_plugins.heads.distributed.gather_with_local_gradient` for the gradient.

    ``turbo_weight`` multiplies the loss by ``1 / log(global batch size)`` (Turbo training's
    lambda_NCE). Stats: ``logit_scale`` (exp(s)) and, for ``action_area``, ``fallback_rate``.
    Under autocast the projection runs in the autocast dtype and the logits and loss in fp32.
    """

    @classmethod
    def requirements(cls, pooling: str = "mean", **_: object) -> frozenset[str]:
        """What the recipe must provide (vlmask.kinds.REQUIREMENTS): a caption embedding and the
        projection always, the action box with ``pooling="action_area"`` (ActCLIP)."""
        needs = {"text_embedding", "projection"}
        return frozenset(needs | {"action_box"}) if pooling == "action_area" else frozenset(needs)

    def __init__(
        self,
        pooling: str = "mean",
        action_strategy: str = "patch-average",
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        gather: bool = True,
        turbo_weight: bool = False,
        patch_iterations: int = 1,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if action_strategy not in POOLING_STRATEGIES:
            raise ValueError(f"action_strategy must be one of {', '.join(POOLING_STRATEGIES)}, got {action_strategy!r}")
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale}")
        if 1.0 / init_temperature > max_logit_scale:
            raise ValueError(
                f"init_temperature={init_temperature} gives a logit scale above max_logit_scale={max_logit_scale}"
            )
        if isinstance(patch_iterations, bool) or int(patch_iterations) != patch_iterations or patch_iterations < 1:
            raise ValueError(f"patch_iterations must be a positive integer, got {patch_iterations!r}")
        if patch_iterations > 1 and (pooling != "action_area" or action_strategy != "patch"):
            raise ValueError("patch_iterations > 1 needs pooling='action_area' and action_strategy='patch'")
        self.patch_iterations = int(patch_iterations)
        self.pooling = pooling
        self.action_strategy = action_strategy
        self.max_logit_scale = float(max_logit_scale)
        self.gather = bool(gather)
        self.turbo_weight = bool(turbo_weight)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def no_weight_decay(self) -> set[str]:
        """open_clip / timm's CLIP: the temperature is not decayed."""
        return {"logit_scale"}

    @vlmask.hookimpl
    def vlmask_after_optimizer_step(self, step: int) -> None:
        """open_clip: clamp the learnable log logit scale to ``[0, log(max_logit_scale)]``."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        if out.batch.text_embedding is None:
            raise ValueError(
                "head 'video_text_infonce' needs batch.text_embedding; the recipe needs a text encoder and captions"
            )
        if out.projection is None:
            raise ValueError("head 'video_text_infonce' needs the student's video-to-text projection (text_dim)")
        stats: dict[str, Tensor] = {}
        if self.pooling == "mean":
            pooled = out.visible_features.mean(dim=1)
        else:
            if out.batch.action_box is None:
                raise ValueError(
                    "head 'video_text_infonce' with pooling='action_area' needs batch.action_box; add action_box "
                    "to the manifest or an action-area detector, or use pooling='mean'"
                )
            draws = []
            for _ in range(self.patch_iterations):  # Table 3a: N random in-area patches, one averaged feature
                drawn, fell_back = pool_visible_in_box(
                    out.visible_features, out.mask.visible, out.grid, out.batch.action_box, self.action_strategy
                )
                draws.append(drawn)
            pooled = draws[0] if len(draws) == 1 else torch.stack(draws).mean(dim=0)
            stats["fallback_rate"] = fell_back.float().mean().detach()
        text = F.normalize(out.batch.text_embedding.float(), dim=-1)
        if self.gather:
            text = gather_with_local_gradient(text)
        video = F.normalize(out.projection(pooled).float(), dim=-1)  # the loss in fp32 (see below)
        if out.batch.text_embedding.shape != video.shape:
            raise ValueError(
                f"head 'video_text_infonce': projected video features {tuple(video.shape)} do not match the text "
                f"embeddings {tuple(out.batch.text_embedding.shape)}; the projection must map to text_dim"
            )
        if self.gather:
            video = gather_with_local_gradient(video)
        with without_autocast(video.device):  # bf16 logits near 100 would step by 0.5
            loss = symmetric_infonce(video, text, self.logit_scale.float().exp())
        if self.turbo_weight:
            loss = loss / math.log(video.shape[0])
        stats["logit_scale"] = self.logit_scale.detach().exp()
        return loss, stats
