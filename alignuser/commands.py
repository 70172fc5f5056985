"""`alignuser train` and `alignuser evaluate`: flags onto the training and evaluation configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console

from alignuser.config import DataConfig, World, world_for
from training.config import TrainConfig, config_flags, parse_config
from training.pipeline import TrainData

console = Console()


def data_config(dataset: str, seed: int) -> DataConfig:
    """The data side of a command; ``--seed`` also seeds the trajectory construction."""
    from simulator.trajectories import TrajectoryConfig

    return DataConfig(dataset=dataset, trajectories=TrajectoryConfig(seed=seed))


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
        split_hashes={p: world.split.fingerprint(p) for p in ("train", "valid", "test")},
        personas=world.personas, histories=world.histories,
        valid_lists=[lists[int(i)] for i in sorted(pick)])


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="world-model and counterfactual training (LoRA)")
    config_flags(t, TrainConfig)
    t.add_argument("--output", required=True, help="folder for the adapter and manifest")
    t.add_argument("--prepare-only", default=None, metavar="FILE",
                   help="render the transitions into FILE (pickle) and stop; fit it anywhere "
                   "with python -m training.fit_prepared FILE OUT")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from training.pipeline import run_training

    cfg = parse_config(TrainConfig, args)
    if args.prepare_only:
        import pickle

        from training.pipeline import prepare

        world = world_for(data_config(cfg.dataset, cfg.seed))
        prep = prepare(cfg, train_data(world, cfg))
        Path(args.prepare_only).write_bytes(pickle.dumps(prep))
        console.print(f"{len(prep.train)} train, {len(prep.cr)} counterfactual, "
                      f"{len(prep.calib)} calibration transitions -> {args.prepare_only}")
        return 0
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue or another "
                              "--output")
    world = world_for(data_config(cfg.dataset, cfg.seed))
    manifest = run_training(cfg, train_data(world, cfg), out, resume=args.resume)
    console.print(manifest["final_losses"])
    console.print(f"adapter written to {out}")
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.outputs import METHODS
    from evaluation.run import EvalConfig

    e = sub.add_parser("evaluate", help="fidelity to held-out humans and recommender selection")
    e.add_argument("--preset", choices=["quick", "full"], default="full",
                   help="quick: a few users (smoke test); full: the README table")
    e.add_argument("--dataset", default="ml-100k")
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
    e.add_argument("--ab-results", default=None,
                   help=EvalConfig.model_fields["ab_results"].description)
    e.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
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
    for path in given.values():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
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
    from evaluation.run import EvalConfig, build_bundle, score
    from simulator.runs import new_run_dir, write_manifest

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    overrides = {k: getattr(args, k) for k in (*EvalConfig.model_fields, "ab_results")
                 if k not in ("ms", "preset", "recommenders") and getattr(args, k, None)
                 is not None}
    if args.ms:
        overrides["ms"] = [int(m) for m in args.ms.split(",")]
    cfg = EvalConfig.quick(**overrides) if args.preset == "quick" else EvalConfig(**overrides)
    ckpts = checkpoints(args, methods) if not args.prepare_only else {}
    skipped = skipped_methods(methods, ckpts) if not args.prepare_only else {}
    for m, why in skipped.items():
        console.print(f"[yellow]skipping {m}: {why}[/yellow]")
    methods = [m for m in methods if m not in skipped]
    world = world_for(data_config(args.dataset, cfg.seed))
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
    out = new_run_dir(args.output, "evaluate")
    write_manifest(out, "evaluate", cfg.model_dump(mode="json"), methods=methods,
                   checkpoints={k: v for k, v in ckpts.items() if v}, dataset=world.ds.name)
    setup = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} "
                        "cores", "command": shlex.join(["alignuser", *sys.argv[1:]]),
             "dataset": world.ds.name, "split": "per-user chronological 70/10/20",
             "seed": cfg.seed, "checkpoints": {k: v for k, v in ckpts.items() if v},
             "answers": args.outputs or "computed in this run",
             "skipped_methods": skipped or "none"}
    judge = None
    if cfg.judge_sessions and "full" in outputs:
        from agents.llm import load_lm
        from agents.scorer import Scorer

        judge = Scorer(load_lm(args.model, device=args.device))
    score(world, bundle, outputs, cfg, out, setup, judge, log)
    console.print(f"report: {out / 'report.html'}")
    return 0
