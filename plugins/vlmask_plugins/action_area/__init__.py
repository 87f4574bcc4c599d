"""Action-area detection (MoFo, Ahmadian, Guerin & Gilbert 2023): where in the frame the action happens.

- ``flow``: :class:`FlowActionArea` (registered as action_area ``flow``): DIS optical flow,
  camera motion removed, motion thresholded, boxes united over the clip.
- ``boxes``: :func:`fill_boxes` fills a manifest's ``action_box`` fields, in parallel and
  cached per clip (what ``vlmask data boxes IN.jsonl --out OUT.jsonl`` runs).
- ``measure``: ``python -m vlmask_plugins.action_area.measure`` scores the methods on a
  generated synthetic set against its true boxes.
"""

from vlmask.registry import Register


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    from vlmask_plugins.action_area.flow import FlowActionArea

    register("action_area", "flow", FlowActionArea)
