"""Frozen encoder features for evaluation: extraction, pooling, an on-disk cache, and the
:class:`EvalFeatures` every evaluator (plugin kind ``evaluator``) reads.

The protocols are the frozen-feature ones of FILS (Ahmadian et al., BMVC 2024) and the thesis
it comes from: the pretrained encoder runs in eval mode, without gradient, on every token of
the evaluation clip (no masking), and its token features are pooled into one vector per clip:

* ``mean``: the mean over all tokens, (N, D);
* ``temporal``: the mean over the spatial positions of each temporal slot, the slots
  concatenated in time order, (N, t * D). It keeps the order of events, so a linear probe can
  tell "move left" from "move right" where the mean over time cannot.

An evaluator is any object with ``evaluate(features: EvalFeatures) -> dict[str, float] | None``
(see :class:`Evaluator`); it returns None when its section cannot be computed from what the
run has (no labels, no captions, no text encoder, no projection), and the section is then
absent from ``eval.json``: never faked.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vlmask.types import Batch, TokenGrid

#: Poolings every extraction produces, by name.
POOLINGS: tuple[str, ...] = ("mean", "temporal")

FEATURE_CACHE_FORMAT = "vlmask-eval-features/1"


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def pool_tokens(tokens: Tensor, grid: TokenGrid | None) -> dict[str, Tensor]:
    """Pool token features (B, N, D) in (t, h, w) order into ``{"mean": (B, D), "temporal": (B, t*D)}``.

    ``temporal`` is left out when the tokens do not form ``grid`` (no grid, or N != t*h*w).

    >>> tokens = torch.arange(8.0).view(1, 4, 2)  # t=2 slots of h*w=2 tokens, D=2
    >>> pooled = pool_tokens(tokens, TokenGrid(t=2, h=1, w=2))
    >>> pooled["mean"].tolist(), pooled["temporal"].tolist()
    ([[3.0, 4.0]], [[1.0, 2.0, 5.0, 6.0]])
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (B, N, D), got {tuple(tokens.shape)}")
    tokens = tokens.float()
    pooled = {"mean": tokens.mean(dim=1)}
    if grid is not None and tokens.shape[1] == grid.num_tokens:
        b, _, d = tokens.shape
        pooled["temporal"] = tokens.view(b, grid.t, grid.spatial, d).mean(dim=2).flatten(1)
    return pooled


@dataclass
class SplitFeatures:
    """Pooled features and annotations of the clips of one manifest (rows = clips that loaded).

    ``pooled[name]`` is (N, ·) float32 for each name of :data:`POOLINGS` that was computed.
    ``labels`` (N,) long: the class index into :attr:`EvalFeatures.classes`, -1 when the clip
    has no label *or* a label that is not among the classes; ``labelled`` (N,) bool tells the
    two apart (a clip with an unknown class still counts, as an error, in accuracies).
    ``captions`` ("" when absent), ``verbs`` and ``nouns`` (None when absent) are per row.
    """

    pooled: dict[str, Tensor]
    labels: Tensor
    labelled: Tensor
    captions: list[str]
    verbs: list[str | None]
    nouns: list[str | None]

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for name, value in self.pooled.items():
            if value.ndim != 2 or value.shape[0] != n:
                raise ValueError(f"pooled[{name!r}] must have shape ({n}, D), got {tuple(value.shape)}")
        if self.labelled.shape != (n,) or not (len(self.captions) == len(self.verbs) == len(self.nouns) == n):
            raise ValueError(f"every per-clip field of a split must have {n} rows")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def features(self, pooling: str) -> Tensor | None:
        """The (N, ·) features of ``pooling``, or None when they were not computed."""
        return self.pooled.get(check_pooling(pooling))


@dataclass
class EvalFeatures:
    """Everything an evaluator may read: frozen features of the train and val manifests.

    ``classes`` are the training set's class names (``labels`` index them; the probe's output
    space). ``class_verbs[c]`` / ``class_nouns[c]`` are the verb and noun of class ``c`` read
    from the manifest rows (None when unknown): EPIC-Kitchens-style verb and noun accuracy is
    marginalised through them. ``project`` maps mean-pooled video features (N, D) into the text
    space (the student's video-to-text projection theta; None without one) and
    ``encode_text(texts) -> (len(texts), dim)`` is the run's frozen text encoder behind the
    caption-embedding cache (None without a text encoder).
    """

    train: SplitFeatures
    val: SplitFeatures
    classes: list[str]
    class_verbs: list[str | None] = field(default_factory=list)
    class_nouns: list[str | None] = field(default_factory=list)
    project: Callable[[Tensor], Tensor] | None = None
    encode_text: Callable[[list[str]], Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.class_verbs:
            self.class_verbs = [None] * len(self.classes)
        if not self.class_nouns:
            self.class_nouns = [None] * len(self.classes)
        if len(self.class_verbs) != len(self.classes) or len(self.class_nouns) != len(self.classes):
            raise ValueError("class_verbs and class_nouns must have one entry per class")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@runtime_checkable
class Evaluator(Protocol):
    """kind ``evaluator``: one section of ``eval.json`` computed from frozen features.

    ``evaluate`` returns the section (metric name -> number, e.g. ``{"top1": 0.71}``), or None
    when the run lacks what the section needs; it must not modify ``features``.
    """

    def evaluate(self, features: EvalFeatures) -> dict[str, float] | None: ...


# --------------------------------------------------------------------------- extraction


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    collate: Callable[[list[Any]], Batch],
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    progress: bool = True,
    description: str = "features",
) -> dict[str, Tensor]:
    """Pooled features of every clip of ``dataset`` (rows in dataset order), encoder in eval mode.

    A clip whose file fails to load is replaced by the dataset with another clip (see
    ``VideoManifestDataset``); rows are written at the ``index`` each item reports, so the row
    of a clip that never loaded stays NaN: callers drop or report those rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = len(dataset)  # type: ignore[arg-type]
    grid: TokenGrid | None = getattr(encoder, "grid", None)
    was_training = encoder.training
    encoder.eval()
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
                video = batch.video.to(device, non_blocking=True)
                with autocast():
                    tokens = encoder(video)
                pooled = pool_tokens(tokens, grid)
                index = batch.index
                if index is None:
                    raise ValueError("the dataset's batches carry no index; cannot place features in manifest order")
                for name, value in pooled.items():
                    if name not in out:
                        out[name] = torch.full((size, value.shape[1]), float("nan"))
                    out[name][index] = value.cpu()
                advance(batch.size)
    finally:
        encoder.train(was_training)
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
        from rich.markup import escape
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
    for weights in sorted(checkpoint.glob("*.safetensors")):
        stat = weights.stat()
        parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
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
        return self.folder / f"{key['stem']}-{check_pooling(pooling)}.safetensors"

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
        save_file({"features": features.float().contiguous()}, str(temporary), metadata={**key, "pooling": pooling})
        os.replace(temporary, path)
        return path


def finite_rows(pooled: dict[str, Tensor]) -> Tensor:
    """(N,) bool: rows finite in every pooling (False for clips that did not load)."""
    rows: Tensor | None = None
    for value in pooled.values():
        ok = torch.isfinite(value).all(dim=1)
        rows = ok if rows is None else rows & ok
    if rows is None:
        raise ValueError("no pooled features")
    return rows

