"""Video encoders (student ViTs) and predictors, with one attention switch (xformers / SDPA)."""

from vlmask.registry import Register
from vlmask_plugins.encoders.future_predictor import FuturePredictor
from vlmask_plugins.encoders.predictor import TransformerPredictor
from vlmask_plugins.encoders.vit import VideoViT, video_vit_base, video_vit_large, video_vit_small, video_vit_tiny


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("encoder", "video_vit", VideoViT)
    register("encoder", "video_vit_tiny", video_vit_tiny)
    register("encoder", "video_vit_small", video_vit_small)
    register("encoder", "video_vit_base", video_vit_base)
    register("encoder", "video_vit_large", video_vit_large)
    register("predictor", "transformer", TransformerPredictor)
    register("predictor", "future", FuturePredictor)
