"""Run directories: every run writes one self-describing folder and nothing else."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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


def run_path(output: str | Path | None, kind: str, root: Path = Path("runs")) -> Path:
    """``output`` if given, else a fresh ``runs/<kind>-<UTC time>``; creates nothing."""
    if output is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = root / f"{kind}-{stamp}"
        n = 1
        while path.exists():
            path = root / f"{kind}-{stamp}-{n}"
            n += 1
    else:
        path = Path(output).expanduser()
    return check_run_dir(path)


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``path`` so that a reader (or a resumed run after a kill) sees the old file or the
    whole new one, never half of it: a temporary sibling renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_pickle(path: str | Path) -> Any:
    """A pickle written by a --prepare-only step (training transitions, an evaluation bundle),
    plain or gzip-compressed (``.gz``)."""
    import gzip
    import pickle

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return pickle.load(fh)


def staging_dirs(final: Path) -> list[Path]:
    """The unfinished staging siblings ``.<name>.incomplete-<pid>`` of run folder ``final``,
    newest first."""
    final = Path(final).expanduser()
    if not final.parent.is_dir():
        return []
    found = [p for p in final.parent.glob(f".{final.name}.incomplete-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def resume_target(run: str | Path, kind: str, root: Path = Path("runs")) -> Path:
    """The final path of the unfinished run ``run`` (its path, or its id under ``root``), for
    ``--resume``; one clear error when it is finished, running or absent."""
    given = Path(run).expanduser()
    candidates = [given] if given.is_absolute() or given.parent != Path(".") else [given,
                                                                                  root / given]
    for final in candidates:
        if staging_dirs(final):
            if final.exists() and (not final.is_dir() or any(final.iterdir())):
                raise FileExistsError(f"--resume {run}: {final} is already a complete run; "
                                      "nothing to resume (pass --overwrite to run it again)")
            return final
    done = next((c for c in candidates if c.is_dir() and any(c.iterdir())), None)
    if done is not None:
        raise FileExistsError(f"--resume {run}: {done} is already a complete {kind} run; "
                              "nothing to resume")
    looked = " or ".join(str(c.parent / f".{c.name}.incomplete-*") for c in candidates)
    raise FileNotFoundError(f"--resume {run}: no unfinished {kind} run of that name (no "
                            f"{looked}); nothing to resume")


def _claim(final: Path) -> Path:
    """Take over the newest staging sibling of ``final``, renamed to this process's pid so a
    second ``--resume`` sees it as running."""
    tmp = final.parent / f".{final.name}.incomplete-{os.getpid()}"
    for old in staging_dirs(final):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            raise FileExistsError(f"--resume {final}: still being written by process {pid} "
                                  f"({old})")
        if old != tmp:
            try:
                old.rename(tmp)
            except OSError as exc:
                raise OSError(f"--resume {final}: cannot take over {old} "
                              f"({exc.strerror or exc})") from None
        return tmp
    raise FileNotFoundError(f"--resume {final}: no unfinished run to resume")


def discard_unfinished(final: Path) -> None:
    """For ``--overwrite``: the unfinished runs of ``final`` go, unless a live process still
    writes one (refused)."""
    for old in staging_dirs(final):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            raise FileExistsError(f"--overwrite {final}: process {pid} is still writing {old}")
        shutil.rmtree(old, ignore_errors=True)


def check_unfinished(output: str | Path | None, kind: str) -> None:
    """A new run may not start where an unfinished one waits to be resumed."""
    if output is not None and staging_dirs(Path(output)):
        raise FileExistsError(f"{output} has an unfinished {kind} run "
                              f"({staging_dirs(Path(output))[0].name}); pass --resume {output} "
                              "to continue it, or --overwrite to start again")


def check_replaceable(final: Path) -> None:
    """``--overwrite`` replaces a run folder only: one with a manifest, never any folder."""
    if final.exists() and not (final.is_dir() and (final / "manifest.json").is_file()):
        raise FileExistsError(f"--overwrite {final}: not a run folder (no manifest.json); "
                              "refusing to replace it")


@contextmanager
def staged_run_dir(output: str | Path | None, kind: str, root: Path = Path("runs"), *,
                   resume: bool = False, overwrite: bool = False,
                   keep_if: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A run directory that appears under its name only once complete.

    The run writes into a hidden sibling ``.<name>.incomplete-<pid>`` that is renamed into place
    when the block ends; if the block fails (or is interrupted) the sibling is removed, so a
    failed run neither blocks the same ``--output`` nor passes for a finished one. Unless
    ``keep_if(sibling)`` says it holds work worth resuming: then it stays for ``resume=True``,
    which continues in the newest such sibling (a killed run leaves its sibling anyway).
    ``overwrite=True`` lets an existing run ``output`` be replaced, only once the new one is
    complete."""
    if resume:
        final = resume_target(output, kind, root) if output is not None else None
        if final is None:
            raise ValueError("--resume needs the run to continue")
        tmp, made = _claim(final), []
    else:
        final = Path(output).expanduser() if overwrite and output is not None else None
        if final is not None and final.exists():
            check_replaceable(final)
        else:
            final = run_path(output, kind, root)
        tmp = final.parent / f".{final.name}.incomplete-{os.getpid()}"
        made = [p for p in (tmp, *tmp.parents) if not p.exists()]  # removed again on failure
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:  # e.g. read-only file system, which os.access cannot foresee
            raise OSError(f"cannot create run directory {final}: {exc.strerror or exc}") from None
    try:
        yield tmp
        if overwrite and final.exists():
            check_replaceable(final)
            old = final.parent / f".{final.name}.replaced-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            check_run_dir(final)  # something else may have taken the name meanwhile
            tmp.rename(final)
    except BaseException:
        if keep_if is not None and tmp.is_dir() and keep_if(tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made[1:]:
            with suppress(OSError):  # only if still empty
                folder.rmdir()
        raise


def check_train_dir(output: str | Path, resume: bool) -> Path:
    """Refuse a training ``--output`` before data or a model loads.

    Without ``--resume`` it must be a new or empty folder; with it, a training folder (one whose
    manifest is a training run's, complete or not), never another command's run."""
    path = Path(output).expanduser()
    if not resume:
        if path.is_dir() and _manifest(path).get("status") == "incomplete":
            raise FileExistsError(f"{path} holds an unfinished training run; pass --resume to "
                                  "continue it, or another --output")
        if path.is_dir() and any(path.iterdir()):
            raise FileExistsError(f"{path} is not empty; pass --resume to continue a training "
                                  "run there, or another --output")
        return check_run_dir(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: {path} is not a training folder (it does not exist"
                                f"{'' if not path.exists() else ' as a folder'}); drop --resume "
                                "to start a new run")
    kind = _manifest(path).get("kind", "train")
    if kind != "train" or (path / "traces.sqlite").exists():
        raise FileExistsError(f"--resume: {path} is a {kind if kind != 'train' else 'simulate'} "
                              "run, not a training folder; pass the folder a training run "
                              "wrote")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"--output {path}: no permission to write in it")
    return path


@contextmanager
def training_dir(path: Path, config: dict[str, Any]) -> Iterator[Path]:
    """A training folder is its own resume point, so it cannot be staged elsewhere: its manifest
    says ``"status": "incomplete"`` until the final one (``"complete"``) replaces it. A run that
    fails before saving any stage checkpoint leaves nothing to resume, and a folder it created
    is removed so the same ``--output`` can be used again."""
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    if (path / "manifest.json").exists():
        update_manifest(path, kind="train", status="incomplete")
    else:
        write_manifest(path, "train", config, status="incomplete")
    try:
        yield path
    except BaseException:
        if created and not any(path.glob("stage_*")):
            shutil.rmtree(path, ignore_errors=True)
        raise


def _manifest(path: Path) -> dict[str, Any]:
    """A run folder's manifest, or {} when it has none; a broken one is an error."""
    file = path / "manifest.json"
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


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
    write_atomic(path, json.dumps(manifest, indent=2, default=str))
    return path


def update_manifest(run_dir: Path, **fields: Any) -> None:
    path = run_dir / "manifest.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    write_atomic(path, json.dumps(data, indent=2, default=str))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
