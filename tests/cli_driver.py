"""Run many `alignuser` command lines, each in a process of its own, paying the imports once.

Reads ``{"cwd": DIR, "logs": DIR, "cases": {id: argv}}`` as JSON on stdin, imports the CLI
(and, by building its parser, every command's config), then forks once per case: the child
runs ``alignuser.entry.main(argv)`` with stdout and stderr sent to files and exits with its
status, an uncaught exception printing its traceback as the executable would. Prints
``{id: {"status", "stdout", "stderr"}}`` as JSON. Used by ``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def run_case(argv: list[str], cwd: str, out: Path, err: Path) -> int:
    """Fork, run one command line in the child, return its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.chdir(cwd)
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            from alignuser.entry import main

            status = main(argv)
        except SystemExit as exc:  # argparse's usage errors and --help
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wait = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait)


def main() -> None:
    job = json.load(sys.stdin)
    from alignuser.cli import build_parser

    build_parser()  # imports every command's config before the first fork
    logs = Path(job["logs"])
    done = {}
    for cid, argv in job["cases"].items():
        out, err = logs / f"{cid}.out", logs / f"{cid}.err"
        status = run_case(argv, job["cwd"], out, err)
        done[cid] = {"status": status, "stdout": out.read_text(), "stderr": err.read_text()}
    print(json.dumps(done))


if __name__ == "__main__":
    main()
