"""``vlmask show attention``: where a video ViT block attends (FILS Figure 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmask.pictures import Panel, Scale, ends_and_middle, heat_overlay, slot_of_frames, token_map
from vlmask.show import ShowError, ShownClips
from vlmask_plugins.encoders.attention import Attention


def attention_blocks(encoder: nn.Module) -> list[Attention]:
    """The self-attention layer of each block of a video ViT (``encoder.blocks[i].attn``), in
    order; empty for an encoder without such blocks."""
    blocks = getattr(encoder, "blocks", None) or []
    return [block.attn for block in blocks if isinstance(getattr(block, "attn", None), Attention)]


def block_index(layer: int | None, count: int, where: str) -> int:
    """``layer`` (None: the last; negative: from the end) as an index into ``count`` blocks."""
    layer = -1 if layer is None else layer
    if not -count <= layer < count:
        raise ShowError(f"attention: --layer {layer} is out of range: {where} has {count} blocks "
                        f"(0-{count - 1}, or -{count}..-1)")
    return layer % count


def attention_probabilities(attn: Attention, x: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) of ``attn`` on its input ``x`` (B, N, D): (B, heads, N, N),
    computed explicitly (the layer itself runs SDPA / xformers, which return no probabilities)."""
    batch, tokens, _ = x.shape
    q, k, _ = attn.qkv(x).float().reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).unbind(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.head_dim**-0.5
    return scores.softmax(dim=-1)


def attention_received(encoder: nn.Module, video: Tensor, layer: int) -> Tensor:
    """(B, N): the attention every token receives in block ``layer`` of ``encoder``, averaged
    over heads and queries, with every token of ``video`` encoded. Each row sums to 1.

    The block's input is caught by a forward hook on its attention layer while the encoder
    runs as in training (nothing of the training path changes); the probabilities are then
    computed from that layer's own q and k (:func:`attention_probabilities`)."""
    attn = attention_blocks(encoder)[layer]
    caught: list[Tensor] = []
    handle = attn.register_forward_pre_hook(lambda module, args: caught.append(args[0].detach()))
    try:
        index = torch.arange(encoder.grid.num_tokens, device=video.device).expand(video.shape[0], -1)
        with torch.no_grad():
            encoder(video, index)
            probabilities = attention_probabilities(attn, caught[-1])
    finally:
        handle.remove()
    return probabilities.mean(dim=(1, 2))


def frame_distributions(received: Tensor, shown: ShownClips, row: int, frames: list[int]) -> Tensor:
    """(F, h, w) float64: for each of ``frames``, the attention its temporal slot's tokens
    receive, renormalised to sum to 1 over the slot (one distribution per frame)."""
    maps = torch.from_numpy(token_map(received[row], shown.grid))[slot_of_frames(frames, shown.grid)]
    return maps / maps.sum(dim=(1, 2), keepdim=True)


def attention(shown: ShownClips) -> list[list[Panel]]:
    """last (or --layer) block's attention to each token, on the first, middle and last frames (FILS Figure 3).

    FILS (Ahmadian et al., BMVC 2024) Figure 3 shows last-layer attention heat maps of the
    first, middle and last frames for FILS, FP and pixel MSE. Here: block ``--layer`` (default
    the last) of the student's encoder on every token of the clip, its attention probabilities
    averaged over heads and over queries (what each token receives), each frame's temporal slot
    renormalised to a distribution (:func:`frame_distributions`); unsmoothed, one cell per token.
    """
    encoder = shown.run.encoder
    blocks = attention_blocks(encoder)
    name = shown.run.recipe.get("model.encoder.name")
    if not blocks:
        raise ShowError(f"attention: {shown.name}: encoder {name!r} has no transformer blocks with vlmask "
                        "Attention layers (blocks[i].attn)")
    layer = block_index(shown.layer, len(blocks), f"the encoder {name!r} of {shown.name}")
    received = attention_received(encoder, shown.batch.video, layer)
    frames = ends_and_middle(shown.frames.shape[1])
    pictures = []
    for row in range(shown.batch.size):
        values = frame_distributions(received, shown, row, frames).numpy()
        scale = Scale(float(values.min()), float(values.max()), "attention (sums to 1 per frame)")
        images = heat_overlay(shown.frames[row][frames], values, shown.grid, scale)
        pictures.append([Panel(f"layer {layer} (block {layer + 1} of {len(blocks)}): attention received", images,
                               shown.frame_labels(frames), values=values, scale=scale)])
    return pictures
