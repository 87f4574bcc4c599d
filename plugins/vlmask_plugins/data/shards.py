"""Streamed WebDataset shards: ``vlmask data shard`` writes them, dataset ``video_shards`` reads them.

Why shards: a cluster's object store (or a network file system) serves a few large sequential
reads far faster than millions of small files, and a tar holds a clip's bytes next to its
manifest line. The format is WebDataset's (Aizman et al., 2019; written with
``webdataset.ShardWriter``, so ``webdataset.WebDataset`` and ``tar tf`` read the shards too):
member ``KEY.EXT`` holds the clip's video file as it was, ``KEY.json`` its manifest line (boxes,
captions, labels, segment included) plus ``line`` (its line in the source manifest) and ``info``
(what :func:`~vlmask_plugins.data.decode.probe_video` read, so nobody probes it again). KEY is the
clip's position in the whole set (``000000042``), i.e. its ``index``. ``shards.json`` beside them
lists the shards and their clip counts (docs/contract.md, "Streamed shards").

Reading (:class:`VideoShardsDataset`) does not go through ``webdataset.WebDataset``: its
pipeline splits *shards* between workers and can only skip samples by reading through them,
while training here needs every rank and worker to get equal, disjoint *samples* (equal steps
per rank under DDP) and an exact resume at a sample position. So each shard's tar headers are
read with :mod:`tarfile` (seeking over the data) and a worker reads only the members it needs,
by offset; the file is opened with fsspec, so local paths, ``file://``, ``s3://``, ``gs://`` and
``https://`` URLs work alike (brace patterns ``b-{000..009}.tar`` are expanded with
``braceexpand``, WebDataset's own dependency).
"""

from __future__ import annotations

import json
import random
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlmask.types import IMAGENET_MEAN, IMAGENET_STD
from vlmask_plugins.data.augment import Blur, ColorJitter
from vlmask_plugins.data.dataset import EmptyManifestError, VideoManifestDataset, _probe_all
from vlmask_plugins.data.decode import DecodeError, MemoryVideo, VideoInfo
from vlmask_plugins.data.manifest import ManifestClip, SkippedClip, clip_to_row, read_manifest, write_text_atomic

#: ``format`` of ``shards.json``.
FORMAT = "vlmask-shards/1"
#: The index written beside the shards.
INDEX = "shards.json"
#: Digits of a sample key (its position in the set).
KEY_DIGITS = 9


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardReport:
    """What ``vlmask data shard`` wrote: the index, the shard files, the clips written and the
    manifest lines left out (bad lines, files that do not decode)."""

    index: Path
    shards: list[Path]
    clips: int
    skipped: list[SkippedClip]

    def summary(self) -> str:
        left = f"; skipped {len(self.skipped)} lines ({'; '.join(map(str, self.skipped[:3]))}{'; ...' if len(self.skipped) > 3 else ''})" \
            if self.skipped else ""
        return f"wrote {self.clips} clips in {len(self.shards)} shards and {self.index}{left}"


