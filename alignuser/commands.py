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


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="fidelity to held-out humans and recommender selection")
    e.set_defaults(func=lambda a: 1)
