"""Data plugins: manifests, decoding, the clip dataset and the built-in synthetic set.

- ``manifest``: ``read_manifest`` (JSONL, bad lines skipped with line numbers and reasons).
- ``decode``: ``decode_clip`` (decoder ``auto|pyav|decord|torchcodec``, one frame-time rule:
  ``slot_times``), ``resolve_decoder``, ``probe_video``, ``FrameSampler``.
- ``dataset``: ``VideoManifestDataset`` (registered as dataset ``video_manifest``; uint8 clips),
  ``collate``.
- ``shards``: ``write_shards`` (``vlmask data shard``: WebDataset tar shards and ``shards.json``)
  and ``VideoShardsDataset`` (registered as dataset ``video_shards``: streamed, split by rank and
  worker, resumable at a sample).
- ``mixture``: ``MixtureDataset`` (dataset ``mixture``: ``data.train`` and more manifests or shard
  sets, drawn by weight).
- ``importers``: ``import_manifest`` and ``add_import_command`` (``vlmask data import``:
  EPIC-KITCHENS-100, Something-Something v2, Kinetics, class folders).
- ``numbered``: test videos whose frames show their own number (decoder checks, benchmarks).
- ``synthetic``: ``generate`` (``vlmask data synth``) and ``ensure_builtin`` (the default data).
"""

from vlmask.registry import Register


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    from vlmask_plugins.data.dataset import VideoManifestDataset

    from vlmask_plugins.data.shards import VideoShardsDataset

    register("dataset", "video_manifest", VideoManifestDataset)
    register("dataset", "video_shards", VideoShardsDataset)

    from vlmask_plugins.data.mixture import MixtureDataset

    register("dataset", "mixture", MixtureDataset)
