"""The student video encoder: a VideoMAE-style video ViT that encodes only the tokens it is given.

Registered names: ``video_vit`` (every argument explicit) and the presets ``video_vit_tiny``,
``video_vit_small``, ``video_vit_base``, ``video_vit_large`` (width, depth and heads fixed;
every other argument passes through).
"""

import inspect
import typing
from functools import partial
from typing import Any, Callable

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlmask.types import TokenGrid, gather_tokens
from vlmask_plugins.encoders.attention import (
    Attention,
    check_attention_choice,
    infer_device,
    set_attention_backend,
)

#: VideoMAE's LayerNorm (eps 1e-6, as in its ``partial(nn.LayerNorm, eps=1e-6)``).
LayerNorm = partial(nn.LayerNorm, eps=1e-6)

#: Values of ``pos_embed``.
POSITION_CHOICES: tuple[str, ...] = ("sincos", "learned")


def sinusoid_encoding_table(num_positions: int, dim: int) -> Tensor:
    """VideoMAE's ``get_sinusoid_encoding_table``: a fixed (num_positions, dim) float32 table.

    Entry (pos, j) is ``sin(pos / 10000 ** (2 * (j // 2) / dim))`` for even j and the cosine of
    the same angle for odd j (sin and cos interleaved, one 1-D position per token). Computed in
    float64 like the reference (NumPy) and then cast to float32.

    >>> table = sinusoid_encoding_table(4, 6)
    >>> tuple(table.shape), float(table[0, 0]), float(table[0, 1])
    ((4, 6), 0.0, 1.0)
    """
    if num_positions < 1 or dim < 1:
        raise ValueError(f"num_positions and dim must be positive, got {num_positions} and {dim}")
    cpu64 = {"dtype": torch.float64, "device": "cpu"}
    positions = torch.arange(num_positions, **cpu64).unsqueeze(1)
    exponents = 2 * (torch.arange(dim, **cpu64) // 2) / dim
    angles = positions / torch.pow(torch.tensor(10000.0, **cpu64), exponents)
    table = angles.clone()
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def build_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float
) -> nn.ModuleList:
    """``depth`` pre-norm timm ViT blocks using vlmask's switchable :class:`Attention`.

    Stochastic depth rises linearly from 0 to ``drop_path`` over the blocks (VideoMAE, DeiT).
    """
    rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(
        Block(
            dim=dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path=rate,
            norm_layer=LayerNorm,
            attn_layer=Attention,
        )
        for rate in rates
    )


def run_blocks(blocks: nn.ModuleList, x: Tensor, grad_checkpointing: bool) -> Tensor:
    """Apply ``blocks`` in order; with ``grad_checkpointing`` recompute each block in backward."""
    use_checkpoint = grad_checkpointing and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    return x


