"""The `alignuser` command line; each subcommand maps its flags onto a pydantic config.

Expected failures (bad flags, bad data, missing or unwritable files, a broken trace database)
end as one `error: ...` line on stderr with exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import typing
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from alignuser.config import DataConfig, DataInfoConfig, OfflineConfig, PolicyName, SimulateConfig
from alignuser.entry import COMMANDS, DEBUG_HELP, DefaultsFormatter, top_parser
from alignuser.flags import add_data_flags, add_split_flags, data_config
from alignuser.simulate_flags import (
    add_model_flags,
    add_simulate_flags,
    given_fields,
    resumed_config,
    simulate_config,
)
from training.config import validation_line

console = Console()


def cmd_data(args: argparse.Namespace) -> int:
    from simulator.readers import datasets_cache, fetch

    if args.action == "fetch":
        path = fetch(args.name, datasets_cache())
        console.print(f"saved {path}")
        return 0
    from alignuser.config import world_for
    from simulator.info import dataset_info, format_info
    from simulator.trajectories import trajectory_stats

    cfg = DataInfoConfig(**given_fields(args, DataInfoConfig))
    world = world_for(data_config(args, dataset=args.name))
    info = dataset_info(world.ds, world.split)
    for table in format_info(info):
        console.print(table)
    console.print(f"split: {world.split.config.describe()}")
    if cfg.trajectories:
        from rich.table import Table

        from evaluation.signal import inverted, signal_table

        stats = trajectory_stats(world.trajectories("train", progress=True))
        stats_test = trajectory_stats(world.trajectories("test", progress=True))
        sig = signal_table(world, world.trajectory_config, users=cfg.signal_users)
        table = Table(title=f"signal check: AUC of each perceived cue, watched vs skipped slots "
                            f"on training pages ({sig.attrs['users']} users, "
                            f"{sig.attrs['slots']} slots) beside held-out vs never-rated on "
                            "validation 1:1 lists (same users)")
        for col in ("feature", "train pages", "validation lists"):
            table.add_column(col, justify="left" if col == "feature" else "right")
        for _, r in sig.iterrows():
            table.add_row(r["feature"], f"{r['train_pages']:.3f}", f"{r['valid_lists']:.3f}")
        console.print(table)
        bad = inverted(sig)
        console.print("exposure mixture: " + ", ".join(
            f"{k} {v:g}" for k, v in world.trajectory_config.exposure.items()) + "; "
            + (f"INVERTED cues (training teaches the opposite): {', '.join(bad)}" if bad
               else "no cue points the other way on training pages"))
        console.print({"train": stats, "test": stats_test,
                       "agent4rec_reference": {"watch_ratio": 0.32, "pages_per_session": 4.0}})
    return 0


def cmd_recommenders(args: argparse.Namespace) -> int:
    from rich.table import Table

    from alignuser.config import world_for
    from simulator.offline import offline_metrics

    cfg = OfflineConfig(**{"data": data_config(args), **given_fields(args, OfflineConfig)})
    world = world_for(cfg.data)
    recs = {rec.name: rec for rec in (world.recommender(n, seed=cfg.seed)
                                      for n in cfg.recommenders)}
    import pandas as pd

    seen = {"valid": world.split.train,
            "test": pd.concat([world.split.train, world.split.valid], ignore_index=True)}
    for part in ("valid", "test"):
        frame = offline_metrics(recs, seen[part], world.split.part(part), k=cfg.k)
        table = Table(title=f"offline metrics on the {part} split (k={cfg.k})")
        table.add_column("recommender", overflow="fold")  # a long spec's name wraps, whole
        for col in frame.columns:
            table.add_column(str(col), justify="right")
        for name, row in frame.iterrows():
            table.add_row(str(name), *[f"{v:.0f}" if col == "users" else f"{v:.4f}"
                                       for col, v in row.items()])
        console.print(table)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from alignuser.simulate import recorded_config, simulate

    if args.resume is None:
        simulate(simulate_config(args), args.output, console, overwrite=args.overwrite)
        return 0
    if args.output is not None and Path(args.output) != Path(args.resume):
        raise ValueError(f"--resume {args.resume} names the run to continue; drop --output "
                         f"{args.output}")
    simulate(resumed_config(args, recorded_config(args.resume)), args.resume, console,
             resume=True)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from graph.graph import build_graph
    from graph.trace import describe, history, list_threads, open_checkpointer, render
    from simulator.runs import check_run_dir

    run = Path(args.run)
    if args.from_step is None and (args.policy or args.output):
        raise ValueError(f"{'--policy' if args.policy else '--output'} re-runs an agent and "
                         "needs --from-step N (the checkpoint to branch from)")
    if args.from_step is not None:
        check_run_dir(args.output)
    try:
        threads = list_threads(run)
    except sqlite3.DatabaseError as exc:  # sqlite names neither the file nor what is wrong
        raise sqlite3.DatabaseError(f"{run}: cannot read its trace database ({exc})") from None
    if not threads:
        raise ValueError(f"{run}: the trace database records no agents")
    thread = args.agent or threads[0]
    if thread not in threads:
        raise ValueError(f"no agent {thread!r} in {run}; agents: {', '.join(threads[:10])} ...")
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{run / 'manifest.json'} is not valid JSON ({exc})") from None
    cfg = SimulateConfig.model_validate(manifest["config"])
    if args.from_step is not None:  # the branch goes to a run folder of its own
        from alignuser.branch import branch

        out, pages = branch(run, thread, manifest, cfg, args.from_step, args.policy, args.output)
        console.print(f"re-ran {thread} from step {args.from_step} with policy "
                      f"{args.policy or cfg.policy}; branch written to {out}:")
        console.print(json.dumps(pages, indent=1))
        return 0
    with open_checkpointer(run) as saver:
        app = build_graph(cfg.memory, cfg.world_model, checkpointer=saver)
        snaps = history(app, thread)
    steps = [describe(s, i) for i, s in enumerate(snaps)]
    if args.step is not None:
        steps = [s for s in steps if s["step"] == args.step]
        if not steps:
            raise IndexError(f"{thread} has steps 0..{len(snaps) - 1}")
    console.print(f"[bold]{thread}[/bold]: {len(snaps)} checkpoints", highlight=False)
    for s in steps:
        console.print(render(s), highlight=False, markup=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evaluation.report import rerender

    paths = rerender(Path(args.run))
    console.print(f"report: {paths['report.html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = top_parser()
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help=COMMANDS["data"])
    d.add_argument("action", choices=["info", "fetch"],
                   help="info: counts, splits and hashes; fetch: download a MovieLens archive")
    d.add_argument("name", nargs="?", default=DataConfig.model_fields["dataset"].default,
                   help="dataset name or path")
    add_model_flags(d, DataInfoConfig)
    add_split_flags(d)
    d.set_defaults(func=cmd_data)

    r = sub.add_parser("recommenders", help=COMMANDS["recommenders"])
    r.add_argument("action", choices=["eval"], help="eval: ranking metrics on valid and test")
    add_data_flags(r)
    add_model_flags(r, OfflineConfig)
    r.set_defaults(func=cmd_recommenders)

    s = sub.add_parser("simulate", help=COMMANDS["simulate"])
    add_simulate_flags(s)
    s.set_defaults(func=cmd_simulate)

    t = sub.add_parser("trace", help=COMMANDS["trace"])
    t.add_argument("run", help="a simulation run directory")
    t.add_argument("agent", nargs="?", help="thread id '<recommender>:<user>' (default: first)")
    t.add_argument("--step", type=int, help="show only this super-step")
    t.add_argument("--from-step", type=int, help="re-run the agent from this checkpoint into "
                   "a new run folder (the recorded run is left as it is)")
    t.add_argument("--policy", choices=typing.get_args(PolicyName),
                   help="with --from-step: the policy to re-run with (default: the run's)")
    t.add_argument("--output", default=None, help="with --from-step: the branch's run folder "
                   "(default runs/trace-<UTC time>/)")
    t.set_defaults(func=cmd_trace)

    rp = sub.add_parser("report", help=COMMANDS["report"])
    rp.add_argument("run", help="an evaluate run directory")
    rp.set_defaults(func=cmd_report)

    from alignuser import commands

    commands.add_train(sub)
    commands.add_evaluate(sub)
    for command in sub.choices.values():  # `alignuser simulate --debug` works as well
        command.formatter_class = DefaultsFormatter
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)
    return p




def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix from the message alone; anything else is a bug and keeps its
    traceback. ValueError covers DataError and pydantic's ValidationError, OSError the file ones
    (FileNotFoundError, FileExistsError, PermissionError, ...)."""
    errors: list[type[BaseException]] = [ValueError, OSError, IndexError, KeyError,
                                         sqlite3.DatabaseError]
    try:
        from langgraph.errors import GraphRecursionError
    except ImportError:  # pragma: no cover - langgraph is a dependency
        pass
    else:
        errors.append(GraphRecursionError)
    return tuple(errors)


def error_line(exc: BaseException) -> str:
    """One line for the terminal: the first line of the message (LangGraph adds a URL)."""
    if isinstance(exc, ValidationError):
        return validation_line(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0].strip() if lines else type(exc).__name__
    if type(exc).__name__ == "GraphRecursionError":
        first += " (a session ran more graph steps than --pages allows; please report it)"
    return first


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except expected_errors() as exc:
        if getattr(args, "debug", False):
            raise
        Console(stderr=True).print(f"[red]error:[/red] {escape(error_line(exc))}",
                                   highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
