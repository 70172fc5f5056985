"""Run directories: every run writes one self-describing folder and nothing else."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "langgraph", "langchain-core", "chromadb",
            "lenskit", "pydantic", "pandas", "numpy")


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
        path = Path(output)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"run directory {path} is not empty; pass another --output")
    path.mkdir(parents=True, exist_ok=True)
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
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
