"""`alignuser train` and `alignuser evaluate`: flags onto the training and evaluation configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from alignuser.config import DataConfig, World, world_for
from training.config import TrainConfig
from training.pipeline import TrainData

console = Console()


def train_data(world: World, cfg: TrainConfig) -> TrainData:
    """TRAIN trajectories for learning, a few VALID ones for early stopping; never TEST."""
    valid_users = world.sample_users(cfg.valid_examples, cfg.seed, part="valid")
    return TrainData(
        train=world.trajectories("train", cfg.recommender),
        valid=world.trajectories("valid", cfg.recommender, users=valid_users, progress=False),
        perceiver=world.perceiver, persona_at=world.persona_at, liked=world.liked_genres(),
        train_log=world.split.train,
        split_hashes={p: world.split.fingerprint(p) for p in ("train", "valid", "test")})


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="world-model and counterfactual training (LoRA)")
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            t.add_argument(flag, action="store_true", help=field.description)
        else:
            t.add_argument(flag, default=None, help=f"{field.description} "
                           f"(default: {field.default})")
    t.add_argument("--output", required=True, help="folder for the adapter and manifest")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from training.pipeline import run_training

    given = {k: v for k, v in vars(args).items()
             if k in TrainConfig.model_fields and v not in (None, False)}
    cfg = TrainConfig.model_validate(given)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue or another "
                              "--output")
    world = world_for(DataConfig(dataset=cfg.dataset))
    manifest = run_training(cfg, train_data(world, cfg), out, resume=args.resume)
    console.print(manifest["final_losses"])
    console.print(f"adapter written to {out}")
    return 0


METHODS = ("zero_shot", "sft", "wm_policy", "full", "full_no_memory", "full_no_wm")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.run import EvalConfig

    e = sub.add_parser("evaluate", help="fidelity to held-out humans and recommender selection")
    e.add_argument("--preset", choices=["quick", "full"], default="full",
                   help="quick: a few users, one ratio (smoke test); full: the README table")
    e.add_argument("--dataset", default="ml-100k")
    e.add_argument("--model", default="default", help="base causal LM")
    e.add_argument("--checkpoint", default=None,
                   help="full AlignUSER adapter (default: the shipped checkpoint)")
    e.add_argument("--sft-checkpoint", default=None, help="policy-only (SFT) adapter")
    e.add_argument("--wm-policy-checkpoint", default=None,
                   help="world model + policy adapter (trained with --lambda-cr 0)")
    e.add_argument("--methods", default=",".join(METHODS),
                   help=f"LLM methods to run, from {', '.join(METHODS)}; baselines always run")
    for name in ("users", "next_state", "sim_users", "seed"):
        e.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=EvalConfig.model_fields[name].description)
    e.add_argument("--ms", default=None, help=EvalConfig.model_fields["ms"].description
                   + " (comma-separated)")
    e.add_argument("--ab-results", default=None,
                   help=EvalConfig.model_fields["ab_results"].description)
    e.add_argument("--output", default=None, help="run directory (default runs/<id>/)")
    e.set_defaults(func=cmd_evaluate)


def _agents(args: argparse.Namespace, methods: list[str]) -> tuple[dict, str | None, dict]:
    from agents.llm import load_lm
    from agents.scorer import Scorer
    from alignuser.config import DEFAULT_CHECKPOINT
    from evaluation.micro import AgentVariant

    full_ckpt = args.checkpoint or (str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.exists()
                                    else None)
    paths = {"sft": args.sft_checkpoint, "wm_policy": args.wm_policy_checkpoint,
             "full": full_ckpt}
    for m in methods:
        key = "full" if m.startswith("full") else m
        if key in paths and paths[key] is None:
            raise ValueError(f"method {m} needs --{key.replace('_', '-')}-checkpoint"
                             if key != "full" else f"method {m} needs --checkpoint")
        if key in paths and not Path(paths[key]).exists():
            raise FileNotFoundError(f"checkpoint {paths[key]} does not exist")
    scorers: dict[str, Scorer] = {}

    def scorer(key: str) -> Scorer:
        if key not in scorers:
            scorers[key] = Scorer(load_lm(args.model, adapter=paths.get(key)))
        return scorers[key]

    spec = {"zero_shot": ("zero-shot", "base", True, False),
            "sft": ("SFT (policy only)", "sft", True, False),
            "wm_policy": ("world model + policy", "wm_policy", True, True),
            "full": ("AlignUSER", "full", True, True),
            "full_no_memory": ("AlignUSER w/o memory", "full", False, True),
            "full_no_wm": ("AlignUSER w/o world model", "full", True, False)}
    agents = {}
    for m in methods:
        label, key, memory, wm = spec[m]
        agents[label] = AgentVariant(label, scorer(key), memory=memory, world_model=wm)
    full = "AlignUSER" if "full" in methods else None
    return agents, full, {k: v for k, v in paths.items() if v}


def cmd_evaluate(args: argparse.Namespace) -> int:
    import os
    import platform
    import shlex
    import sys

    from evaluation.run import EvalConfig, evaluate
    from simulator.runs import new_run_dir, write_manifest

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    overrides = {k: getattr(args, k) for k in ("users", "next_state", "sim_users", "seed",
                                               "ab_results") if getattr(args, k) is not None}
    if args.ms:
        overrides["ms"] = [int(m) for m in args.ms.split(",")]
    cfg = EvalConfig.quick(**overrides) if args.preset == "quick" else EvalConfig(**overrides)
    world = world_for(DataConfig(dataset=args.dataset))
    if world.split.test.empty:
        raise ValueError(f"{args.dataset}: the test split is empty; nothing to evaluate on")
    agents, full, ckpts = _agents(args, methods)
    out = new_run_dir(args.output, "evaluate")
    write_manifest(out, "evaluate", cfg.model_dump(mode="json"), methods=methods,
                   checkpoints=ckpts, dataset=world.ds.name)
    setup = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} "
                        "cores, CPU only", "command": shlex.join(["alignuser", *sys.argv[1:]]),
             "dataset": world.ds.name, "split": "per-user chronological 70/10/20",
             "seed": cfg.seed, "checkpoint": ckpts.get("full")}
    evaluate(world, agents, full, cfg, out, setup, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    console.print(f"report: {out / 'report.html'}")
    return 0
