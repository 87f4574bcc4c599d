"""The engine-owned on-disk cache of caption embeddings, keyed by text encoder identity and caption hash.

FILS (BMVC 2024) freezes its text tower, so every caption's embedding is computed once per
dataset and the training loop reads embeddings, never captions. Layout::

    root/
      <sha256(identity)[:32]>/            one folder per text encoder identity
        identity.txt                      the identity in clear, for people
        shard-<ns>-<pid>-<rand>.safetensors

Each shard holds ``embeddings`` (n, dim) float32 and ``caption_sha256`` (n, 32) uint8, the
sha256 of each caption's UTF-8 text, with the identity in its metadata. Shards are
self-describing and never rewritten: a writer encodes captions that no shard holds yet, writes a
new shard to a temporary name and ``os.replace``s it into place. There is no shared index file,
so several processes (torchrun ranks, parallel jobs) may read and write one cache at the same
time without locks: the worst case is two processes encoding the same caption and both storing
it (identical rows; ``compact`` merges them).

Missing captions -- ``None``, ``""`` or whitespace only -- are never encoded: their row is a zero
vector, and ``CaptionEmbeddingCache.missing(captions)`` gives the boolean mask of them, so a loss
can drop those clips rather than align them with a meaningless vector.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: A text encoder (plugin kind ``text_encoder``): ``identity`` (str), ``dim`` (int) and
#: ``encode(texts, batch_size) -> (n, dim)``; see ``vlmask.kinds``.
TextEncoder = Any


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

CACHE_FORMAT = "vlmask-caption-cache/1"
SHARD_GLOB = "shard-*.safetensors"


def caption_digest(caption: str) -> bytes:
    """The 32-byte sha256 of a caption's UTF-8 text (the cache key of one caption)."""
    return hashlib.sha256(caption.encode("utf-8")).digest()


def is_missing(caption: str | None) -> bool:
    """True for a caption that carries no text: None, empty or whitespace only."""
    return caption is None or not caption.strip()


@dataclass
class CacheStats:
    """What one ``CaptionEmbeddingCache`` object has done since it was made."""

    encode_calls: int = 0  # calls of encoder.encode
    encoded_captions: int = 0  # captions passed to encoder.encode
    hits: int = 0  # unique captions found already cached
    missing: int = 0  # rows that had no caption (zero vectors)
    shards_written: int = 0
    shards_read: int = 0


@dataclass
class _Table:
    """The cached rows of one encoder identity, as loaded in this process."""

    folder: Path
    dim: int
    rows: dict[bytes, torch.Tensor] = field(default_factory=dict)
    loaded_shards: set[str] = field(default_factory=set)


