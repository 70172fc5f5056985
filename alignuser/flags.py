"""The data flags every command that loads data shares: dataset and the evaluation protocol.

Generated from ``DataConfig``/``SplitConfig`` so the help text and defaults have one source, and
kept free of heavy imports so ``alignuser --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignuser.config import DataConfig
    from simulator.split import SplitConfig

DATASET_HELP = ("ml-100k (bundled), ml-1m / ml-latest-small (after `alignuser data fetch`), a "
                "RecBole atomic folder or a .zip")
# SplitConfig field -> flag; ``kind`` reads as ``--split`` on the command line.
SPLIT_FLAGS = {"kind": "--split", "valid_frac": "--valid-frac", "test_frac": "--test-frac",
               "valid_time": "--valid-time", "test_time": "--test-time"}
_TYPES = {"valid_frac": float, "test_frac": float, "valid_time": int, "test_time": int}


def add_split_flags(parser: argparse.ArgumentParser) -> None:
    """``--split user_chrono|global_time`` and its cut-off options."""
    from simulator.split import SplitConfig

    fields = SplitConfig.model_fields
    group = parser.add_argument_group("evaluation protocol (how held-out data is cut)")
    for name, flag in SPLIT_FLAGS.items():
        field = fields[name]
        kw: dict = {"default": None, "dest": f"split_{name}",
                    "help": f"{field.description} (default: {field.default})"}
        if name == "kind":
            kw["choices"] = ["user_chrono", "global_time"]
        else:
            kw["type"] = _TYPES[name]
        group.add_argument(flag, **kw)


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--dataset`` plus the split flags."""
    parser.add_argument("--dataset", default="ml-100k", help=f"{DATASET_HELP} "
                        "(default: %(default)s)")
    add_split_flags(parser)


def split_config(args: argparse.Namespace) -> SplitConfig:
    """The split the flags ask for; pydantic checks the combination (e.g. fractions sum < 1)."""
    from simulator.split import SplitConfig

    given = {name: getattr(args, f"split_{name}", None) for name in SPLIT_FLAGS}
    return SplitConfig(**{k: v for k, v in given.items() if v is not None})


def data_config(args: argparse.Namespace, dataset: str | None = None,
                seed: int = 0) -> DataConfig:
    """The data side of a command from its flags; ``seed`` also seeds the trajectory
    construction, so ``--seed`` reaches every random choice."""
    from alignuser.config import DataConfig
    from simulator.trajectories import TrajectoryConfig

    return DataConfig(dataset=dataset or args.dataset, split=split_config(args),
                      trajectories=TrajectoryConfig(seed=seed))
