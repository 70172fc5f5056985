"""Run directories: every run writes one self-describing folder and nothing else."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "langgraph", "langchain-core", "chromadb",
            "lenskit", "pydantic", "pandas", "numpy")


def check_run_dir(output: str | Path | None, root: Path = Path("runs")) -> Path:
    """Refuse an ``--output`` that cannot become a new run directory, creating nothing.

    Called before data or models load, so a typo costs seconds, not a finished run: an existing
    file, a non-empty folder, a file on the way, or a folder this user cannot write to."""
    path = Path(output).expanduser() if output is not None else root
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--output {path} is an existing file, not a run directory")
    if output is not None and path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"run directory {path} is not empty; pass another --output")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--output {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--output {path}: no permission to write in {parent}")
    return path


def new_run_dir(output: str | Path | None, kind: str, root: Path = Path("runs")) -> Path:
    """``output`` if given, else ``runs/<kind>-<UTC time>``; refuses to reuse a non-empty one."""
    if output is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = root / f"{kind}-{stamp}"
        n = 1
        while path.exists():
            path = root / f"{kind}-{stamp}-{n}"
            n += 1
    else:
        path = Path(output).expanduser()
    check_run_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. read-only file system, which os.access cannot foresee
        raise OSError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
    return path


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_manifest(run_dir: Path, kind: str, config: dict[str, Any], **extra: Any) -> Path:
    manifest = {"kind": kind, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": config, "git_commit": git_commit(), "python": platform.python_version(),
                "machine": f"{platform.machine()}, {_cpus()} cores", "packages": versions(),
                **extra}
    path = run_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def update_manifest(run_dir: Path, **fields: Any) -> None:
    path = run_dir / "manifest.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    path.write_text(json.dumps(data, indent=2, default=str))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
