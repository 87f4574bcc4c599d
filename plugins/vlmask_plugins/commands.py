"""The built-in plugin's commands: ``vlmask data synth|boxes|captions|import|shard`` and ``vlmask export``.

They reach the command line through the ``vlmask_add_commands`` hook (see ``vlmask.hookspecs``)
implemented in ``vlmask_plugins.builtin``; ``vlmask.cli`` imports none of them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmask.cli import loaded_plugins, out  # the command line's output console and plugin report
from vlmask.config import RecipeError, parse_override
from vlmask.schema import check_plugin_node


def cmd_data_synth(args: argparse.Namespace) -> int:
    from vlmask_plugins.data import synthetic

    train, val = synthetic.generate(Path(args.out), clips=args.clips, seed=args.seed)
    out.print(f"wrote {train} and {val}")
    return 0


def cmd_data_boxes(args: argparse.Namespace) -> int:
    from vlmask_plugins.action_area.boxes import fill_boxes

    entry = loaded_plugins().registry.get("action_area", args.detector)
    stats = fill_boxes(Path(args.manifest), Path(args.out), entry.factory(), workers=args.workers)
    out.print(stats.summary(), highlight=False)
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats.as_dict(), indent=2, default=str))
    return 0


def cmd_data_captions(args: argparse.Namespace) -> int:
    from vlmask_plugins.captioners.fill import fill_captions

    registry = loaded_plugins().registry
    node = {"name": args.captioner, **{k: v for k, v, _ in map(parse_override, args.overrides)}}
    problems = check_plugin_node(registry, "captioner", "captioner", node, lambda key: "command line")
    if problems:
        raise RecipeError(problems)
    captioner = registry.get("captioner", args.captioner).factory(**{k: v for k, v in node.items() if k != "name"})
    stats = fill_captions(Path(args.manifest), Path(args.out), captioner, workers=args.workers)
    out.print(stats.summary(), highlight=False)
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats.as_dict(), indent=2, default=str))
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from vlmask_plugins.data.shards import write_shards

    report = write_shards(Path(args.manifest), Path(args.out), shard_size=args.shard_size, seed=args.seed)
    out.print(report.summary(), highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vlmask_plugins.interop import export_hf_videomae

    folder = export_hf_videomae(Path(args.run_dir), Path(args.out))
    out.print(f"wrote {folder} (transformers.VideoMAEModel.from_pretrained loads it; encoder.safetensors is timm-style)")
    return 0


def add_commands(subparsers: argparse._SubParsersAction, data: argparse._SubParsersAction) -> None:
    """The ``vlmask_add_commands`` implementation of the built-in plugin."""
    synth = data.add_parser("synth", help="write the synthetic video-caption dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--clips", type=int, default=400)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    boxes = data.add_parser("boxes", help="detect the action area of every clip; write the manifest with action_box")
    boxes.add_argument("manifest")
    boxes.add_argument("--out", required=True)
    boxes.add_argument("--detector", default="flow", help="a registered action_area plugin (default: flow)")
    boxes.add_argument("--workers", type=int, default=2)
    boxes.add_argument("--stats", help="also write the detection statistics as JSON here")
    boxes.set_defaults(func=cmd_data_boxes)

    captions = data.add_parser("captions", help="write a caption for every clip that has none (a local captioning model)")
    captions.add_argument("manifest")
    captions.add_argument("overrides", nargs="*", help="the captioner's arguments as KEY=VALUE, e.g. path=/models/blip")
    captions.add_argument("--out", required=True)
    captions.add_argument("--captioner", default="hf_image_to_text", help="a registered captioner (hf_image_to_text, template)")
    captions.add_argument("--workers", type=int, default=1)
    captions.add_argument("--stats", help="also write the statistics as JSON here")
    captions.set_defaults(func=cmd_data_captions)

    shard = data.add_parser("shard", help="write a manifest's clips as WebDataset tar shards (dataset video_shards streams them)")
    shard.add_argument("manifest")
    shard.add_argument("--out", required=True, help="an empty folder: shard-000000.tar, ... and shards.json")
    shard.add_argument("--shard-size", type=int, default=1000, help="clips per shard (default 1000)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the order clips are written in (default 0)")
    shard.set_defaults(func=cmd_data_shard)

    from vlmask_plugins.data.importers import add_import_command

    add_import_command(data)  # vlmask data import FORMAT --annotations FILE --videos DIR --out OUT.jsonl

    export = subparsers.add_parser("export", help="write a run's encoder in another framework's format")
    export.add_argument("run_dir")
    export.add_argument("--to", required=True, choices=["hf-videomae"])
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export)