class CaptionEmbeddingCache:
    """Caption -> frozen text embedding, computed once per (encoder identity, caption) and kept on disk.

    The cache FILS (BMVC 2024) relies on: its text tower is frozen, so embeddings are computed
    once per dataset. ``embed`` encodes only unique captions that no shard of this encoder holds
    yet, in pieces of ``shard_size`` captions, each stored as its own shard as soon as it is
    encoded (an interrupted run keeps what it finished).

    Args:
        root: folder of the cache; made on first write.
        shard_size: captions per ``encoder.encode`` call and per shard file.
    """

    def __init__(self, root: Path | str, shard_size: int = 4096) -> None:
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
        self.root = Path(root).expanduser()
        self.shard_size = shard_size
        self.stats = CacheStats()
        self._tables: dict[str, _Table] = {}

    @staticmethod
    def missing(captions: Sequence[str | None]) -> torch.Tensor:
        """(N,) bool: True where a caption is None, empty or whitespace (its embedding row is zero)."""
        return torch.tensor([is_missing(c) for c in captions], dtype=torch.bool)

    def folder(self, encoder: TextEncoder) -> Path:
        """Where the shards of ``encoder`` live: ``root/<sha256(identity)[:32]>``."""
        return self.root / hashlib.sha256(encoder.identity.encode("utf-8")).hexdigest()[:32]

    def embed(
        self,
        encoder: TextEncoder,
        captions: Sequence[str | None],
        progress: bool = True,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """(len(captions), encoder.dim) float32 CPU embeddings; zero rows for missing captions.

        Captions already in the cache (written by this or any other process) are not encoded
        again; the new ones are encoded once each, however often they repeat in ``captions``.
        """
        check_batch_size(batch_size)
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got a single string")
        table = self._table(encoder)
        self._load_new_shards(table, encoder.identity)

        digests: list[bytes | None] = []
        pending: dict[bytes, str] = {}  # unique captions to encode, in first-seen order
        for i, caption in enumerate(captions):
            if caption is not None and not isinstance(caption, str):
                raise TypeError(f"captions[{i}] must be a string or None, got {type(caption).__name__}")
            if is_missing(caption):
                digests.append(None)
                continue
            digest = caption_digest(caption)
            digests.append(digest)
            if digest not in table.rows and digest not in pending:
                pending[digest] = caption
        unique = {d for d in digests if d is not None}
        self.stats.hits += len(unique) - len(pending)
        self.stats.missing += sum(d is None for d in digests)

        if pending:
            self._encode_and_store(encoder, table, pending, progress, batch_size)

        out = torch.zeros(len(digests), table.dim, dtype=torch.float32)
        present = [i for i, digest in enumerate(digests) if digest is not None]
        if present:
            out[present] = torch.stack([table.rows[digests[i]] for i in present])  # type: ignore[index]
        return out

    def compact(self, encoder: TextEncoder) -> Path | None:
        """Merges all shards of ``encoder`` into one (duplicates dropped); returns it, or None if empty.

        Safe beside readers: the merged shard is in place before the old ones are removed, and a
        reader that finds a shard gone lists the folder again.
        """
        table = self._table(encoder)
        self._load_new_shards(table, encoder.identity)
        if not table.rows:
            return None
        merged = self._write_shard(table, encoder.identity, list(table.rows), torch.stack(list(table.rows.values())))
        for name in sorted(table.loaded_shards - {merged.name}):
            (table.folder / name).unlink(missing_ok=True)
        table.loaded_shards = {merged.name}
        return merged

    # -- internals -------------------------------------------------------------------------

    def _table(self, encoder: TextEncoder) -> _Table:
        identity = encoder.identity
        if not isinstance(identity, str) or not identity:
            raise ValueError(f"text encoder {type(encoder).__name__} has no identity string (got {identity!r})")
        dim = int(encoder.dim)
        if dim < 1:
            raise ValueError(f"text encoder {type(encoder).__name__} has dim {dim}; it must be positive")
        table = self._tables.get(identity)
        if table is None:
            table = self._tables[identity] = _Table(self.folder(encoder), dim)
        return table

    def _load_new_shards(self, table: _Table, identity: str) -> None:
        if not table.folder.is_dir():
            return
        for _attempt in range(3):  # a compaction elsewhere may remove a listed shard: list again
            try:
                for path in sorted(table.folder.glob(SHARD_GLOB)):
                    if path.name not in table.loaded_shards:
                        self._read_shard(table, identity, path)
                return
            except FileNotFoundError:
                continue
        raise RuntimeError(f"caption cache {table.folder} kept changing while being read; try again")

    def _read_shard(self, table: _Table, identity: str, path: Path) -> None:
        with safe_open(str(path), framework="pt") as shard:
            metadata = shard.metadata() or {}
            if metadata.get("identity") != identity:
                raise RuntimeError(
                    f"caption cache shard {path} belongs to text encoder {metadata.get('identity')!r}, "
                    f"not {identity!r}; remove it"
                )
            embeddings = shard.get_tensor("embeddings")
            digests = shard.get_tensor("caption_sha256")
        if embeddings.ndim != 2 or embeddings.shape[1] != table.dim or digests.shape != (embeddings.shape[0], 32):
            raise RuntimeError(
                f"caption cache shard {path} holds embeddings of shape {tuple(embeddings.shape)}, expected "
                f"(n, {table.dim}) for {identity!r}; remove it"
            )
        for digest, row in zip(digests.numpy(), embeddings):
            table.rows[digest.tobytes()] = row
        table.loaded_shards.add(path.name)
        self.stats.shards_read += 1

    def _encode_and_store(
        self, encoder: TextEncoder, table: _Table, pending: dict[bytes, str], progress: bool, batch_size: int
    ) -> None:
        items = list(pending.items())
        pieces = [items[start : start + self.shard_size] for start in range(0, len(items), self.shard_size)]
        reporter = _Progress(len(items), encoder.identity) if progress else None
        try:
            for piece in pieces:
                texts = [caption for _, caption in piece]
                embeddings = encoder.encode(texts, batch_size=batch_size)
                self.stats.encode_calls += 1
                self.stats.encoded_captions += len(texts)
                embeddings = torch.as_tensor(embeddings).detach().to("cpu", torch.float32).contiguous()
                if embeddings.shape != (len(texts), table.dim):
                    raise RuntimeError(
                        f"text encoder {encoder.identity!r} returned shape {tuple(embeddings.shape)} for "
                        f"{len(texts)} captions, expected ({len(texts)}, {table.dim})"
                    )
                if not torch.isfinite(embeddings).all():
                    raise RuntimeError(f"text encoder {encoder.identity!r} returned non-finite embeddings")
                keys = [digest for digest, _ in piece]
                self._write_shard(table, encoder.identity, keys, embeddings)
                for key, row in zip(keys, embeddings):
                    table.rows[key] = row
                if reporter is not None:
                    reporter.advance(len(texts))
        finally:
            if reporter is not None:
                reporter.close()

    def _write_shard(self, table: _Table, identity: str, keys: list[bytes], embeddings: torch.Tensor) -> Path:
        table.folder.mkdir(parents=True, exist_ok=True)
        identity_file = table.folder / "identity.txt"
        if not identity_file.exists():
            _atomic_write_text(identity_file, identity + "\n")
        digests = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 32)
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        final = table.folder / name
        temporary = table.folder / f".tmp-{name}"
        save_file(
            {"embeddings": embeddings.contiguous(), "caption_sha256": digests},
            str(temporary),
            metadata={"identity": identity, "format": CACHE_FORMAT},
        )
        os.replace(temporary, final)
        table.loaded_shards.add(name)
        self.stats.shards_written += 1
        return final


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    temporary.write_text(text)
    os.replace(temporary, path)


class _Progress:
    """A rich progress bar on stderr for captions being encoded."""

    def __init__(self, total: int, identity: str) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self._progress = Progress(console=Console(stderr=True), transient=True)
        self._task = self._progress.add_task(f"embedding {total} captions ({identity.split(':')[0]})", total=total)
        self._progress.start()

    def advance(self, count: int) -> None:
        self._progress.advance(self._task, count)

    def close(self) -> None:
        self._progress.stop()
