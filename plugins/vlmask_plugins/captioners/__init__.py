"""Captioners (plugin kind ``captioner``): captions for clips that have none.

FILS (BMVC 2024) aligns video with text, so every training clip needs a caption; data sets
without one were captioned once, offline, by a video-to-text model (VideoBLIP). Here that step
is ``vlmask data captions IN.jsonl --out OUT.jsonl``: :func:`~vlmask_plugins.captioners.fill.fill_captions`
writes the manifest with ``caption`` filled for every line lacking one. Nothing is downloaded:
model captioners load a LOCAL folder (``local_files_only=True``).

The interface (a plain object; see :mod:`vlmask_plugins.captioners.interface`):

* ``identity: str`` -- the model, a fingerprint of its weights, and every setting that changes
  the captions. It is part of the per-clip cache key, so equal identities must give equal
  captions for the same frames.
* ``caption(frames: list[np.ndarray]) -> str`` -- one clip's sampled frames, each (H, W, 3)
  uint8 RGB, in time order, to one caption (may be empty when the model wrote nothing).
* optional ``caption_batch(clips: list[list[np.ndarray]]) -> list[str]`` -- several clips at once.
* optional ``frames_per_clip: int`` (default 4) and ``short_side: int | None`` (default None):
  how many evenly spaced frames :func:`fill_captions` decodes per clip, and the shorter side
  to decode them at (never upscaled).

A *row captioner* reads the manifest line instead of the pixels: ``identity`` and
``caption_row(row: dict) -> str | None`` (None: this row cannot be captioned). fill_captions
calls ``caption_row`` when a captioner has it and then decodes nothing.

Registered:

- ``hf_image_to_text``: :class:`~vlmask_plugins.captioners.hf_image_to_text.HFImageToTextCaptioner`,
  a transformers image-to-text model (BLIP, GIT, VisionEncoderDecoder) on sampled frames.
- ``template``: :class:`~vlmask_plugins.captioners.template.TemplateCaptioner`, a caption
  written from the row's ``label``/``verb``/``noun`` fields (reads the row, not the pixels).
"""

from vlmask.registry import Register


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    from vlmask_plugins.captioners.hf_image_to_text import HFImageToTextCaptioner
    from vlmask_plugins.captioners.template import TemplateCaptioner

    register("captioner", "hf_image_to_text", HFImageToTextCaptioner)
    register("captioner", "template", TemplateCaptioner)
