"""The engine-owned on-disk caches: frozen evaluation features of a checkpoint
(:class:`FeatureCache`, filled by :func:`extract_features`) and caption embeddings
(:class:`CaptionEmbeddingCache`).

The caption-embedding cache, keyed by text encoder identity and caption hash.

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
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.markup import escape
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from safetensors import safe_open
from safetensors.torch import save_file

from vlmask.features import TOKENS, check_pooling, pool_tokens, reduce_tokens
from vlmask.kinds import ContextFeatures, Encoder
from vlmask.types import Batch, TokenGrid

#: A text encoder (plugin kind ``text_encoder``): ``identity`` (str), ``dim`` (int) and
#: ``encode(texts, batch_size) -> (n, dim)``; see ``vlmask.kinds``.
TextEncoder = Any


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

CACHE_FORMAT = "vlmask-caption-cache/1"
FEATURE_CACHE_FORMAT = "vlmask-eval-features/1"
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


# --------------------------------------------------------------------------- evaluation features


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    dataset: Dataset,
    collate: Callable[[list[Any]], Batch],
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    progress: bool = True,
    description: str = "features",
    token_budget: int | None = None,
    context: ContextFeatures | None = None,
) -> dict[str, Tensor]:
    """Pooled features of every clip of ``dataset`` (rows in dataset order), encoder in eval mode;
    with ``token_budget``, also ``tokens`` (N, T' <= token_budget, D) float16 (:func:`reduce_tokens`).
    With ``context`` (a predictor with :class:`vlmask.kinds.ContextFeatures`, in eval mode too),
    the features are its aggregated context of the encoder's tokens, on its ``context_grid()``.

    A clip whose file fails to load is replaced by the dataset with another clip (see
    ``VideoManifestDataset``); rows are written at the ``index`` each item reports, so the row
    of a clip that never loaded stays NaN: callers drop or report those rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = len(dataset)  # type: ignore[arg-type]
    grid: TokenGrid = context.context_grid() if context is not None else encoder.grid
    modules = [m for m in (encoder, context) if isinstance(m, nn.Module)]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.device(device).type == "cuda",
    )
    out: dict[str, Tensor] = {}
    try:
        with _progress_bar(size, description, progress) as advance:
            for batch in loader:
                video = batch.to(device).video  # uint8 -> normalised float on the device
                with autocast():
                    tokens = encoder(video)
                    if context is not None:
                        tokens = context.context(tokens)
                pooled = pool_tokens(tokens, grid)
                if token_budget is not None:
                    pooled[TOKENS] = reduce_tokens(tokens.float(), grid, token_budget).half()
                index = batch.index
                if index is None:
                    raise ValueError("the dataset's batches carry no index; cannot place features in manifest order")
                for name, value in pooled.items():
                    if name not in out:
                        out[name] = torch.full((size, *value.shape[1:]), float("nan"), dtype=value.dtype)
                    out[name][index] = value.cpu()
                advance(batch.size)
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)
    return out


class _progress_bar:
    """A transient rich progress bar on stderr (or nothing); yields ``advance(n)``."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self._progress: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn(f"[bold]{escape(self.description)}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        task = self._progress.add_task(self.description, total=self.total)
        self._progress.start()
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


# --------------------------------------------------------------------------- cache


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (manifests are small)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_identity(checkpoint: Path) -> str:
    """The checkpoint folder name with the size and mtime of its weight files: a retrained
    checkpoint of the same step is a different identity."""
    parts = [checkpoint.name]
    for weights in sorted([*checkpoint.glob("*.safetensors"), *checkpoint.glob("shards/*.safetensors")]):  # full, sharded
        stat = weights.stat()
        parts.append(f"{weights.relative_to(checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


class FeatureCache:
    """Pooled features on disk, one safetensors file per (checkpoint, manifest, data settings, pooling).

    Files live in ``folder`` (``RUN_DIR/features/``) as
    ``<checkpoint>-<manifest stem>-<key[:16]>-<pooling>.safetensors``, holding ``features``
    (N, ·) float32 (NaN rows: clips that did not load) with the key's parts in the metadata.
    The key hashes the checkpoint identity (:func:`checkpoint_identity`), the manifest's path
    and content (sha256) and the evaluation data settings, so re-running ``vlmask eval`` reads
    instead of extracting, and anything that would change the features misses the cache.
    Writes go to a temporary name and are renamed into place.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(checkpoint: Path, manifest: Path, settings: dict[str, Any]) -> dict[str, str]:
        parts = {
            "format": FEATURE_CACHE_FORMAT,
            "checkpoint": checkpoint_identity(checkpoint),
            "manifest": str(Path(manifest).resolve()),
            "manifest_sha256": file_digest(manifest),
            "settings": json.dumps(settings, sort_keys=True, default=str),
        }
        parts["key"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        parts["stem"] = f"{checkpoint.name}-{Path(manifest).stem}-{parts['key'][:16]}"
        return parts

    def path(self, key: dict[str, str], pooling: str) -> Path:
        """``pooling`` is one of :data:`POOLINGS` or :data:`TOKENS` (float16 token features)."""
        return self.folder / f"{key['stem']}-{pooling if pooling == TOKENS else check_pooling(pooling)}.safetensors"

    def load(self, key: dict[str, str], pooling: str) -> Tensor | None:
        from safetensors import SafetensorError, safe_open

        path = self.path(key, pooling)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != key["key"]:
                    return None
                return handle.get_tensor("features")
        except (SafetensorError, OSError, ValueError):
            return None  # a damaged file is recomputed and replaced

    def save(self, key: dict[str, str], pooling: str, features: Tensor) -> Path:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key, pooling)
        temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
        stored = features.half() if pooling == TOKENS else features.float()
        save_file({"features": stored.contiguous()}, str(temporary), metadata={**key, "pooling": pooling})
        os.replace(temporary, path)
        return path
