"""`alignuser train` and `alignuser evaluate`: flags onto the training and evaluation configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console

from alignuser.checks import check_adapter, int_list
from alignuser.config import World, world_for
from alignuser.entry import COMMANDS
from alignuser.flags import add_data_flags, add_split_flags, data_config
from training.config import TrainConfig, config_flags, parse_config
from training.pipeline import TrainData

console = Console()


def train_data(world: World, cfg: TrainConfig) -> TrainData:
    """TRAIN trajectories for learning; VALID trajectories and 1:1 lists for early stopping
    and calibration only; never TEST."""
    from evaluation.micro import lists_for

    n_valid = max(cfg.valid_examples, cfg.calibration_pages // 4, 1)
    valid_users = world.sample_users(n_valid, cfg.seed, part="valid")
    lists = lists_for(world, "valid", 1, None, cfg.seed)
    pick = np.random.default_rng(cfg.seed).permutation(len(lists))[:cfg.calibration_lists]
    return TrainData(
        train=world.trajectories("train", cfg.recommender),
        valid=world.trajectories("valid", cfg.recommender, users=valid_users, progress=False),
        perceiver=world.perceiver, persona_at=world.persona_at, liked=world.liked_genres(),
        train_log=world.split.train,
        split_hashes={"protocol": world.split.config.describe(),
                      **{p: world.split.fingerprint(p) for p in ("train", "valid", "test")}},
        personas=world.personas, histories=world.histories,
        valid_lists=[lists[int(i)] for i in sorted(pick)])


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
    from evaluation.outputs import METHODS
    from evaluation.run import PRESETS, EvalConfig

    e = sub.add_parser("evaluate", help=COMMANDS["evaluate"])
    e.add_argument("--preset", choices=list(PRESETS), default="standard",
                   help="quick: a smoke test; standard: every section and shipped method in "
                   "minutes on a CPU (default); full: 200 users, the README table (hours on a "
                   "CPU; its expected time is printed first)")
    add_data_flags(e)
    e.add_argument("--model", default="default", help="base causal LM")
    e.add_argument("--checkpoint", default=None,
                   help="full AlignUSER adapter (default: the shipped checkpoint)")
    e.add_argument("--sft-checkpoint", default=None, help="policy-only (SFT) adapter "
                   "(default: the shipped one)")
    e.add_argument("--wm-policy-checkpoint", default=None,
                   help="world model + policy adapter (default: the shipped one)")
    e.add_argument("--methods", default=",".join(METHODS),
                   help=f"LLM methods to run, from {', '.join(METHODS)}; baselines always run")
    ints = ("users", "next_action_users", "next_action_pages", "next_state", "sim_users",
            "judge_sessions", "n_boot", "seed")
    for name in ints:
        e.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=EvalConfig.model_fields[name].description)
    e.add_argument("--ms", default=None, help=EvalConfig.model_fields["ms"].description
                   + " (comma-separated)")
    e.add_argument("--recommenders", default=None, help="comma-separated "
                   + EvalConfig.model_fields["recommenders"].description)
    e.add_argument("--ab-results", default=None,
                   help=EvalConfig.model_fields["ab_results"].description)
    e.add_argument("--judge-model", default=None, metavar="SPEC",
                   help="a chat model as the human-likeness judge, PROVIDER:MODEL or "
                   "pkg.module:factory (as --chat-model); default: the local base model")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (CUDA when present), cpu or cuda")
    e.add_argument("--prepare-only", default=None, metavar="FILE",
                   help="write what the agents are shown to FILE and stop; answer it anywhere "
                   "with python -m evaluation.outputs FILE OUT")
    e.add_argument("--outputs", default=None, metavar="FILE",
                   help="the methods' answers computed elsewhere (python -m evaluation.outputs)")
    e.add_argument("--output", default=None, help="run directory (default runs/<id>/)")
    e.set_defaults(func=cmd_evaluate)


def checkpoints(args: argparse.Namespace, methods: list[str]) -> dict[str, str | None]:
    """Adapter folder per set of weights. A checkpoint named on the command line must exist;
    a shipped one that is absent leaves its methods out (``skipped_methods``)."""
    from alignuser.config import DEFAULT_CHECKPOINT, SHIPPED

    given = {"full": args.checkpoint, "sft": args.sft_checkpoint,
             "wm_policy": args.wm_policy_checkpoint}
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    import os
    import pickle
    import platform
    import shlex
    import sys

    from evaluation.outputs import METHODS, all_outputs
    from evaluation.run import EvalConfig, build_bundle, expected_seconds, score
    from simulator.runs import check_run_dir, run_path, staged_run_dir, write_manifest

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    overrides = {k: getattr(args, k) for k in (*EvalConfig.model_fields, "ab_results")
                 if k not in ("ms", "preset", "recommenders") and getattr(args, k, None)
                 is not None}
    if args.ms:
        overrides["ms"] = int_list("--ms", args.ms)
    for flag, path in (("--ab-results", args.ab_results), ("--outputs", args.outputs)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist"
                                    + (" (it is a folder)" if Path(path).is_dir() else ""))
    if not args.prepare_only:
        check_run_dir(args.output)
    if args.recommenders is not None:
        overrides["recommenders"] = args.recommenders.split(",")
    cfg = EvalConfig.of_preset(args.preset, **overrides)
    ckpts = checkpoints(args, methods) if not args.prepare_only else {}
    skipped = skipped_methods(methods, ckpts) if not args.prepare_only else {}
    for m, why in skipped.items():
        console.print(f"[yellow]skipping {m}: {why}[/yellow]")
    methods = [m for m in methods if m not in skipped]
    judge_chat = None
    if args.judge_model:  # built now, so a bad spec fails before any data loads
        from agents.chat import chat_model

        judge_chat = chat_model(args.judge_model)
    if not args.prepare_only and not args.outputs:
        minutes = expected_seconds(cfg, methods) / 60
        console.print(f"preset {cfg.preset}: {len(methods)} LLM method(s) on {cfg.users} users; "
                      f"expected about {minutes:.0f} min on a 2-core CPU (less on a GPU)")
    world = world_for(data_config(args, seed=cfg.seed))
    if world.split.test.empty:
        raise ValueError(f"{args.dataset}: the test split is empty; nothing to evaluate on")
    bundle = build_bundle(world, cfg)
    if args.prepare_only:
        Path(args.prepare_only).write_bytes(pickle.dumps(bundle))
        console.print(f"bundle for {len(bundle.meta['users'])} users -> {args.prepare_only}")
        return 0
    log = lambda m: console.print(f"[dim]{m}[/dim]")  # noqa: E731
    if args.outputs:
        outputs = pickle.loads(Path(args.outputs).read_bytes())
        outputs = {m: outputs[m] for m in methods if m in outputs}
    else:
        outputs = all_outputs(bundle, methods, ckpts, args.model, args.device, log)
    final = run_path(args.output, "evaluate")
    with staged_run_dir(final, "evaluate") as out:  # named only once complete
        write_manifest(out, "evaluate", cfg.model_dump(mode="json"), methods=methods,
                       checkpoints={k: v for k, v in ckpts.items() if v}, dataset=world.ds.name,
                       split=world.split.config.describe())
        setup = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} "
                            "cores", "command": shlex.join(["alignuser", *sys.argv[1:]]),
                 "dataset": world.ds.name, "split": world.split.config.describe(),
                 "seed": cfg.seed, "checkpoints": {k: v for k, v in ckpts.items() if v},
                 "answers": args.outputs or "computed in this run",
                 "judge_model": args.judge_model or "local base model",
                 "skipped_methods": skipped or "none"}
        judge = judge_chat
        if cfg.judge_sessions and "full" in outputs and judge is None:
            from agents.llm import load_lm
            from agents.scorer import Scorer

            judge = Scorer(load_lm(args.model, device=args.device))
        score(world, bundle, outputs, cfg, out, setup, judge, log)
    console.print(f"report: {final / 'report.html'}")
    return 0
