"""CoCLR's two streams as one head (Han, Xie & Zisserman, "Self-supervised Co-training for Video
Representation Learning", NeurIPS 2020; thesis ch. 4, eq. 4.1-4.5).

The RGB stream is the student's encoder; the optical-flow stream is a second encoder of the
same architecture, owned by this head. Each stream has a projection MLP, a momentum (MoCo)
copy of encoder and projection, and a queue of the momentum copy's past keys; the two queues
are filled with the same clips in the same order, so a row of one names the same clip as the
row of the other (what eq. 4.3's cross-stream mining relies on). Encoders, momentum copies and
queues are parameters and buffers of the head, so the run's checkpoint holds all of them and a
resume is exact.

Two switches (``stage_settable``: a recipe's ``stages`` change them between steps, see
``vlmask.stages``):

``stream`` (which stream trains)
    ``both`` (stage 1: each stream learns alone), ``rgb`` or ``flow`` (stage 2's alternation:
    the other stream runs without gradient and only mines positives).
``positives``
    ``self``: InfoNCE with the momentum queue, the clip's own key the only positive (eq. 4.1);
    ``topk``: multi-instance InfoNCE (eq. 4.2 RGB, 4.4 flow) whose positives are the clip plus the ``topk``
    queue entries nearest to it in the OTHER stream (eq. 4.3, 4.5); ``labels``: UberNCE, the clips of
    the same class (sec. 4.3.1, an unnumbered equation; the supervised upper bound; needs labels).

Views (CoCLR's data, Han et al. sec. 4.1): the query is the clip as loaded; the key is, with
``key_view="clip"`` (the default, as CoCLR), the dataset's second clip of the same video
(``data.dataset.second_clip: true``: another temporal draw with its own crop, and its own flow
images), or, with ``key_view="crop"``, a random crop (scale ``key_crop_scale``) of the same clip
resized back, the same crop for RGB and flow (cheaper: one decode and one flow computation per
clip, but the two views then show the same frames). Flow comes from the dataset
(``data.dataset.flow: true``): DIS flow images, 3 channels x/y/zero
(``vlmask_plugins.action_area.flow.flow_images``). The RGB query runs the student's encoder on
every token of the clip; the recipe's masker only decides what the student's own forward
encodes (``StepOutputs.visible_features``), which this head does not use.

Keys of the query's own clip. A third queue buffer, ``queue_clips``, holds the clip identity of
each key (the manifest row, ``Batch.index``; -1 for the initial random keys or a batch without
``index``), filled by the same enqueue. A queue entry of the query's own clip (another augmentation
of it, enqueued at an earlier step: certain once the data set is smaller than the queue, or after
an epoch) is never a negative: with ``positives="self"`` it leaves the softmax (eq. 4.1's ``N_i =
{psi(x_n; a) | n != i}``); with ``topk`` or ``labels`` it is a positive (eq. 4.3's ``P_1i``
holds every augmentation ``psi(x_1i; a)``; the top-K neighbours are mined among the other clips),
as the released code's ``queue_vname`` does for CoCLR (``vlmask_plugins.targets.coclr``). The
statistic ``same_clip`` is the mean number of such entries per query. Identity is the manifest
row: two rows cut from the same source video (UCF101's "sibling" clips, which the released code
matches by video source) are different clips here. Checkpoints written before ``queue_clips``
existed load with it all -1 (:meth:`CoCLRHead.checkpoint_defaults`, read by
``vlmask.checkpoint.load_strict`` and by :meth:`CoCLRHead._load_from_state_dict`): such a resumed
run forgets which clips its queue holds, so entries enqueued before the resume count as
negatives until they leave the queue, as they did when they were written.

Several processes (``torchrun``; ``train.parallel`` ``ddp`` or ``fsdp``), as MoCo does
(``concat_all_gather`` before ``_dequeue_and_enqueue``, facebookresearch/moco ``builder.py``):
each step gathers the RGB keys, flow keys and labels of every rank, in rank order and without
gradient (:func:`vlmask_plugins.heads.distributed.concat_all_gather`; a rank whose batch has no
labels or no clip index sends -1), and every rank enqueues all of them, so the queues are identical on every rank
and the pointer moves by world size x batch size per step. Those keys must fit in the queue
(``queue_size`` >= world size x ``train.batch_size``): a step with more is refused, also when
FLOPs are counted on the meta device (which enqueues nothing). Under DDP the engine keeps DDP's
default ``broadcast_buffers``: each forward overwrites the queues with rank 0's, which are the
same (redundant, harmless). Under FSDP the key encoders are sharded with the student's root unit
and the student's encoder per block, so the momentum update combines shards elementwise (no
gather); the FSDP run matches the DDP run (``tests/vlmask_plugins/heads/test_coclr_distributed.py``).
The stages of ``coclr/coclr.yaml`` freeze one stream at a time, so DDP must not wait for the
frozen stream's gradients: the engine wraps a recipe whose stages freeze anything with
``find_unused_parameters=True`` (``vlmask.stages``), whatever ``train.find_unused_parameters`` says.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmask
from vlmask.types import StepOutputs
from vlmask_plugins.encoders.vit import init_transformer_weights
from vlmask_plugins.heads.distributed import concat_all_gather, world
from vlmask_plugins.targets.coclr import (
    enqueue,
    label_positive_mask,
    multi_instance_infonce,
    queue_infonce,
    same_clip_mask,
    topk_positive_mask,
)

STREAMS = ("both", "rgb", "flow")
POSITIVES = ("self", "topk", "labels")
KEY_VIEWS = ("clip", "crop")


def projection_mlp(width: int, dim: int) -> nn.Sequential:
    """MoCo v2's projection: Linear, ReLU, Linear (CoCLR uses it on the pooled feature)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))