def init_transformer_weights(module: nn.Module) -> None:
    """VideoMAE/MAE init: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_positive(**values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


class VideoViT(nn.Module):
    """Video ViT encoder of VideoMAE (Tong et al., "VideoMAE: Masked Autoencoders are Data-Efficient
    Learners for Self-Supervised Video Pre-Training", NeurIPS 2022).

    A clip (B, C, T, H, W) is cut into ``tubelet x patch x patch`` tubelets by a Conv3d, one token
    each, ordered (t, h, w) as in :class:`vlmask.types.TokenGrid`. Positions are VideoMAE's fixed
    1-D sin-cos table over the N tokens (``pos_embed="sincos"``) or a learned table. ``forward``
    keeps only the tokens listed in ``index`` before the transformer, so its cost scales with the
    visible tokens (the patch embedding still sees every tubelet, as in VideoMAE).

    ``attention`` ("auto" | "xformers" | "sdpa") picks the attention kernel; the device is not
    known at construction, so call :meth:`set_attention_backend` after moving the model.
    """

    def __init__(
        self,
        num_frames: int = 16,
        img_size: int = 224,
        tubelet: int = 2,
        patch: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        pos_embed: str = "sincos",
        attention: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_positive(
            num_frames=num_frames, img_size=img_size, tubelet=tubelet, patch=patch, in_chans=in_chans,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        )  # fmt: skip
        if num_frames % tubelet:
            raise ValueError(f"num_frames ({num_frames}) must be divisible by tubelet ({tubelet})")
        if img_size % patch:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch ({patch})")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if pos_embed not in POSITION_CHOICES:
            raise ValueError(f"pos_embed must be one of {', '.join(POSITION_CHOICES)}; got {pos_embed!r}")
        check_attention_choice(attention)

        self.grid = TokenGrid.for_clip(num_frames, img_size, img_size, tubelet, patch)
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.grad_checkpointing = grad_checkpointing
        self.attention = attention

        self.patch_embed = nn.Conv3d(
            in_chans, embed_dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch)
        )
        num_tokens = self.grid.num_tokens
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sinusoid_encoding_table(num_tokens, embed_dim)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.blocks = build_blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path)
        self.norm = LayerNorm(embed_dim)

        self.apply(init_transformer_weights)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(embed_dim, -1))  # MAE: init the conv like a Linear
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

        # The device is not known yet: "auto" means sdpa until set_attention_backend(device=...).
        self.attention_backend, self.attention_reason = set_attention_backend(self, attention, None)

    def set_attention_backend(
        self, requested: str | None = None, device: torch.device | str | None = None
    ) -> tuple[str, str]:
        """Resolve the attention backend for ``device`` (default: where the parameters are) and
        switch every attention layer to it. ``requested`` defaults to the recipe's ``attention``.
        Returns ``(backend, reason)``; raises :class:`AttentionBackendError` when xformers was
        explicitly requested but cannot run there."""
        requested = self.attention if requested is None else requested
        device = infer_device(self) if device is None else device
        self.attention_backend, self.attention_reason = set_attention_backend(self, requested, device)
        return self.attention_backend, self.attention_reason

    def no_weight_decay(self) -> set[str]:
        """timm's ViT: the positions are not decayed (a learned table; the sin-cos one is a buffer)."""
        return {"pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed(self, video: Tensor) -> Tensor:
        """Tokens of every tubelet with positions added: (B, C, T, H, W) -> (B, N, D)."""
        expected = (self.in_chans, self.grid.t * self.grid.tubelet, self.grid.h * self.grid.patch,
                    self.grid.w * self.grid.patch)  # fmt: skip
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"video must have shape (B, {', '.join(map(str, expected))}), got {tuple(video.shape)}")
        tokens = self.patch_embed(video).flatten(2).transpose(1, 2)  # (B, D, t, h, w) -> (B, N, D), (t, h, w) order
        return tokens + self.pos_embed.to(tokens.dtype)

    def forward(self, video: Tensor, index: Tensor | None = None) -> Tensor:
        """Encode the tokens ``index`` (B, Nv) of ``video`` (B, C, T, H, W) -> (B, Nv, D).

        ``index=None`` encodes all N tokens. The transformer only ever sees the selected tokens.
        """
        tokens = self.embed(video)
        if index is not None:
            if index.ndim != 2 or index.shape[0] != tokens.shape[0]:
                raise ValueError(f"index must have shape (B={tokens.shape[0]}, Nv), got {tuple(index.shape)}")
            tokens = gather_tokens(tokens, index)
        tokens = run_blocks(self.blocks, tokens, self.grad_checkpointing)
        return self.norm(tokens)


_PRESET_FIXED = ("embed_dim", "depth", "num_heads")


def _preset(name: str, embed_dim: int, depth: int, num_heads: int, doc: str) -> Callable[..., VideoViT]:
    """A factory of :class:`VideoViT` with width, depth and heads fixed; its signature (what
    ``vlmask validate`` checks) is VideoViT's other arguments, keyword-only, with their types."""

    def factory(**kwargs: Any) -> VideoViT:
        return VideoViT(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)

    signature = inspect.signature(VideoViT)
    kept = [p.replace(kind=p.KEYWORD_ONLY) for n, p in signature.parameters.items() if n not in _PRESET_FIXED]
    hints = typing.get_type_hints(VideoViT.__init__)
    factory.__signature__ = signature.replace(parameters=kept, return_annotation=VideoViT)  # type: ignore[attr-defined]
    factory.__annotations__ = {p.name: hints[p.name] for p in kept if p.name in hints}
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    return factory


video_vit_tiny = _preset("video_vit_tiny", 192, 12, 3, "VideoMAE video ViT-Ti (width 192, 12 blocks, 3 heads; Tong et al., 2022).")
video_vit_small = _preset("video_vit_small", 384, 12, 6, "VideoMAE video ViT-S (width 384, 12 blocks, 6 heads; Tong et al., 2022).")
video_vit_base = _preset(
    "video_vit_base", 768, 12, 12, "VideoMAE video ViT-B (width 768, 12 blocks, 12 heads; Tong et al., 2022), the FILS encoder."
)
video_vit_large = _preset("video_vit_large", 1024, 24, 16, "VideoMAE video ViT-L (width 1024, 24 blocks, 16 heads; Tong et al., 2022).")


#: Registered name -> factory of every encoder in this module.
ENCODERS = {
    "video_vit": VideoViT,
    "video_vit_tiny": video_vit_tiny,
    "video_vit_small": video_vit_small,
    "video_vit_base": video_vit_base,
    "video_vit_large": video_vit_large,
}
