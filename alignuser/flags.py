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
            kw["metavar"] = "FRACTION" if _TYPES[name] is float else "UNIX_SECONDS"
        group.add_argument(flag, **kw)


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--dataset`` plus the split flags."""
    from alignuser.config import DataConfig

    parser.add_argument("--dataset", default=DataConfig.model_fields["dataset"].default,
                        help=f"{DATASET_HELP} (default: %(default)s)")
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


def preset_flags(parser: argparse.ArgumentParser, model: type, presets: dict[str, dict],
                 default_preset: str) -> None:
    """One flag per field of a preset-sized config (``EvalConfig``), help text from the field
    and the default shown per preset, so help and defaults have one source. Every flag defaults
    to None (the preset decides); lists are comma-separated, read back by ``preset_values``."""
    from typing import Literal, get_args, get_origin

    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if name == "preset":
            parser.add_argument(flag, choices=list(get_args(kind)), default=default_preset,
                                help=f"{field.description} (default: %(default)s)")
            continue
        shown = {p: sizes.get(name, field.default) for p, sizes in presets.items()}
        text = ", ".join(f"{p} {_flag_text(v)}" for p, v in shown.items())
        if len(set(map(_flag_text, shown.values()))) == 1:
            text = _flag_text(field.default)
        kw: dict = {"default": None, "help": f"{field.description}"
                    + (", comma-separated" if get_origin(kind) is list else "")
                    + f" (default: {text})"}
        if kind is int or kind is float:
            kw["type"] = kind
        elif get_origin(kind) is list:
            kw["metavar"] = "A,B"
        elif get_origin(kind) is Literal:
            kw["choices"] = list(get_args(kind))
        parser.add_argument(flag, **kw)


def _flag_text(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def preset_values(args: argparse.Namespace, model: type) -> dict:
    """The fields given on the command line (not None), lists split at commas."""
    from typing import get_args, get_origin

    from alignuser.checks import int_list

    out: dict = {}
    for name, field in model.model_fields.items():
        value = getattr(args, name, None)
        if name == "preset" or value is None:
            continue
        if get_origin(field.annotation) is list:
            flag = "--" + name.replace("_", "-")
            value = (int_list(flag, value) if get_args(field.annotation) == (int,)
                     else value.split(","))
        out[name] = value
    return out


def add_run_flags(parser: argparse.ArgumentParser, keeps: str) -> None:
    """``--output``, and ``--resume``/``--overwrite`` for a run that commits as it goes;
    ``keeps`` says what a resumed run keeps (e.g. "finished agents")."""
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="run directory (default runs/<id>/)")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", default=None, metavar="RUN",
                      help="continue the killed or failed run RUN (its --output path or run id) "
                      f"with the config it recorded, keeping its {keeps} (default: a new run)")
    runs.add_argument("--overwrite", action="store_true",
                      help="replace an existing run at --output once the new one completes "
                      "(default: an existing run is an error)")
