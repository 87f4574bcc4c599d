"""The predictor: from the student's visible-token features to predictions at ``mask.predict``."""

import torch
from torch import Tensor, nn

from vlmask.types import Mask, TokenGrid, gather_tokens
from vlmask_plugins.encoders.attention import check_attention_choice, infer_device, set_attention_backend
from vlmask_plugins.encoders.vit import (
    LayerNorm,
    build_blocks,
    check_positive,
    init_transformer_weights,
    run_blocks,
    sinusoid_encoding_table,
)

#: Named values of ``output``.
OUTPUT_CHOICES: tuple[str, ...] = ("features", "pixels")


class TransformerPredictor(nn.Module):
    """Transformer decoder/predictor over visible features plus mask tokens: the VideoMAE decoder
    (Tong et al., NeurIPS 2022), the V-JEPA predictor (Bardes et al., 2024) and the FILS feature
    predictor (Ahmadian et al., "FILS: Self-Supervised Video Feature Prediction In Semantic
    Language Space", BMVC 2024).

    The visible features are projected to width ``dim`` and given the fixed sin-cos positions of
    their tokens; one learned mask token per predicted token, plus that token's position, is
    appended; the blocks run on the Nv + Np tokens; after a LayerNorm and a linear head only the
    last Np rows are returned, in ``mask.predict`` order.

    ``output``: "features" (width ``encoder_dim``: latent or language-space targets), "pixels"
    (``3 * tubelet * patch * patch``: VideoMAE pixel targets) or an int width.
    ``encoder_dim`` and ``grid`` are injected by the engine.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid: TokenGrid,
        dim: int = 384,
        depth: int = 4,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        output: str | int = "features",
        attention: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_positive(encoder_dim=encoder_dim, dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        if not isinstance(grid, TokenGrid):
            raise ValueError(f"grid must be a vlmask.types.TokenGrid, got {type(grid).__name__}")
        check_attention_choice(attention)
        self.out_width = self.output_width(output, encoder_dim, grid)
        self.encoder_dim = encoder_dim
        self.grid = grid
        self.dim = dim
        self.output = output
        self.grad_checkpointing = grad_checkpointing
        self.attention = attention

        self.embed = nn.Linear(encoder_dim, dim, bias=False)  # VideoMAE's encoder_to_decoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sinusoid_encoding_table(grid.num_tokens, dim)[None], persistent=False)
        self.blocks = build_blocks(dim, depth, num_heads, mlp_ratio, qkv_bias=True, drop_path=0.0)
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, self.out_width)

        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.attention_backend, self.attention_reason = set_attention_backend(self, attention, None)

    @staticmethod
    def output_width(output: str | int, encoder_dim: int, grid: TokenGrid) -> int:
        """The width of one prediction for an ``output`` setting."""
        if isinstance(output, bool) or not isinstance(output, (str, int)):
            raise ValueError(f"output must be 'features', 'pixels' or a positive int, got {output!r}")
        if isinstance(output, int):
            if output < 1:
                raise ValueError(f"output must be a positive width, got {output}")
            return output
        if output == "features":
            return encoder_dim
        if output == "pixels":
            return 3 * grid.tubelet * grid.patch * grid.patch
        raise ValueError(f"output must be one of {', '.join(OUTPUT_CHOICES)} or a positive int, got {output!r}")

    def set_attention_backend(
        self, requested: str | None = None, device: torch.device | str | None = None
    ) -> tuple[str, str]:
        """Same contract as :meth:`VideoViT.set_attention_backend`."""
        requested = self.attention if requested is None else requested
        device = infer_device(self) if device is None else device
        self.attention_backend, self.attention_reason = set_attention_backend(self, requested, device)
        return self.attention_backend, self.attention_reason

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """VideoMAE / timm: the learned mask token is not decayed (the positions are a buffer)."""
        return {"mask_token"}

    def forward(self, visible_features: Tensor, mask: Mask) -> Tensor:
        """(B, Nv, encoder_dim) features of ``mask.visible`` -> (B, Np, out_width) at ``mask.predict``."""
        tokens = self.hidden_tokens(visible_features, mask)
        return self.head(self.norm(tokens[:, visible_features.shape[1]:]))

    def hidden_tokens(self, visible_features: Tensor, mask: Mask) -> Tensor:
        """The tokens after the blocks, before the final LayerNorm and the head: (B, Nv + Np,
        dim), the Nv visible tokens first, then the Np mask tokens in ``mask.predict`` order.
        ``mask.predict`` may be empty (B, 0): the blocks then run on the visible tokens alone
        (the aggregated context of the ``future`` predictor, ``FuturePredictor.context``)."""
        batch, num_visible, width = visible_features.shape
        if width != self.encoder_dim:
            raise ValueError(f"visible_features have width {width}, but encoder_dim is {self.encoder_dim}")
        predict_ok = mask.predict.ndim == 2 and mask.predict.shape[0] == batch
        if tuple(mask.visible.shape) != (batch, num_visible) or not predict_ok:
            raise ValueError(
                f"mask does not fit visible_features {tuple(visible_features.shape)}: "
                f"visible {tuple(mask.visible.shape)}, predict {tuple(mask.predict.shape)}"
            )
        visible = self.embed(visible_features)
        positions = self.pos_embed.to(visible.dtype)
        visible = visible + gather_tokens(positions, mask.visible)
        queries = self.mask_token.to(visible.dtype) + gather_tokens(positions, mask.predict)
        return run_blocks(self.blocks, torch.cat([visible, queries], dim=1), self.grad_checkpointing)


#: Registered name -> factory of every predictor in this module.
PREDICTORS = {"transformer": TransformerPredictor}