def momentum_copy(module: nn.Module) -> nn.Module:
    copied = copy.deepcopy(module)
    for parameter in copied.parameters():
        parameter.requires_grad_(False)
    return copied


def crop_resize(video: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    """(B, C, T, H, W): the window ``[top:top+height, left:left+width]`` resized back to (H, W)."""
    frames, full_h, full_w = video.shape[2:]
    window = video[..., top:top + height, left:left + width]
    return F.interpolate(window, size=(frames, full_h, full_w), mode="trilinear", align_corners=False)


class CoCLRHead(nn.Module):
    """CoCLR (Han et al., NeurIPS 2020): RGB and optical-flow streams, each a MoCo with a queue;
    InfoNCE per stream (eq. 4.1), co-training with top-K positives mined in the other stream
    (eq. 4.2-4.5), or UberNCE's label positives (sec. 4.3.1).

    ``encoder`` (injected) is the student's encoder: the RGB stream, and the architecture the
    flow stream copies (re-initialised). ``dim`` is the projection width, ``queue_size`` the
    number of negatives per stream, ``momentum`` MoCo's m, ``topk`` CoCLR's K.
    """

    stage_settable = ("stream", "positives")

    @classmethod
    def requirements(cls, positives: str = "self", key_view: str = "clip", **_: Any) -> frozenset[str]:
        needs = {"flow"} | ({"label"} if positives == "labels" else set())
        return frozenset(needs | ({"second_clip"} if key_view == "clip" else set()))

    def __init__(
        self,
        encoder: nn.Module,
        encoder_dim: int,
        dim: int = 128,
        queue_size: int = 2048,
        temperature: float = 0.07,
        momentum: float = 0.999,
        topk: int = 5,
        stream: str = "both",
        positives: str = "self",
        key_crop_scale: float = 0.7,
        key_view: str = "clip",
    ) -> None:
        super().__init__()
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {', '.join(POSITIVES)}, got {positives!r}")
        if key_view not in KEY_VIEWS:
            raise ValueError(f"key_view must be one of {', '.join(KEY_VIEWS)}, got {key_view!r}")
        if not 0 <= topk <= queue_size:
            raise ValueError(f"topk must be in [0, queue_size={queue_size}], got {topk}")
        if not 0.0 <= momentum < 1.0 or temperature <= 0 or dim < 1 or queue_size < 1:
            raise ValueError("momentum must be in [0, 1), temperature > 0, dim and queue_size >= 1")
        if not 0.0 < key_crop_scale <= 1.0:
            raise ValueError(f"key_crop_scale must be in (0, 1], got {key_crop_scale}")
        self.stream, self.positives = stream, positives  # the stage switches
        self.temperature, self.momentum, self.topk, self.key_crop_scale = temperature, momentum, topk, key_crop_scale
        self.key_view = key_view
        self._online_rgb = [encoder]  # the student's encoder: not registered here (the student owns it)
        self.flow_encoder = copy.deepcopy(encoder)
        self.flow_encoder.apply(init_transformer_weights)
        self.rgb_projection = projection_mlp(encoder_dim, dim)
        self.flow_projection = projection_mlp(encoder_dim, dim)
        self.rgb_key_encoder = momentum_copy(encoder)
        self.rgb_key_projection = momentum_copy(self.rgb_projection)
        self.flow_key_encoder = momentum_copy(self.flow_encoder)
        self.flow_key_projection = momentum_copy(self.flow_projection)
        self.register_buffer("rgb_queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("flow_queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_clips", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def checkpoint_defaults(self) -> dict[str, Tensor]:
        """State added after checkpoints of earlier runs were written, with the value such a
        checkpoint stands for: ``queue_clips`` all -1 (no entry known to be of any clip, which is
        how those runs treated every entry). Read by ``vlmask.checkpoint.load_strict`` for a key
        the checkpoint lacks, and by :meth:`_load_from_state_dict` for ``load_state_dict``."""
        return {"queue_clips": torch.full_like(self.queue_clips, -1, device="cpu")}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # PyTorch's upgrade idiom (as BatchNorm fills ``num_batches_tracked``): a state dict of a
        # CoCLR run made before ``queue_clips`` existed gets it all -1
        for name, value in self.checkpoint_defaults().items():
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @vlmask.hookimpl
    def vlmask_after_optimizer_step(self, step: int) -> None:
        """MoCo's momentum update of both streams' key encoders and projections."""
        pairs = ((self._online_rgb[0], self.rgb_key_encoder), (self.rgb_projection, self.rgb_key_projection),
                 (self.flow_encoder, self.flow_key_encoder), (self.flow_projection, self.flow_key_projection))
        with torch.no_grad():
            for online, key in pairs:
                for p_key, p_online in zip(key.parameters(), online.parameters()):
                    p_key.mul_(self.momentum).add_(p_online.detach(), alpha=1.0 - self.momentum)

    def _embed(self, encoder: nn.Module, projection: nn.Module, clip: Tensor) -> Tensor:
        return F.normalize(projection(encoder(clip).mean(dim=1)), dim=1)

    def _key_window(self, height: int, width: int) -> tuple[int, int, int, int]:
        scale = self.key_crop_scale + (1.0 - self.key_crop_scale) * float(torch.rand(()))
        crop_h, crop_w = max(1, round(height * scale**0.5)), max(1, round(width * scale**0.5))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return top, left, crop_h, crop_w

    def _key_views(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        """The key view's RGB and flow: the dataset's second clip, or a crop of the clip."""
        batch = out.batch
        if self.key_view == "clip":
            if batch.second_video is None or batch.second_flow is None:
                raise ValueError("head 'coclr' with key_view='clip' needs batch.second_video and batch.second_flow: "
                                 "set data.dataset.second_clip: true and data.dataset.flow: true")
            return batch.second_video, batch.second_flow
        assert batch.flow is not None
        window = self._key_window(*batch.video.shape[-2:])
        return crop_resize(batch.video, *window), crop_resize(batch.flow, *window)

    def _positives(self, other_query: Tensor, other_queue: Tensor, labels: Tensor | None, same: Tensor) -> Tensor | None:
        """The positive mask (B, 1 + Q) of ``topk`` or ``labels``, the keys of the query's own
        clip (``same``, (B, Q)) among them; None for ``self`` (InfoNCE)."""
        if self.positives == "topk":
            positives = topk_positive_mask(other_query, other_queue, self.topk, skip=same)
        elif self.positives == "labels":
            if labels is None:
                raise ValueError("head 'coclr' with positives='labels' (UberNCE) needs batch.label (labels in the manifest)")
            positives = label_positive_mask(labels, self.queue_labels)
        else:
            return None
        return positives | torch.cat([torch.zeros_like(same[:, :1]), same], dim=1)

    def _loss(self, query: Tensor, key: Tensor, queue: Tensor, positives: Tensor | None, same: Tensor) -> Tensor:
        if positives is None:  # InfoNCE: the own clip's queue entries are no negatives (eq. 4.1's N_i)
            return queue_infonce(query, key, queue, self.temperature, exclude=same)
        return multi_instance_infonce(query, key, queue, positives, self.temperature)

    def _same_clip(self, clips: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        """(B, Q) bool: the queue entries of each query's own clip (none without ``Batch.index``)."""
        if clips is None:
            return torch.zeros(batch_size, self.queue_clips.shape[0], dtype=torch.bool, device=device)
        return same_clip_mask(clips, self.queue_clips)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        video, flow, labels = out.batch.video, out.batch.flow, out.batch.label
        if flow is None:
            raise ValueError("head 'coclr' needs batch.flow: set data.dataset.flow: true")
        if out.encoder is None:
            raise ValueError("head 'coclr' needs the student's encoder in StepOutputs.encoder")
        train_rgb, train_flow = self.stream in ("both", "rgb"), self.stream in ("both", "flow")
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and train_rgb):
            q_rgb = self._embed(out.encoder, self.rgb_projection, video)
        with torch.set_grad_enabled(grad and train_flow):
            q_flow = self._embed(self.flow_encoder, self.flow_projection, flow)
        key_video, key_flow = self._key_views(out)
        with torch.no_grad():
            k_rgb = self._embed(self.rgb_key_encoder, self.rgb_key_projection, key_video)
            k_flow = self._embed(self.flow_key_encoder, self.flow_key_projection, key_flow)
        rgb_queue, flow_queue = self.rgb_queue.clone(), self.flow_queue.clone()  # the enqueue below is in place
        clips = out.batch.index
        same = self._same_clip(clips, q_rgb.shape[0], q_rgb.device)  # read before the enqueue below
        total = q_rgb.new_zeros(())
        stats: dict[str, Tensor] = {"same_clip": same.sum(dim=1).float().mean()}
        for name, trained, query, key, queue, other_query, other_queue in (
            ("rgb", train_rgb, q_rgb, k_rgb, rgb_queue, q_flow, flow_queue),
            ("flow", train_flow, q_flow, k_flow, flow_queue, q_rgb, rgb_queue),
        ):
            if not trained:
                continue
            positives = self._positives(other_query.detach(), other_queue, labels, same)
            loss = self._loss(query, key, queue, positives, same)
            total = total + loss
            stats[name] = loss.detach()
            if positives is not None:
                stats[f"{name}_positives"] = positives.sum(dim=1).float().mean().detach()
        if self.training:
            self._enqueue(k_rgb, k_flow, labels, clips)
        return total, stats

    @torch.no_grad()
    def _enqueue(self, k_rgb: Tensor, k_flow: Tensor, labels: Tensor | None, clips: Tensor | None = None) -> None:
        """MoCo's enqueue with every rank's keys (``concat_all_gather`` before
        ``_dequeue_and_enqueue``, facebookresearch/moco ``builder.py``): the keys, labels and clip
        identities of all ranks, in rank order, go into the queues of every rank, which therefore
        stay identical. A rank without labels (or clip indices) contributes -1 and still joins
        every collective."""
        _, world_size = world()
        count, queue_size = world_size * k_rgb.shape[0], self.rgb_queue.shape[0]
        if count > queue_size:  # checked on shapes, so a FLOP count on the meta device catches it too
            raise ValueError(f"head 'coclr': a step enqueues {count} keys (world size {world_size} x batch size "
                             f"{k_rgb.shape[0]}), more than heads.coclr.queue_size={queue_size}: raise "
                             "heads.coclr.queue_size or lower train.batch_size")
        if self.rgb_queue.is_meta:  # FLOP counting runs on the meta device: no values, no collectives
            return
        unknown = torch.full((k_rgb.shape[0],), -1, dtype=torch.long, device=k_rgb.device)
        labels = unknown if labels is None else labels.to(k_rgb.device, torch.long)
        clips = unknown if clips is None else clips.to(k_rgb.device, torch.long)
        k_rgb, k_flow = concat_all_gather(k_rgb), concat_all_gather(k_flow)
        labels, clips = concat_all_gather(labels), concat_all_gather(clips)
        pointer = self.queue_pointer  # a device tensor: no host-device sync in the step
        for queue, rows in ((self.rgb_queue, k_rgb), (self.flow_queue, k_flow), (self.queue_labels, labels),
                            (self.queue_clips, clips)):
            updated, next_pointer = enqueue(queue, rows, pointer)
            queue.copy_(updated)
        self.queue_pointer.copy_(next_pointer)
