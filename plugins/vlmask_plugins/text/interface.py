"""What every text tower (plugin kind ``text_encoder``) provides, and helpers they share.

A text encoder is a plain object (not an ``nn.Module``, so no optimizer or DDP wrapper ever sees
its weights) with:

* ``dim: int`` -- the embedding width (384 for MiniLM, 512 for CLIP ViT-B-32).
* ``identity: str`` -- a stable string naming the model, its weights and every setting that
  changes its output (e.g. ``max_length``). It is the key of the caption-embedding cache, so two
  encoders with equal identities must give equal embeddings. It fingerprints file names, sizes and
  sampled content, never absolute paths, so a cache built on one machine is reused on another.
* ``encode(texts, batch_size=64) -> Tensor`` -- ``(len(texts), dim)`` float32 on CPU, computed
  under ``torch.inference_mode`` with the model in eval mode and ``requires_grad`` off. The
  result is an ordinary tensor (not an inference tensor): it may enter an autograd graph as a
  constant. Embeddings are returned as the model defines them: MiniLM mean-pools and
  L2-normalises (the sentence-transformers recipe), CLIP towers return the raw projected
  end-of-text feature. Heads normalise anyway.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import torch

from vlmask.kinds import TextEncoder  # noqa: F401 (re-exported) the contract is vlmask's (one table of kinds)

#: Bytes read from the start, middle and end of each weight file for its fingerprint.
FINGERPRINT_SAMPLE_BYTES = 1 << 20


def files_fingerprint(files: Sequence[Path], root: Path | None = None) -> str:
    """A short sha256 of each file's name (relative to ``root``), size and sampled content.

    Names and sizes alone cannot tell apart two checkpoints of one architecture (same tensor
    shapes, same byte count), so 1 MiB from the start, middle and end of every file is hashed
    too: cheap for multi-GB checkpoints, and different weights give different bytes.
    """
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: str(p.relative_to(root) if root else p.name)):
        name = str(path.relative_to(root)) if root else path.name
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as handle:
            for offset in sorted({0, max(0, size // 2 - FINGERPRINT_SAMPLE_BYTES // 2), max(0, size - FINGERPRINT_SAMPLE_BYTES)}):
                handle.seek(offset)
                digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def text_fingerprint(text: str) -> str:
    """A short sha256 of a string (e.g. an architecture config serialised as JSON)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_fingerprint(folder: Path) -> str:
    """``files_fingerprint`` of every regular file below ``folder`` (hidden files skipped)."""
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return files_fingerprint(files, root=folder)


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_device(device: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: the text tower is never trained (FILS freezes it)."""
    model.eval()
    model.requires_grad_(False)
    return model


def encode_in_batches(
    texts: Sequence[str], batch_size: int, dim: int, encode_batch: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """Runs ``encode_batch`` over slices of ``texts`` under inference mode.

    Returns an ordinary float32 CPU tensor: the ``clone`` after leaving inference mode means the
    embeddings may later be used next to tensors that require grad.
    """
    check_batch_size(batch_size)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            embeddings = encode_batch(texts[start : start + batch_size]).float().cpu()
            if embeddings.shape != (len(texts[start : start + batch_size]), dim):
                raise RuntimeError(f"text tower returned shape {tuple(embeddings.shape)}, expected (batch, {dim})")
            chunks.append(embeddings)
    if not chunks:
        return torch.empty(0, dim)
    return torch.cat(chunks).clone()
