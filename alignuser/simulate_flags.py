"""`alignuser simulate`'s flags, generated from ``SimulateConfig``: one source for each option's
help, default, choices and bounds.

Every generated flag defaults to None, so a flag that was given can be told from one left out
(``--resume`` refuses a given flag that contradicts the run's recorded config); the help shows the
config's default. Three booleans read inverted on the command line and are named here.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from annotated_types import Ge, Gt
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from alignuser.config import DataConfig, SimulateConfig
from alignuser.flags import add_data_flags, add_run_flags, data_config

# field -> (flag, value it sets, help): the ablation and static switches turn a default off.
INVERTED = {"memory": ("--no-memory", "none", "recall node off (ablation)"),
            "world_model": ("--no-world-model", "off", "predict node off (ablation)"),
            "reactive": ("--static", False, "recommenders ignore the session")}
METAVARS = {"chat_model": "SPEC", "address": "ADDR", "checkpoint": "DIR", "model": "NAME",
            "sft_checkpoint": "DIR", "wm_policy_checkpoint": "DIR", "judge_model": "SPEC",
            "sections": "A,B", "prepare_only": "FILE", "outputs": "FILE"}
SKIPPED = {"data"}  # --dataset and the split flags come from ``alignuser.flags``


def _base(annotation: Any) -> Any:
    """``int | None`` -> int; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _bounds(field: FieldInfo) -> str:
    for meta in field.metadata:
        if isinstance(meta, Ge):
            return f"at least {meta.ge}"
        if isinstance(meta, Gt):
            return f"more than {meta.gt}"
    return ""


def _help(field: FieldInfo, shown_default: Any) -> str:
    """Description, bounds and default; a description that explains its default keeps it."""
    default = ",".join(shown_default) if isinstance(shown_default, list) else shown_default
    text = field.description or ""
    notes = [_bounds(field)] + ([] if "default" in text.lower() else [f"default: {default}"])
    notes = [n for n in notes if n]
    return (f"{text} ({'; '.join(notes)})" if notes else text).replace("%", "%%")


def add_simulate_flags(parser: argparse.ArgumentParser) -> None:
    """The data flags, one flag per ``SimulateConfig`` field, and the run-folder flags."""
    add_data_flags(parser)
    add_model_flags(parser, SimulateConfig, INVERTED)
    add_run_flags(parser, "finished agents (unfinished ones run again)")


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
                    inverted: Mapping[str, tuple[str, Any, str]] | None = None) -> None:
    """One flag per field of ``model`` (but ``data``), each defaulting to None so a given flag
    can be told from one left out; ``inverted`` names the switches that turn a default off."""
    inverted = inverted or {}
    for name, field in model.model_fields.items():
        if name in SKIPPED:
            continue
        if name in inverted:
            flag, value, text = inverted[name]
            parser.add_argument(flag, dest=name, action="store_const", const=value,
                                default=None, help=f"{text} (default: off)")
            continue
        flag = "--" + name.replace("_", "-")
        kind = _base(field.annotation)
        default = field.get_default(call_default_factory=True)
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_const", const=True, default=None,
                                help=f"{field.description} (default: off)")
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, dest=name, default=None, help=_help(field, default),
                                choices=[str(c) for c in typing.get_args(kind)])
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=name, default=None, type=lambda s: s.split(","),
                                metavar="A,B,...", help=_help(field, default))
        else:
            parser.add_argument(flag, dest=name, default=None, type=kind,
                                metavar=METAVARS.get(name), help=_help(field, default))


def given_fields(args: argparse.Namespace,
                 model: type[BaseModel] = SimulateConfig) -> dict[str, Any]:
    """The ``model`` fields the command line set (``data``, where ``model`` has it, only when a
    data flag was)."""
    given = {name: getattr(args, name) for name in model.model_fields
             if name not in SKIPPED and getattr(args, name, None) is not None}
    if "data" not in model.model_fields:
        return given
    data_flags = [k for k, v in vars(args).items() if k.startswith("split_") and v is not None]
    if args.dataset != DataConfig.model_fields["dataset"].default or data_flags:
        given["data"] = data_config(args)
    return given


def simulate_config(args: argparse.Namespace) -> SimulateConfig:
    """The config the flags ask for; pydantic checks bounds and combinations."""
    return SimulateConfig(**{"data": data_config(args), **given_fields(args)})


def resumed_config(args: argparse.Namespace, recorded: dict[str, Any]) -> SimulateConfig:
    """The run's recorded config; a given flag that says otherwise is refused in one line."""
    cfg = SimulateConfig.model_validate(recorded)
    given = SimulateConfig(**{**dict(cfg), **given_fields(args)})
    differ = [name for name in given_fields(args) if getattr(given, name) != getattr(cfg, name)]
    if differ:
        flags = ", ".join(_flag(name, getattr(given, name), getattr(cfg, name))
                          for name in differ)
        raise ValueError(f"--resume continues {args.resume} with the config it recorded; "
                         f"drop the flags that differ: {flags}")
    return cfg


def _flag(name: str, given: Any, recorded: Any) -> str:
    if name == "data":
        return f"--dataset/--split ({given.dataset} vs {recorded.dataset})"
    flag = INVERTED[name][0] if name in INVERTED else "--" + name.replace("_", "-")
    return f"{flag} ({given} vs recorded {recorded})"
