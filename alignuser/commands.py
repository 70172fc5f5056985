"""`alignuser train` and `alignuser evaluate`: flags onto the training and evaluation configs."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from alignuser.checks import check_adapter
from alignuser.config import world_for
from alignuser.entry import COMMANDS
from alignuser.flags import (
    SPLIT_FLAGS,
    add_data_flags,
    add_run_flags,
    add_split_flags,
    data_config,
    preset_flags,
    preset_values,
)
from alignuser.simulate_flags import add_model_flags, given_fields
from evaluation.run import EvaluateRunConfig
from training.config import TrainConfig, config_flags, parse_config
from training.pipeline import train_data

console = Console()


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help=COMMANDS["train"])
    config_flags(t, TrainConfig)
    add_split_flags(t)
    t.add_argument("--output", required=True, help="folder for the adapter and manifest")
    t.add_argument("--prepare-only", default=None, metavar="FILE",
                   help="render the transitions into FILE (pickle) and stop; fit it anywhere "
                   "with python -m training.fit_prepared FILE OUT")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from simulator.runs import check_train_dir, training_dir
    from training.pipeline import run_training

    cfg = parse_config(TrainConfig, args)
    if args.prepare_only:
        import pickle

        from training.pipeline import prepare

        world = world_for(data_config(args, cfg.dataset, cfg.seed))
        prep = prepare(cfg, train_data(world, cfg))
        Path(args.prepare_only).write_bytes(pickle.dumps(prep))
        console.print(f"{len(prep.train)} train, {len(prep.cr)} counterfactual, "
                      f"{len(prep.calib)} calibration transitions -> {args.prepare_only}")
        return 0
    out = check_train_dir(args.output, args.resume)
    if cfg.init_adapter:
        check_adapter(cfg.init_adapter, "--init-adapter")
    world = world_for(data_config(args, cfg.dataset, cfg.seed))
    with training_dir(out, cfg.model_dump(mode="json")):
        manifest = run_training(cfg, train_data(world, cfg), out, resume=args.resume)
    console.print(manifest["final_losses"])
    console.print(f"adapter written to {out}")
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.run import PRESETS, EvalConfig

    e = sub.add_parser("evaluate", help=COMMANDS["evaluate"])
    preset_flags(e, EvalConfig, PRESETS, default_preset="standard")
    add_data_flags(e)
    add_model_flags(e, EvaluateRunConfig)
    add_run_flags(e, "finished methods and sections")
    e.set_defaults(func=cmd_evaluate, flag_default=e.get_default)


def checkpoints(run: EvaluateRunConfig) -> dict[str, str | None]:
    """Adapter folder per set of weights. A checkpoint named on the command line must exist;
    a shipped one that is absent leaves its methods out (``skipped_methods``)."""
    from alignuser.config import DEFAULT_CHECKPOINT, SHIPPED

    given = {"full": run.checkpoint, "sft": run.sft_checkpoint,
             "wm_policy": run.wm_policy_checkpoint}
    paths = {k: v or (str(SHIPPED[k]) if SHIPPED[k].exists() else None)
             for k, v in given.items()}
    paths["full"] = paths["full"] or (str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.exists()
                                      else None)
    for key, path in given.items():
        if path is not None:
            check_adapter(path, "--checkpoint" if key == "full"
                          else f"--{key.replace('_', '-')}-checkpoint")
    return paths


def skipped_methods(methods: list[str], paths: dict[str, str | None]) -> dict[str, str]:
    """Methods whose weights are not available, with the flag that would supply them."""
    from evaluation.outputs import METHODS

    out = {}
    for m in methods:
        key = METHODS[m].weights
        if key != "base" and paths.get(key) is None:
            flag = "--checkpoint" if key == "full" else f"--{key.replace('_', '-')}-checkpoint"
            out[m] = f"no {key} checkpoint shipped or given ({flag} DIR)"
    return out


# The flags that define an evaluate run; --resume reads them back from its manifest. Where
# the answers are computed is not among them: a run may be resumed on another backend.
WHERE = ("prepare_only", "backend", "address", "concurrency")
RUN_FLAGS = ("dataset", *(f"split_{name}" for name in SPLIT_FLAGS),
             *(name for name in EvaluateRunConfig.model_fields if name not in WHERE))


def resume_flags(args: argparse.Namespace) -> tuple[Path, dict]:
    """For ``--resume RUN``: the run's final path and manifest, with its flags put back on
    ``args``; a flag given now that differs from the run's is refused."""
    import json

    from evaluation.run import EvalConfig
    from simulator.runs import resume_target, staging_dirs

    if args.prepare_only:  # (--overwrite is refused by the parser)
        raise ValueError("--resume continues a run; it cannot be combined with --prepare-only")
    final = resume_target(args.resume, "evaluate")
    if args.output is not None and Path(args.output).expanduser() != final:
        raise ValueError(f"--resume {args.resume} and --output {args.output} name different "
                         "runs; pass one of them")
    staging = staging_dirs(final)[0]
    try:
        manifest = json.loads((staging / "manifest.json").read_text())
        stored = manifest["flags"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise FileNotFoundError(f"--resume {args.resume}: {staging} holds no readable evaluate "
                                "manifest; nothing to resume") from None
    conflicts = []
    for name in (*EvalConfig.model_fields, *RUN_FLAGS):
        given = getattr(args, name, None)
        if given != args.flag_default(name) and given != stored.get(name):
            flag = (SPLIT_FLAGS[name.removeprefix("split_")] if name.startswith("split_")
                    else "--" + name.replace("_", "-"))
            was = stored.get(name)
            conflicts.append(f"{flag} {given} (the run has "
                             f"{'the default' if was is None else was})")
        setattr(args, name, stored.get(name, given))  # a field newer than the run: as given
    if conflicts:
        raise ValueError(f"--resume {args.resume}: flags differ from the run's: "
                         f"{'; '.join(conflicts)}; drop them to resume")
    args.output = str(final)
    return final, manifest


@contextlib.contextmanager
def answered_where(run: EvaluateRunConfig, bundle) -> Iterator[Any]:
    """The runners of ``--backend ray`` (``evaluation.distributed``), or None: here."""
    if run.backend != "ray":
        yield None
        return
    from evaluation.distributed import ray_runners

    with ray_runners(bundle, run.model, run.device, run.address, run.concurrency) as runners:
        yield runners


def cmd_evaluate(args: argparse.Namespace) -> int:
    import os
    import pickle
    import platform
    import shlex
    import sys
    import time

    started = time.perf_counter()

    from evaluation.outputs import all_outputs
    from evaluation.parts import Parts
    from evaluation.run import EvalConfig, build_bundle, expected_seconds, score
    from evaluation.sections import needs, select
    from simulator.runs import (
        check_replaceable,
        check_run_dir,
        check_unfinished,
        discard_unfinished,
        run_path,
        staged_run_dir,
        write_manifest,
    )

    manifest = None
    if args.resume:
        final, manifest = resume_flags(args)
    run = EvaluateRunConfig(**given_fields(args, EvaluateRunConfig))
    methods = run.method_names()
    sections = select(run.sections)
    overrides = preset_values(args, EvalConfig)
    for flag, path in (("--ab-results", args.ab_results), ("--outputs", run.outputs)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist"
                                    + (" (it is a folder)" if Path(path).is_dir() else ""))
    if args.overwrite and args.output and Path(args.output).expanduser().exists():
        check_replaceable(Path(args.output).expanduser())
    elif not run.prepare_only and not args.resume:
        check_run_dir(args.output)
        if not args.overwrite:
            check_unfinished(args.output, "evaluate")
    cfg = EvalConfig.of_preset(args.preset, **overrides)
    if manifest is not None and cfg.model_dump(mode="json") != manifest.get("config"):
        raise ValueError(f"--resume {args.resume}: its flags give another evaluation config "
                         "than the run's manifest records (were the presets changed?)")
    ckpts = checkpoints(run) if not run.prepare_only else {}
    skipped = skipped_methods(methods, ckpts) if not run.prepare_only else {}
    for m, why in skipped.items():
        console.print(f"[yellow]skipping {m}: {why}[/yellow]")
    methods = [m for m in methods if m not in skipped]
    if "simulator" in overrides and cfg.simulator not in methods:
        raise ValueError(f"--simulator {cfg.simulator}: that method is not evaluated "
                         f"(--methods gives {','.join(methods) or 'none'})")
    judge_chat = None
    if run.judge_model:  # built now, so a bad spec fails before any data loads
        from agents.chat import chat_model

        judge_chat = chat_model(run.judge_model)
    if not run.prepare_only and not run.outputs and not args.resume:
        minutes = expected_seconds(cfg, methods, needs(sections)) / 60
        console.print(f"preset {cfg.preset}: {len(methods)} LLM method(s) on {cfg.users} users; "
                      f"expected about {minutes:.0f} min on a 2-core CPU (less on a GPU)")
    world = world_for(data_config(args, seed=cfg.seed))
    if world.split.test.empty:
        raise ValueError(f"{args.dataset}: the test split is empty; nothing to evaluate on")
    bundle = build_bundle(world, cfg)
    users = [int(u) for u in bundle.meta["users"]]
    if manifest is not None and manifest.get("users") != users:
        raise ValueError(f"--resume {args.resume}: the held-out users differ from the run's "
                         "(did the data change?)")
    if run.prepare_only:
        Path(run.prepare_only).write_bytes(pickle.dumps(bundle))
        console.print(f"bundle for {len(bundle.meta['users'])} users -> {run.prepare_only}")
        return 0
    log = lambda m: console.print(f"[dim]{m}[/dim]")  # noqa: E731
    given = {}
    if run.outputs:
        given = pickle.loads(Path(run.outputs).read_bytes())
        given = {m: given[m] for m in methods if m in given}
        methods = list(given)
    if not args.resume:
        final = (Path(args.output).expanduser() if args.overwrite and args.output
                 else run_path(args.output, "evaluate"))
        if args.overwrite:
            discard_unfinished(final)

    def make_judge():
        if judge_chat is not None or not cfg.judge_sessions:
            return judge_chat
        from agents.llm import load_lm
        from agents.scorer import Scorer

        return Scorer(load_lm(run.model, device=run.device))

    try:
        with staged_run_dir(final, "evaluate", resume=bool(args.resume),
                            overwrite=args.overwrite, keep_if=lambda d: bool(Parts(d))) as out:
            if manifest is None:
                flags = {**{k: getattr(args, k, None) for k in (*EvalConfig.model_fields,
                                                                 *RUN_FLAGS)},
                         **run.model_dump(include=set(RUN_FLAGS))}
                write_manifest(out, "evaluate", cfg.model_dump(mode="json"), methods=methods,
                               checkpoints={k: v for k, v in ckpts.items() if v},
                               dataset=world.ds.name, split=world.split.config.describe(),
                               flags=flags, users=users)
            parts = Parts(out)
            done = {**given, **parts.outputs()}
            with answered_where(run, bundle) as runners:
                outputs = all_outputs(bundle, methods, ckpts, run.model, run.device, log,
                                      needs=needs(sections), done=done,
                                      commit=parts.save_outputs,
                                      partial=parts.partial_outputs(),
                                      commit_part=parts.save_partial, simulator=cfg.simulator,
                                      temperature=cfg.temperature, seed=cfg.seed,
                                      runners=runners)
            for m in given:
                parts.save_outputs(m, given[m])
            setup = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} "
                                "cores", "command": shlex.join(["alignuser", *sys.argv[1:]]),
                     "dataset": world.ds.name, "split": world.split.config.describe(),
                     "seed": cfg.seed, "checkpoints": {k: v for k, v in ckpts.items() if v},
                     "answers": run.outputs or "computed in this run" + (
                         f" on Ray actors ({run.address or 'a local cluster'})"
                         if run.backend == "ray" else ""),
                     "judge_model": run.judge_model or "local base model",
                     "skipped_methods": skipped or "none", "sections": ", ".join(sections)}
            score(world, bundle, outputs, cfg, out, setup, log=log, sections=sections,
                  parts=parts, make_judge=make_judge, started=started)
    except BaseException:
        if any(p.name.endswith(f"-{os.getpid()}") for p in
               final.parent.glob(f".{final.name}.incomplete-*")):
            console.print(f"[yellow]unfinished run kept; continue it with `alignuser evaluate "
                          f"--resume {final}`[/yellow]", highlight=False)
        raise
    console.print(f"report: {final / 'report.html'}")
    return 0
