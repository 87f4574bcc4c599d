"""The ``vlmask`` command line (docs/contract.md, "Command line")."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from vlmask.config import RecipeError, load_recipe
from vlmask.plugins import PluginError, Plugins, default_plugins
from vlmask.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch
from vlmask.rundir import RunDirBusy, RunDirMismatch, RunDirNotShared

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, markup=False)  # machine-read lines (paths, JSON): never wrapped, never markup


def loaded_plugins() -> Plugins:
    """The process's plugins, each skipped one reported once on stderr (also for plugin commands)."""
    plugins = default_plugins()
    for failure in plugins.failures:
        console.print(f"[yellow]warning:[/] {escape(str(failure))}", soft_wrap=True, highlight=False)
    return plugins


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = loaded_plugins()
    table = Table(title="vlmask plugins")
    for column in ("kind", "name", "provided by", "summary"):
        table.add_column(column)
    for entry in plugins.registry.entries():
        table.add_row(entry.kind, entry.name, entry.provider, entry.summary)
    out.print(table)
    if plugins.blocked:
        out.print(f"blocked: {', '.join(plugins.blocked)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from vlmask.data_requirements import check_data
    from vlmask.paths import cache_dir
    from vlmask.rehearsal import rehearse
    from vlmask.schema import validate

    plugins = loaded_plugins()
    recipe = load_recipe(args.recipe, args.overrides)
    problems = validate(recipe, plugins.registry)
    data_errors, notes = check_data(recipe, plugins.registry, plugins.manager.hook, cache_dir())  # reads data.train
    for note in notes:  # what the data provides, and what will be done about what it lacks
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    problems += data_errors
    if not problems and not args.keys_only:  # build the run, take each stage's first step on meta: what only plugins know
        problems += rehearse(recipe, plugins)
    if problems:
        console.print(f"[red]{escape(args.recipe)}: {len(problems)} problem(s)[/]", highlight=False)
        for p in problems:
            console.print(f"- {p}", markup=False, highlight=False, soft_wrap=True)
        return 1
    out.print(f"{args.recipe}: valid")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from vlmask.engine import Trainer
    from vlmask.launch import adopt_slurm, outside_srun
    from vlmask.rundir import check_same_recipe
    from vlmask.schema import settings

    adopt_slurm()  # under srun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's variables
    if note := outside_srun():  # a batch script's own shell: one process, said so
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = settings(recipe, "run").dir
    if run_dir:  # the Trainer checks again under the run directory's lock; this answers before any work
        check = check_same_recipe(run_dir, OmegaConf.to_container(recipe.config, resolve=True), recipe.overrides,
                                  recipe=str(recipe.path))
        check.raise_if_refused()
        if check.status == "same" and check.finished:
            out.print(check.message())
            return 0
        if check.status == "extend" and int(os.environ.get("RANK", "0")) == 0:
            console.print(check.message(), markup=False, highlight=False, soft_wrap=True)
    trainer = Trainer(recipe, loaded_plugins(), console=console)
    rank0 = trainer.rank == 0
    if rank0:
        out.print(f"run directory: {trainer.run_dir}")
        console.print(trainer.describe(), markup=False, highlight=False, soft_wrap=True)
        skipped = trainer.train_set.skipped
        if skipped:
            console.print(f"[yellow]{len(skipped)} manifest line(s) skipped[/], first: " + escape("; ".join(str(s) for s in list(skipped)[:5])), highlight=False)
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} clips/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not rank0) as bar:
        task = bar.add_task("train", total=trainer.total_steps, completed=trainer.start_step, loss="-", rate="-")

        def progress(step: int, metrics: dict[str, Any]) -> None:
            fields = {}
            if metrics:
                fields = {"loss": f"{metrics['loss']:.4f}", "rate": f"{metrics['clips_per_s']:.1f}"}
            bar.update(task, completed=step, **fields)

        # vlmask.preemption: a preemption signal stops every rank at a step, saved. The watch is
        # installed here, not inside train(), so that no default handler comes back between the
        # save and the exit: after a preemption its signals are ignored while the process exits
        watch = PreemptionWatch(settings(recipe, "train").preempt_signals)
        with trainer:
            watch.install()
            try:
                summary = trainer.train(progress, preemption=watch)
            except Preempted:
                watch.hold()  # exiting for the preemption: later signals are ignored
                from vlmask.step import leave_processes

                leave_processes()
                raise
            finally:
                watch.restore()  # the handlers of before the run again (nothing to restore after hold)
    if rank0:
        from vlmask.flops import record_train_flops

        summary = record_train_flops(trainer.run_dir, trainer.train_step, summary)  # on the run's own parts
        out.print(json.dumps({k: summary[k] for k in ("steps", "wall_s", "final_loss", "clips_per_s", "peak_mem_mb", "skipped_clips")}))
        out.print(f"run directory: {trainer.run_dir}")
    from vlmask.step import leave_processes

    leave_processes()  # every rank, after rank 0's FLOP count
    return 0


