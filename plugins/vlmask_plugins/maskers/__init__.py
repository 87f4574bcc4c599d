"""Maskers: which tokens the student sees and which it must predict (kind ``masker``)."""

from vlmask.registry import Register
from vlmask_plugins.maskers.action_area import ActionAreaMasker
from vlmask_plugins.maskers.future_blocks import FutureBlocksMasker
from vlmask_plugins.maskers.partial import PartialMasker
from vlmask_plugins.maskers.tube import RandomMasker, TubeMasker

__all__ = ["ActionAreaMasker", "FutureBlocksMasker", "PartialMasker", "RandomMasker", "TubeMasker", "register_plugins"]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("masker", "tube", TubeMasker)
    register("masker", "random", RandomMasker)
    register("masker", "action_area", ActionAreaMasker)
    register("masker", "partial", PartialMasker)
    register("masker", "future_blocks", FutureBlocksMasker)
