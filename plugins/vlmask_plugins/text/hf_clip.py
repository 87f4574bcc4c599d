"""A CLIP text tower from a local Hugging Face ``transformers`` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmask_plugins.text.interface import check_device, encode_in_batches, folder_fingerprint, freeze


class HFCLIPTextEncoder:
    """Frozen CLIP text transformer with its projection (Radford et al., ICML 2021), transformers.

    FILS (BMVC 2024) aligns video features with a frozen CLIP text tower. This loads
    ``CLIPTextModelWithProjection`` and ``CLIPTokenizer`` from a local folder only
    (``local_files_only=True``). The folder may hold a text-only checkpoint or a full
    ``CLIPModel`` one (e.g. a copy of ``openai/clip-vit-base-patch32``: its text weights and
    ``text_projection`` are loaded, the vision weights ignored). ``encode`` returns the raw
    projected end-of-text feature (``text_embeds``), unnormalised.

    Args:
        path: local folder with ``config.json``, the weights and the tokenizer files
            (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``).
        max_length: token limit; None uses the model's ``max_position_embeddings`` (77 for CLIP).
        device: where the tower runs; embeddings are always returned on CPU.
    """

    def __init__(self, path: str, max_length: int | None = None, device: str = "cpu") -> None:
        if not path:
            raise ValueError("path is required for text_encoder 'hf_clip': a local transformers CLIP folder")
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"text_encoder 'hf_clip' path {str(folder)!r} is not a transformers model folder (no config.json "
                f"there); nothing is downloaded, so save the model there (save_pretrained) or fix the path"
            )
        self.device = check_device(device)
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a frozen tower loads quietly

        self.path = folder.resolve()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = freeze(CLIPTextModelWithProjection.from_pretrained(str(self.path), local_files_only=True)).to(
            self.device
        )
        limit = int(self.model.config.max_position_embeddings)
        if max_length is None:
            max_length = limit
        if not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be an integer in [2, {limit}] for this model, got {max_length!r}")
        self.max_length = max_length
        self.dim: int = int(self.model.config.projection_dim)
        self.identity: str = f"hf_clip:{self.path.name}:max_length={max_length}:{folder_fingerprint(self.path)}"

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) float32 CPU raw (unnormalised) text embeddings."""
        return encode_in_batches(texts, batch_size, self.dim, self._encode_batch)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
