"""Teachers: target features without gradient (kind ``teacher``)."""

from vlmask.registry import Register
from vlmask_plugins.teachers.ema import EMATeacher
from vlmask_plugins.teachers.frozen import FrozenTeacher

__all__ = ["EMATeacher", "FrozenTeacher", "register_plugins"]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("teacher", "ema", EMATeacher)
    register("teacher", "frozen", FrozenTeacher)
