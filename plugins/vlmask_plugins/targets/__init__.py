"""Targets: losses on predictions against targets (kind ``target``)."""

from vlmask.registry import Register
from vlmask_plugins.targets.dense_infonce import DenseInfoNCETarget
from vlmask_plugins.targets.future_infonce import FutureInfoNCETarget
from vlmask_plugins.targets.language_space import LanguageSpaceTarget
from vlmask_plugins.targets.latent import LatentTarget
from vlmask_plugins.targets.pixels import NormalizedPixelsTarget

__all__ = [
    "DenseInfoNCETarget",
    "FutureInfoNCETarget",
    "LanguageSpaceTarget",
    "LatentTarget",
    "NormalizedPixelsTarget",
    "register_plugins",
]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("target", "normalized_pixels", NormalizedPixelsTarget)
    register("target", "latent", LatentTarget)
    register("target", "language_space", LanguageSpaceTarget)
    register("target", "dense_infonce", DenseInfoNCETarget)
    register("target", "future_infonce", FutureInfoNCETarget)