def write_shards(manifest: str | Path, out: str | Path, shard_size: int = 1000, seed: int = 0,
                 probe_workers: int = 8) -> ShardReport:
    """Write the clips of ``manifest`` as WebDataset tar shards ``OUT/shard-NNNNNN.tar`` of
    ``shard_size`` clips, plus ``OUT/shards.json``.

    Clips are probed first (bad lines and undecodable files are left out and reported, as the
    manifest dataset does) and written in an order shuffled by ``seed``: a reader streams each
    shard front to back, so a shard should be a random mix of the set, not one class's run of
    consecutive lines.
    """
    import webdataset

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    report = read_manifest(manifest)
    clips, infos, probe_skipped = _probe_all(report.clips, probe_workers) if report.clips else ([], [], [])
    skipped = sorted(report.skipped + probe_skipped, key=lambda s: s.line)
    if not clips:
        raise EmptyManifestError(f"manifest {manifest} has no usable clip to shard ({len(skipped)} lines skipped)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("shard-*.tar"))
    if stale:
        raise FileExistsError(f"--out {out} already holds shards ({stale[0].name}, ...); choose an empty folder")
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed)).tolist()
    written: list[tuple[Path, int]] = []

    def finished(name: str) -> None:
        written.append((Path(name), 0))

    root = Path(manifest).expanduser().resolve().parent
    counts: list[int] = []
    # maxsize infinite: a shard holds exactly shard_size clips (the counts below rely on it)
    with webdataset.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, maxsize=float("inf"), verbose=0,
                                post=finished) as sink:
        for position, i in enumerate(order):
            clip, info = clips[i], infos[i]
            if position % shard_size == 0:
                counts.append(0)
            row = clip_to_row(clip, root) | {"line": clip.line}
            if info is not None:
                row["info"] = {"num_frames": info.num_frames, "fps": info.fps, "width": info.width,
                               "height": info.height, "start": info.start}
            ext = clip.video.suffix.lstrip(".").lower() or "video"
            sink.write({"__key__": f"{position:0{KEY_DIGITS}d}", ext: Path(clip.video).read_bytes(),
                        "json": json.dumps(row).encode()})
            counts[-1] += 1
    shards = [path for path, _ in written]
    classes = sorted({c.label for c in clips if c.label is not None})
    index = {"format": FORMAT, "samples": len(clips), "source": str(manifest), "seed": seed,
             "shards": [{"name": path.name, "samples": n} for path, n in zip(shards, counts)], "classes": classes}
    index_path = write_text_atomic(out / INDEX, json.dumps(index, indent=1) + "\n")
    return ShardReport(index_path, shards, len(clips), skipped)


# --------------------------------------------------------------------------- the shard set


def _open(url: str) -> BinaryIO:
    """A seekable binary file for a local path or an fsspec URL."""
    import fsspec

    return fsspec.open(url, "rb").open()  # type: ignore[no-any-return]


def _join(base: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else f"{base.rstrip('/')}/{name}" if base else name


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else ""


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.isfile(path))


@dataclass(frozen=True)
class Member:
    """A sample of a shard: its key and where each of its members' bytes lie (ext -> (offset, size))."""

    key: str
    parts: dict[str, tuple[int, int]]


def scan_shard(handle: BinaryIO, url: str) -> list[Member]:
    """The samples of one tar, in file order, from its headers (``tarfile`` seeks over the data).
    Members are grouped by WebDataset's rule (``webdataset.tariterators.base_plus_ext``: the key
    is the name up to the first dot of its last component)."""
    from webdataset.tariterators import base_plus_ext

    samples: list[Member] = []
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or ext is None:
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(Member(key, {}))
                samples[-1].parts[ext] = (info.offset_data, info.size)
    except tarfile.TarError as error:
        raise ValueError(f"{url}: not a readable tar shard ({error})") from None
    return samples


def resolve_shards(source: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """The shard URLs of ``source`` with their clip counts and classes when an index gives them.

    ``source`` is a folder (or folder URL) holding ``shards.json``, that index itself, or shard
    URLs: a brace pattern (``shards/b-{000..009}.tar``) or several separated by spaces. For the
    latter the index beside the first shard is used when it lists every one of them; else the
    counts are None (the caller scans the shards)."""
    from braceexpand import braceexpand

    source = str(source).strip()
    if not source:
        raise ValueError("no shards given (an empty path)")
    index_url = None
    if source.endswith(".json"):
        index_url = source
    elif not source.endswith(".tar") and "{" not in source and " " not in source:
        index_url = _join(source, INDEX)
    if index_url is not None:
        if not _exists(index_url):
            raise FileNotFoundError(f"{index_url}: no shard index here (write one with vlmask data shard)")
        index = _read_index(index_url)
        base = _parent(index_url)
        return [_join(base, s["name"]) for s in index["shards"]], [int(s["samples"]) for s in index["shards"]], index.get("classes")
    urls = [url for part in source.split() for url in braceexpand(part)]
    beside = _join(_parent(urls[0]), INDEX)
    if _exists(beside):
        index = _read_index(beside)
        listed = {_join(_parent(beside), s["name"]): int(s["samples"]) for s in index["shards"]}
        if all(url in listed for url in urls):
            return urls, [listed[url] for url in urls], index.get("classes")
    missing = [url for url in urls if not _exists(url)]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing)")
    return urls, None, None


