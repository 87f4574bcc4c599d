"""A CLIP text tower built with open_clip from a local checkpoint file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmask_plugins.text.interface import (
    check_device,
    encode_in_batches,
    files_fingerprint,
    freeze,
    text_fingerprint,
)


class OpenCLIPTextEncoder:
    """Frozen CLIP text transformer (Radford et al., ICML 2021) via open_clip.

    FILS (BMVC 2024) aligns predicted video features with a frozen CLIP text tower (ViFi-CLIP in
    the paper); this loads any open_clip architecture from a local checkpoint and keeps only the
    text side (the image tower is dropped after loading). ``encode`` returns the raw projected
    end-of-text feature (``encode_text(normalize=False)``).

    Nothing is downloaded: ``checkpoint`` must be an existing file (a pretrained tag such as
    ``"openai"`` is refused). The tokenizer is open_clip's own BPE tokenizer, whose vocabulary
    ships inside the package; architectures whose text tower is a Hugging Face model also need
    that model's tokenizer in the local Hugging Face cache.

    Args:
        model: open_clip architecture name, e.g. ``"ViT-B-32"`` (``open_clip.list_models()``).
        checkpoint: path of the weights file (``.pt``/``.bin``/``.safetensors``) for ``model``.
        device: where the tower runs; embeddings are always returned on CPU.
    """

    def __init__(self, model: str, checkpoint: str, device: str = "cpu") -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must name an open_clip architecture such as 'ViT-B-32', got {model!r}")
        if not checkpoint:
            raise ValueError(
                "checkpoint is required for text_encoder 'open_clip': the local path of the weights file "
                "(nothing is downloaded)"
            )
        checkpoint_path = Path(checkpoint).expanduser()
        if not checkpoint_path.is_file():
            raise FileNotFoundError(
                f"open_clip checkpoint {str(checkpoint_path)!r} does not exist (text_encoder 'open_clip', "
                f"model {model!r}); nothing is downloaded, so copy the weights file there or fix the path"
            )
        self.device = check_device(device)
        import open_clip

        config = open_clip.get_model_config(model) if ":" not in model else None
        if config is None:
            raise ValueError(
                f"model must be a built-in open_clip architecture name, got {model!r} (schemas such as "
                f"'hf-hub:' are refused: nothing is downloaded); known ones include "
                f"{', '.join(open_clip.list_models()[:6])}, ... (see open_clip.list_models())"
            )
        clip = open_clip.create_model(
            model, pretrained=str(checkpoint_path), device=self.device, pretrained_text=False, pretrained_image=False
        )
        clip.visual = torch.nn.Identity()  # the image tower is never used here; free its memory
        self.model = freeze(clip)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.model_name = model
        self.checkpoint = checkpoint_path.resolve()
        self.dim: int = int(config["embed_dim"])
        architecture = json.dumps(config, sort_keys=True)
        self.identity: str = (
            f"open_clip:{model}:{files_fingerprint([self.checkpoint])}:"
            f"{text_fingerprint(architecture)}"
        )

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) float32 CPU raw (unnormalised) text embeddings."""
        return encode_in_batches(texts, batch_size, self.dim, self._encode_batch)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=False)
