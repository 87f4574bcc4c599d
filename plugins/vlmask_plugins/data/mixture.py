"""Several datasets at once, drawn by weight (dataset ``mixture``).

V-JEPA 2 (Assran et al., 2025) pretrains on a weighted mix of video sets; this is that, for
manifests and shard sets. It is a dataset plugin, not an engine setting: ``data.train`` stays one
path (the first source) and the others are the plugin's ``sources``, so the engine and its
settings are unchanged, and the mix is in the recipe, hence in the run's ``config.yaml``::

    data:
      train: a.jsonl                      # source 0, weight `weight`
      dataset: {name: mixture, weight: 3, seed: ${seed},
                sources: [{path: shards/b-{000..009}.tar, weight: 1}]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from vlmask_plugins.data.dataset import VideoManifestDataset
from vlmask_plugins.data.manifest import SkippedClip


def is_shard_set(path: str) -> bool:
    """Shards (dataset ``video_shards``) rather than a JSONL manifest: a ``.tar`` or brace pattern,
    a ``shards.json``, or a folder."""
    return path.endswith((".tar", ".json")) or "{" in path or "://" in path or Path(path).is_dir()


def check_sources(manifest: str, weight: Any, sources: Any) -> list[tuple[str, float]]:
    """(path, weight) of every source, data.train first; ValueError naming the first bad key."""
    if not isinstance(sources, (list, tuple)):
        raise ValueError(f"sources: a list of {{path, weight}} is needed, got {type(sources).__name__}")
    entries = [("weight", {"path": manifest, "weight": weight})] + [(f"sources[{i}]", s) for i, s in enumerate(sources)]
    out = []
    for key, entry in entries:
        if not isinstance(entry, dict) or set(entry) - {"path", "weight"} or "path" not in entry:
            raise ValueError(f"{key}: needs path and weight only, got {entry!r}")
        w = entry.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ValueError(f"{key}{'' if key == 'weight' else '.weight'}: must be a number > 0, got {w!r}")
        path = str(entry["path"])
        if not is_shard_set(path) and not Path(path).expanduser().is_file():
            raise ValueError(f"{key if key != 'weight' else 'data.train'}{'.path' if key != 'weight' else ''}: "
                             f"no such manifest or shard set: {path}")
        out.append((path, float(w)))
    return out


def mix_table(sizes: Sequence[int], weights: Sequence[float], total: int, seed: int) -> list[tuple[int, int]]:
    """``total`` (source, clip) draws: source k gets its share of ``total`` by weight (largest
    remainders round), its clips in a seeded order, a new order each time it wraps around; then
    the draws are listed source by source (the engine's epoch permutation shuffles them).

    >>> table = mix_table([2, 10], [3.0, 1.0], total=8, seed=0)
    >>> [sum(1 for k, _ in table if k == s) for s in (0, 1)], sorted({j for k, j in table if k == 0})
    ([6, 2], [0, 1])
    """
    share = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in share]
    for k in sorted(range(len(share)), key=lambda k: share[k] - counts[k], reverse=True)[: total - sum(counts)]:
        counts[k] += 1
    g = torch.Generator().manual_seed(seed)
    table: list[tuple[int, int]] = []
    for k, (n, m) in enumerate(zip(sizes, counts)):
        order: list[int] = []
        while len(order) < m:
            order += torch.randperm(n, generator=g).tolist()
        table += [(k, j) for j in order[:m]]
    return table


class MixtureDataset(Dataset):
    """``data.train`` (weight ``weight``) and ``sources`` (each ``{path, weight}``: a manifest or
    a shard set) as one dataset whose epoch holds ``epoch_clips`` clips (default: as many as all sources
    together), each source's share proportional to its weight (:func:`mix_table`, seeded by
    ``seed``: set ``seed: ${seed}``). A source with a larger share than its clips repeats them; one
    with a smaller share contributes a seeded subset, the same every epoch (the engine's epoch
    order shuffles the draws, not the subset).

    Every source is read with the same clip settings (``num_frames``, ``size``, ...: those of
    ``video_manifest``) by ``video_manifest`` or, for shard sets, ``video_shards`` (read by
    seeking to each clip: a mixture is not streamed). ``mix`` says how many draws each source got.
    """

    def __init__(self, manifest: str, sources: list[dict[str, Any]] | None = None, weight: float = 1.0,
                 seed: int = 0, epoch_clips: int | None = None, num_frames: int = 16, size: int = 224,
                 sampling: str = "dynamic", stride: int = 4, train: bool = True,
                 crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True, decoder: str = "auto",
                 **clip: Any) -> None:
        from vlmask_plugins.data.shards import VideoShardsDataset

        checked = check_sources(str(manifest), weight, sources if sources is not None else [])
        if epoch_clips is not None and epoch_clips < 1:
            raise ValueError(f"epoch_clips: must be >= 1, got {epoch_clips}")
        common = dict(num_frames=num_frames, size=size, sampling=sampling, stride=stride, train=train, crop_scale=crop_scale,
                      hflip=hflip, decoder=decoder, **clip)
        self.parts: list[Any] = []
        for i, (path, _) in enumerate(checked):
            key = "data.train" if i == 0 else f"sources[{i - 1}].path"
            try:
                self.parts.append(VideoShardsDataset(path, **common) if is_shard_set(path)
                                  else VideoManifestDataset(path, **common))
            except (ValueError, FileNotFoundError) as error:
                raise ValueError(f"{key}: {error}") from None
        sizes = [len(p) for p in self.parts]
        self.table = mix_table(sizes, [w for _, w in checked], epoch_clips or sum(sizes), seed)
        self.mix = [{"path": path, "weight": w, "clips": n, "draws": sum(1 for k, _ in self.table if k == i)}
                    for i, ((path, w), n) in enumerate(zip(checked, sizes))]
        self.classes: list[str] = sorted({c for p in self.parts for c in p.classes})
        lookup = {c: i for i, c in enumerate(self.classes)}
        self._remap = [[lookup[c] for c in p.classes] for p in self.parts]
        captions = [p.captions for p in self.parts]
        self.captions: list[str] = [captions[k][j] for k, j in self.table]
        first = self.parts[0]
        self.collate, self.decoder, self.decoder_reason = first.collate, first.decoder, first.decoder_reason
        self.mean, self.std = first.mean, first.std

    @property
    def skipped(self) -> list[SkippedClip]:
        return [s for p in self.parts for s in p.skipped]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, j = self.table[index]
        item = self.parts[k][j]
        item["index"] = index  # the mixture's index: captions[index] is this clip's
        if item["label"] >= 0:
            item["label"] = self._remap[k][item["label"]]
        return item
