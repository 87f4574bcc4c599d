"""Picture kinds of ``vlmask show`` that need plugin knowledge (hook ``vlmask_picture_kinds``):
``masks`` (the masker and ActCLIP's pooling), ``reconstruction`` (the pixel target) and
``attention`` (the video ViT's blocks; FILS Figure 3)."""

from typing import Any

from vlmask_plugins.pictures.attention import attention
from vlmask_plugins.pictures.masks import masks
from vlmask_plugins.pictures.reconstruction import reconstruction

__all__ = ["attention", "masks", "picture_kinds", "reconstruction"]


def picture_kinds() -> dict[str, Any]:
    """This package's picture kinds by ``vlmask show`` name (called from vlmask_plugins.builtin)."""
    return {"masks": masks, "reconstruction": reconstruction, "attention": attention}