def _split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """Recipes and overrides from one list: ``KEY=VALUE`` and ``~KEY`` are overrides."""
    overrides = [i for i in items if "=" in i or i.startswith("~")]
    return [i for i in items if i not in overrides], overrides


def cmd_eval(args: argparse.Namespace) -> int:
    from vlmask.evaluate import evaluate_run

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    result = evaluate_run(Path(args.run_dir), args.overrides, evaluators=only)
    out.print_json(json.dumps(result, default=str))
    out.print(f"wrote {Path(args.run_dir) / 'eval.json'}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from vlmask.finetune import finetune_run

    result = finetune_run(Path(args.run_dir), args.overrides)
    out.print_json(json.dumps({k: v for k, v in result.items() if k != "history"}, default=str))
    out.print(f"wrote {Path(args.run_dir) / 'finetune.json'}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from vlmask.evaluate import embed_manifest

    path = embed_manifest(Path(args.run_dir), Path(args.manifest), Path(args.out), args.overrides, pooling=args.pooling)
    out.print(f"wrote {path}")
    return 0


def cmd_checkpoint_consolidate(args: argparse.Namespace) -> int:
    from vlmask import sharded
    from vlmask.checkpoint import CheckpointError, latest_checkpoint

    source = Path(args.source)
    checkpoint = latest_checkpoint(source / "checkpoints") if (source / "checkpoints").is_dir() else source
    if checkpoint is None or not (checkpoint / "state.pt").is_file():
        raise CheckpointError(f"{source}: neither a run directory with a checkpoint nor a checkpoint folder (step_<N>)")
    if not sharded.is_sharded(checkpoint):
        raise CheckpointError(f"{checkpoint}: already a full checkpoint (student.safetensors); nothing to consolidate")
    out.print(f"wrote {sharded.consolidate(checkpoint, Path(args.out))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlmask.compare import compare

    recipes, overrides = _split_items(args.items)
    if not recipes:
        raise RecipeError(["vlmask compare needs at least one recipe"])
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    folder = compare(recipes, overrides, seeds=seeds, out_dir=Path(args.out) if args.out else None,
                     baseline=args.baseline, finetune=args.finetune)
    out.print((folder / "comparison.md").read_text())
    from vlmask.show import comparison_attention

    _, why_not = comparison_attention(folder, loaded_plugins())  # FILS Figure 3 of each recipe, side by side
    if why_not:
        console.print(f"note: {why_not}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"comparison: {folder}")
    failed = json.loads((folder / "comparison.json").read_text()).get("failed") or []
    if failed:  # the exit code says that the table lacks runs (comparison.json's "failed" says why)
        shown = "; ".join(f"{f['name']} seed {f['seed']} ({f['run_dir']}): {f['error']}" for f in failed[:5])
        more = f"; ... {len(failed) - 5} more" if len(failed) > 5 else ""
        console.print(f"[red]compare: {len(failed)} run(s) failed:[/] {escape(shown + more)}", highlight=False,
                      soft_wrap=True)
        return 1
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from vlmask.show import ShowError, show

    run_dirs, overrides = _split_items(args.run_dirs)
    try:
        path, notes = show(args.what, run_dirs, args.out, manifest=args.manifest, clips=args.clip, text=args.text,
                           layer=args.layer, overrides=overrides, plugins=loaded_plugins())
    except ShowError as exc:  # one line naming what and where; nothing was written
        console.print(f"[red]show:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmask", description="masked video-language self-supervised pretraining")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a recipe (resumes an unfinished run.dir)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="KEY=VALUE or ~KEY")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a recipe, then build it in memory and rehearse a step of each stage")
    val.add_argument("recipe")
    val.add_argument("overrides", nargs="*")
    val.add_argument("--keys-only", action="store_true",
                     help="check keys and data only, build nothing (skips the rehearsal, vlmask.rehearsal)")
    val.set_defaults(func=cmd_validate)

    plug = sub.add_parser("plugins", help="list every registered plugin")
    plug.set_defaults(func=cmd_plugins)

    ev = sub.add_parser("eval", help="evaluate a run's latest checkpoint; writes RUN_DIR/eval.json")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="KEY=VALUE, e.g. data.val=val.jsonl evaluation.evaluators.knn.k=10")
    ev.add_argument("--only", help="comma-separated sections: linear_probe,knn,retrieval,zero_shot")
    ev.set_defaults(func=cmd_eval)

    ft = sub.add_parser("finetune", help="finetune a run's encoder for action recognition; writes RUN_DIR/finetune.json")
    ft.add_argument("run_dir")
    ft.add_argument("overrides", nargs="*", help="KEY=VALUE, e.g. finetune.max_steps=200 finetune.layer_decay=0.75")
    ft.set_defaults(func=cmd_finetune)

    emb = sub.add_parser("embed", help="one pooled encoder feature per manifest line (.npy)")
    emb.add_argument("run_dir")
    emb.add_argument("manifest")
    emb.add_argument("overrides", nargs="*")
    emb.add_argument("--out", required=True)
    emb.add_argument("--pooling", default="mean", choices=["mean", "temporal"])
    emb.set_defaults(func=cmd_embed)

    cmp_ = sub.add_parser("compare", help="train and evaluate recipes with the same overrides; writes a table and a plot")
    cmp_.add_argument("items", nargs="+", help="RECIPE ... [KEY=VALUE ...]")
    cmp_.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: each recipe's seed)")
    cmp_.add_argument("--out", help="output folder (default: a new folder under runs/)")
    cmp_.add_argument("--baseline", help="recipe (path or stem) to which every other recipe's metrics are "
                      "compared, paired by seed (95%% interval of the difference)")
    cmp_.add_argument("--finetune", action="store_true",
                      help="also fine-tune every run (the recipe's finetune section with finetune.* overrides) and "
                      "tabulate its top-1 as finetune_top1, finetune_verb_top1, finetune_noun_top1")
    cmp_.set_defaults(func=cmd_compare, leftovers="items")  # recipes and overrides after an option join items

    show = sub.add_parser("show", help="draw runs' masks, reconstructions, attention, text similarity or curves "
                          "(PNG, GIF or MP4 by --out's suffix)")
    show.add_argument("what", metavar="WHAT",
                      help="curves, similarity, and the plugins' kinds (built-in: masks, reconstruction, attention)")
    show.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one or more runs, side by side [KEY=VALUE ...]")
    show.add_argument("--out", required=True, help="FILE.png (a grid of frames), FILE.gif or FILE.mp4 (animated)")
    show.add_argument("--manifest", help="the clips' manifest (default: the run's data.val, or its default data's val)")
    show.add_argument("--clip", type=int, nargs="+", action="extend", metavar="N",
                      help="clips to show: line numbers of the manifest counted from 0 (default: 0)")
    show.add_argument("--text", help="similarity: the text to compare with (default: each clip's caption, else label)")
    show.add_argument("--layer", type=int,
                      help="attention: the encoder block, from 0 (negative: from the end; default -1)")
    show.set_defaults(func=cmd_show, leftovers="run_dirs")  # overrides (device=cpu) join the run directories

    checkpoint = sub.add_parser("checkpoint", help="checkpoint utilities")
    checkpoint_sub = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    consolidate = checkpoint_sub.add_parser(
        "consolidate", help="write a sharded checkpoint (FSDP) as a full one: OUT/step_<N>/ with student.safetensors, "
                            "teacher.safetensors, state.pt, as one process writes")
    consolidate.add_argument("source", help="a run directory (its latest checkpoint) or a checkpoint folder step_<N>")
    consolidate.add_argument("--out", required=True, help="folder that receives step_<N>/ and latest")
    consolidate.set_defaults(func=cmd_checkpoint_consolidate)

    from vlmask.bench import add_bench_arguments, cmd_bench

    bench = sub.add_parser("bench", help="measure training throughput, or count one step's FLOPs (--flops)")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    data = sub.add_parser("data", help="data utilities (commands from plugins)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    try:
        plugins = default_plugins()
    except PluginError:
        plugins = None  # reported when a command loads the plugins
    if plugins is not None:  # plugin-provided commands (the built-in plugin: data synth|boxes|captions, export)
        plugins.manager.hook.vlmask_add_commands(subparsers=sub, data=data_sub)
    return p


def _is_override(token: str) -> bool:
    """``KEY=VALUE`` or ``~KEY`` (never an option: ``--out=x`` is one)."""
    return not token.startswith("-") and ("=" in token or token.startswith("~"))


def _chosen_parser(top: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)parser of the command that ``args`` selected (``vlmask data captions`` -> its
    own parser), so that an error shows that command's usage line."""
    current = top
    while True:
        chooser = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, chooser.dest, None) if chooser is not None and chooser.dest else None
        if chooser is None or name not in chooser.choices:
            return current
        current = chooser.choices[name]


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with ``KEY=VALUE`` / ``~KEY`` overrides anywhere after the command
    (``vlmask compare a.yaml b.yaml --out OUT seed=1``, ``vlmask eval RUN --only knn k=v``).

    Why not ``parse_intermixed_args``: it refuses parsers with sub-commands. argparse fills a
    ``nargs="*"`` positional from the first run of positionals only and leaves later ones over;
    those that are overrides join the command's list (``overrides``, or ``items`` where the
    command's positionals mix recipes and overrides, as ``compare``'s do; there a leftover
    recipe joins too). Anything else left over, an unknown option above all, is refused with
    argparse's own message and exit code 2, on the command's usage line."""
    top = parser()
    args, unknown = top.parse_known_args(argv)
    if not unknown:
        return args
    takes_any = getattr(args, "leftovers", None)  # a list whose positionals are recipes as well as overrides
    dest = takes_any or ("overrides" if isinstance(getattr(args, "overrides", None), list) else None)
    strays = [t for t in unknown if dest is None or t.startswith("-") or not (takes_any or _is_override(t))]
    if strays:
        _chosen_parser(top, args).error(f"unrecognized arguments: {' '.join(strays)}")
    setattr(args, dest, [*getattr(args, dest), *unknown])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    code = _dispatch(args)
    if code != 0 and "torch.distributed" in sys.modules:  # a failed rank leaves its group (vlmask.step.leave_processes)
        from vlmask.step import leave_processes

        leave_processes(wait=False)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    """The command's exit code; a user-facing error is one line on stderr (no traceback)."""
    try:
        return int(args.func(args) or 0)
    except (RunDirBusy, RunDirMismatch, RunDirNotShared) as exc:  # another writer, recipe, disk: the user's to settle
        console.print(f"[red]{type(exc).__name__}:[/] {escape(str(exc))}", highlight=False)
        return 2
    except RecipeError as exc:
        console.print(f"[red]recipe error[/] ({len(exc.problems)}):")
        for problem in exc.problems:
            console.print(f"- {problem}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except PluginError as exc:
        console.print(f"[red]plugin error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except Preempted as exc:  # every rank saved the step it stopped at; the scheduler requeues (README, "Preemption")
        if exc.rank == 0:
            console.print(exc.line(), markup=False, highlight=False, soft_wrap=True)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        console.print("interrupted; the last checkpoint is kept and `vlmask run` with the same run.dir resumes it")
        return 130
    except Exception as exc:  # user-facing errors (bad files, checkpoints) without a traceback wall
        if os.environ.get("VLMASK_DEBUG"):
            raise
        name = type(exc).__name__
        console.print(f"[red]{name}:[/] {escape(str(exc))}", highlight=False)
        console.print("(set VLMASK_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
