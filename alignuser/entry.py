"""The `alignuser` executable: answers `--help` and `--version` without importing any command.

Building the full parser imports every command's config (pandas, LensKit, torch: seconds), so
a call that names no command is answered from the table below; any other call goes on to
``alignuser.cli.main``. ``tests/test_bad_inputs.py`` checks the table against the full parser.
"""

from __future__ import annotations

import argparse
import sys
import typing
from importlib import metadata

DESCRIPTION = """The `alignuser` command line; each subcommand maps its flags onto a pydantic
config.

Expected failures (bad flags, bad data, missing or unwritable files, a broken trace database)
end as one `error: ...` line on stderr with exit status 2; `--debug` shows the traceback instead.
"""
DEBUG_HELP = "on an error, show the full traceback instead of one line"
COMMANDS = {
    "data": "dataset information or download",
    "recommenders": "offline metrics of built-in or your own recommenders",
    "simulate": "run a population of agents on recommenders",
    "trace": "step through an agent's recorded graph run, or branch it into a new run",
    "report": "write an evaluation run's report again from its metrics.json and plots, "
              "recomputing nothing",
    "train": "world-model and counterfactual training (LoRA)",
    "evaluate": "fidelity to held-out humans and recommender selection",
}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A usage mistake is one ``error:`` line, like every other expected failure."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def version() -> str:
    try:
        return metadata.version("alignuser")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def top_parser() -> argparse.ArgumentParser:
    """The program's own options; the commands are added by the caller."""
    p = Parser(prog="alignuser", description=DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def command_table() -> argparse.ArgumentParser:
    """The top-level parser with each command named but none of its options."""
    p = top_parser()
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if all(arg.startswith("-") for arg in argv):  # no command: help, --version or a usage error
        command_table().parse_args(argv)
    from alignuser.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