def _read_index(url: str) -> dict[str, Any]:
    with _open(url) as handle:
        try:
            index = json.loads(handle.read())
        except json.JSONDecodeError as error:
            raise ValueError(f"{url}: line {error.lineno}: not JSON ({error.msg})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{url}: key format: not a {FORMAT} shard index")
    for i, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) or not isinstance(shard.get("samples"), int):
            raise ValueError(f"{url}: key shards[{i}]: needs a name (string) and samples (integer)")
    return index


def rank_positions(counts: list[int], seed: int, epoch: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The (shard, sample) pairs rank ``rank`` of ``world`` reads in epoch ``epoch``, in order.

    The epoch's stream is every shard, in an order drawn from (seed, epoch), each read front to
    back; rank r takes the r-th of ``world`` equal contiguous slices of it (the remainder,
    fewer than ``world`` clips, waits for another epoch). So ranks are disjoint and equal, and
    every clip is in exactly one slice.

    >>> [rank_positions([2, 3], seed=0, epoch=0, rank=r, world=2) for r in (0, 1)]  # clip (1, 2) waits
    [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(counts), generator=g).tolist()
    per_rank = sum(counts) // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    out: list[tuple[int, int]] = []
    at = 0
    for shard in order:
        n = counts[shard]
        first, stop = max(lo - at, 0), min(hi - at, n)
        out.extend((shard, j) for j in range(first, stop))
        at += n
        if at >= hi:
            break
    return out


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The RNG seed of the sample at ``position`` of rank ``rank``'s stream in ``epoch``: its
    augmentations depend on where it is in the epoch, not on which worker loads it."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1, np.uint64)[0] >> 2)


# --------------------------------------------------------------------------- the dataset


class VideoShardsDataset(VideoManifestDataset, IterableDataset):
    """Clips streamed from WebDataset shards (dataset ``video_shards``), decoded from memory.

    ``manifest`` (what the engine passes from ``data.train``) names the shard set: a folder
    with ``shards.json``, the index, or shard URLs with a brace pattern (see
    :func:`resolve_shards`). Every other argument is :class:`VideoManifestDataset`'s and means
    the same (frame sampling, crops, flips, colour, flow, the decoder backend: PyAV and decord
    read the bytes from a BytesIO, torchcodec from the bytes); the clip's probe is the one
    ``vlmask data shard`` stored, so nothing is probed again.

    Iteration: call :meth:`plan` (batch size, seed, rank, world), set ``epoch`` and
    ``start_batch`` (or ``start_sample``), iterate, as with ``vlmask.data_loading.EpochBatches``.
    Rank r reads the r-th equal slice of the epoch's stream (:func:`rank_positions`); within
    it, batch j (``batch_size`` consecutive clips) belongs to DataLoader worker j mod W, so
    workers are disjoint and the loader, which takes one batch from each worker in turn, yields
    the rank's batches in stream order whatever W is. Each clip is loaded under its own seed
    (:func:`sample_seed`). A resume at ``start_sample`` k yields exactly the clips an
    uninterrupted epoch yields from position k on. Use ``persistent_workers=False`` (the engine
    does for a stream): workers see ``epoch`` as it was when the loader was iterated.

    ``dataset[i]`` still loads clip i (its index: its place in the set) by seeking to it, for
    the engine's shape check and for anything that wants one clip. A clip that fails to decode
    is replaced by the next clip of the stream (``load_failures`` records it), never dropped:
    every rank must take the same number of steps.
    """

    def __init__(
        self,
        manifest: str,
        num_frames: int = 16,
        size: int = 224,
        sampling: str = "dynamic",
        stride: int = 4,
        train: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        decoder: str = "auto",
        classes: list[str] | None = None,
        decode_short_side: int | None = None,
        decode_device: str = "cpu",
        flow: bool = False,
        second_clip: bool = False,
        flow_bound: float = 20.0,
        color_jitter: ColorJitter | None = None,
        blur: Blur | None = None,
    ) -> None:
        self._configure(num_frames, size, sampling, stride, train, crop_scale, hflip, mean, std, decoder,
                        decode_short_side, decode_device, flow, second_clip, flow_bound, color_jitter, blur)
        self.manifest = str(manifest)  # type: ignore[assignment]
        self.shards, counts, index_classes = resolve_shards(self.manifest)
        self._tables: OrderedDict[int, list[Member]] = OrderedDict()
        self._meta: list[dict[str, Any]] | None = None
        if counts is None:  # no index: read the headers of every shard once
            counts = [len(self._table(s)) for s in range(len(self.shards))]
        self.counts: list[int] = counts
        self.offsets: list[int] = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        if not self.offsets[-1]:
            raise EmptyManifestError(f"shards {self.manifest} hold no clip")
        self._classes = list(classes) if classes is not None else index_classes
        self.manifest_skipped, self.probe_skipped = [], []
        self.load_failures: list[SkippedClip] = []
        self.batch_size, self.seed, self.rank, self.world = 1, 0, 0, 1
        self.epoch = 0
        self.start_sample = 0

    # ------------------------------------------------------------------ the plan (EpochBatches' contract)

    def plan(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> "VideoShardsDataset":
        """Set the batch size, seed and this process's rank among ``world``; returns the dataset."""
        if len(self) < batch_size * world:
            raise ValueError(
                f"{len(self)} training clips cannot fill one step of {batch_size} clips x {world} processes; "
                "lower train.batch_size or add data")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        return self

    @property
    def batches_per_epoch(self) -> int:
        return len(self) // (self.batch_size * self.world)

    @property
    def start_batch(self) -> int:
        return self.start_sample // self.batch_size

    @start_batch.setter
    def start_batch(self, batch: int) -> None:
        self.start_sample = batch * self.batch_size

    def __len__(self) -> int:
        return self.offsets[-1]

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        positions = rank_positions(self.counts, self.seed, self.epoch, self.rank, self.world)
        positions = positions[: self.batches_per_epoch * self.batch_size]  # whole batches only, as EpochBatches
        handle: tuple[int, BinaryIO] | None = None
        try:
            for p in range(self.start_sample, len(positions)):
                if (p // self.batch_size) % workers != worker:
                    continue
                item, handle = self._stream_item(positions, p, handle)
                yield item
        finally:
            if handle is not None:
                handle[1].close()

    def _stream_item(self, positions: list[tuple[int, int]], p: int,
                     handle: tuple[int, BinaryIO] | None) -> tuple[dict[str, Any], tuple[int, BinaryIO] | None]:
        _seed_everything(sample_seed(self.seed, self.epoch, self.rank, p))
        failures: list[tuple[int, str, str]] = []
        for attempt in range(20):  # a clip that fails is replaced by the next of the stream
            shard, j = positions[(p + attempt) % len(positions)]
            if handle is None or handle[0] != shard:
                if handle is not None:
                    handle[1].close()
                handle = (shard, _open(self.shards[shard]))
            try:
                item = self._load_member(shard, j, handle[1])
            except DecodeError as error:
                failures.append((getattr(error, "line", 0), error.path, error.reason))
                self.load_failures.append(SkippedClip(failures[-1][0], error.path, error.reason))
                continue
            item["load_failures"] = failures
            return item, handle
        raise RuntimeError(f"{self.manifest}: 20 clips in a row failed to decode; last: {failures[-1][1]}: {failures[-1][2]}")

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} of {len(self)}")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        with _open(self.shards[shard]) as handle:
            item = self._load_member(shard, index - self.offsets[shard], handle)
        item["load_failures"] = []
        return item

    # ------------------------------------------------------------------ reading a clip

    def _table(self, shard: int, handle: BinaryIO | None = None) -> list[Member]:
        """The samples of a shard (its headers read once per process; the last 8 kept)."""
        if shard not in self._tables:
            if handle is None:
                with _open(self.shards[shard]) as fresh:
                    table = scan_shard(fresh, self.shards[shard])
            else:
                table = scan_shard(handle, self.shards[shard])
            self._tables[shard] = table
            while len(self._tables) > 8:
                self._tables.popitem(last=False)
        self._tables.move_to_end(shard)
        return self._tables[shard]

    def _read(self, shard: int, j: int, handle: BinaryIO) -> tuple[Member, dict[str, Any], str, bytes]:
        member = self._table(shard, handle)[j]
        url = self.shards[shard]
        if "json" not in member.parts:
            raise ValueError(f"{url}: sample {member.key} has no .json member (not a vlmask shard?)")
        video_ext = next((e for e in member.parts if e != "json"), None)
        if video_ext is None:
            raise ValueError(f"{url}: sample {member.key} has no video member")

        def read(ext: str) -> bytes:
            offset, size = member.parts[ext]
            handle.seek(offset)
            return handle.read(size)

        try:
            row = json.loads(read("json"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{url}: {member.key}.json: line {error.lineno}: not JSON ({error.msg})") from None
        return member, row, video_ext, read(video_ext)

    def _load_member(self, shard: int, j: int, handle: BinaryIO) -> dict[str, Any]:
        member, row, ext, data = self._read(shard, j, handle)
        video = MemoryVideo(f"{self.shards[shard]}#{member.key}.{ext} (line {row.get('line', '?')})", data)
        clip = ManifestClip(int(row.get("line", 0)), video, row.get("caption"), row.get("label"),  # type: ignore[arg-type]
                            row.get("verb"), row.get("noun"), row.get("start"), row.get("end"),
                            tuple(row["action_box"]) if row.get("action_box") is not None else None)
        info = VideoInfo(**row["info"]) if isinstance(row.get("info"), dict) else None
        try:
            video_tensor, box, flow = self._view(clip, info)
            item: dict[str, Any] = {} if flow is None else {"flow": flow}
            if self.second_clip:
                second_video, _, second_flow = self._view(clip, info)
                item["second_video"] = second_video
                if second_flow is not None:
                    item["second_flow"] = second_flow
        except DecodeError as error:
            error.line = clip.line  # type: ignore[attr-defined]  (the source manifest's line, for the failure record)
            raise
        label = clip.label if clip.label is not None else (f"{clip.verb} {clip.noun}" if clip.verb and clip.noun else None)
        return item | {
            "video": video_tensor,
            "index": self.offsets[shard] + j,
            "label": self._label_id(label),
            "action_box": box if box is not None else torch.full((4,), float("nan")),
            "caption": clip.caption or "",
        }

    def _label_id(self, label: str | None) -> int:
        if label is None:
            return -1
        lookup = getattr(self, "_lookup", None)
        if lookup is None:
            lookup = self._lookup = {name: i for i, name in enumerate(self.classes)}
        return lookup.get(label, -1)

    # ------------------------------------------------------------------ the set's text (read once, when asked)

    def _rows(self) -> list[dict[str, Any]]:
        """Every clip's manifest line, by index (reads each shard's .json members once)."""
        if self._meta is None:
            rows: list[dict[str, Any]] = []
            for shard, url in enumerate(self.shards):
                with _open(url) as handle:
                    for j in range(self.counts[shard]):
                        member = self._table(shard, handle)[j]
                        offset, size = member.parts.get("json", (0, 0))
                        handle.seek(offset)
                        rows.append(json.loads(handle.read(size)) if size else {})
            self._meta = rows
        return self._meta

    @property
    def captions(self) -> list[str]:  # type: ignore[override]
        return [row.get("caption") or "" for row in self._rows()]

    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        if self._classes is None:
            self._classes = sorted({row["label"] for row in self._rows() if isinstance(row.get("label"), str)})
        return self._classes

    @property
    def skipped(self) -> list[SkippedClip]:
        return []


def _seed_everything(seed: int) -> None:
    """What ``vlmask.data_loading.SeededItems`` does before loading a sample."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = ["FORMAT", "INDEX", "ShardReport", "VideoShardsDataset", "rank_positions", "resolve_shards", "sample_seed",
           "scan_shard", "write_shards"]
