"""Heads: losses on the student's features (kind ``head``)."""

from vlmask.registry import Register
from vlmask_plugins.heads.classification import ClassificationHead
from vlmask_plugins.heads.coclr import CoCLRHead
from vlmask_plugins.heads.pooling import pool_visible_in_box, visible_tokens_inside_box
from vlmask_plugins.heads.video_text import VideoTextInfoNCEHead

__all__ = [
    "ClassificationHead",
    "CoCLRHead",
    "VideoTextInfoNCEHead",
    "pool_visible_in_box",
    "register_plugins",
    "visible_tokens_inside_box",
]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("head", "video_text_infonce", VideoTextInfoNCEHead)
    register("head", "classification", ClassificationHead)
    register("head", "coclr", CoCLRHead)
