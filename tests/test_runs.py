"""Run folders are never half-written: staged runs appear only when complete, a training folder
says in its manifest whether it finished and can be resumed, never mistaken for another run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from simulator.runs import check_train_dir, staged_run_dir, training_dir, write_manifest


def test_a_staged_run_appears_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "runs" / "sim"
    with staged_run_dir(final, "simulate") as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".sim.incomplete-")
        (tmp / "sessions.jsonl").write_text("{}\n")
        assert not final.exists()
    assert (final / "sessions.jsonl").read_text() == "{}\n"
    assert [p.name for p in final.parent.iterdir()] == ["sim"]


@pytest.mark.parametrize("exc", [ValueError("bad checkpoint"), KeyboardInterrupt()])
def test_a_failed_staged_run_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    final = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(type(exc)), staged_run_dir(final, "evaluate") as tmp:
        (tmp / "half.json").write_text("{")
        raise exc
    assert list(tmp_path.iterdir()) == []  # the folders it made on the way are gone too
    with staged_run_dir(final, "evaluate") as tmp:  # so the same output works next time
        (tmp / "done").write_text("")
    assert (final / "done").exists()


def test_a_default_run_name_is_fresh(tmp_path: Path) -> None:
    with staged_run_dir(None, "trace", root=tmp_path) as tmp:
        pass
    with staged_run_dir(None, "trace", root=tmp_path) as tmp2:
        pass
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(n.startswith("trace-") for n in names)
    assert tmp != tmp2


CFG = {"stage": "wm"}


def test_training_that_fails_before_a_checkpoint_leaves_nothing(tmp_path: Path) -> None:
    out = check_train_dir(tmp_path / "adapter", resume=False)
    with pytest.raises(RuntimeError), training_dir(out, CFG):
        assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"
        raise RuntimeError("model failed to load")
    assert not out.exists()


def test_unfinished_training_is_marked_and_resumable(tmp_path: Path) -> None:
    out = check_train_dir(tmp_path / "adapter", resume=False)
    with pytest.raises(RuntimeError), training_dir(out, CFG):
        (out / "stage_wm").mkdir()  # a resumable checkpoint was saved
        raise RuntimeError("interrupted")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "train" and manifest["status"] == "incomplete"
    with pytest.raises(FileExistsError, match="unfinished training run; pass --resume"):
        check_train_dir(out, resume=False)
    assert check_train_dir(out, resume=True) == out
    with training_dir(out, CFG):  # the pipeline's final manifest replaces the marker
        (out / "manifest.json").write_text(json.dumps({"kind": "train", "status": "complete"}))
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert (out / "stage_wm").is_dir()


def test_resume_refuses_what_is_not_a_training_folder(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    sim.mkdir()
    write_manifest(sim, "simulate", {"agents": 2})
    before = (sim / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="is a simulate run, not a training folder"):
        check_train_dir(sim, resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_train_dir(tmp_path / "nope", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a training folder"):
        check_train_dir(tmp_path / "file", resume=True)
    assert (sim / "manifest.json").read_bytes() == before


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_killed_run_resumes_in_its_staging_folder(tmp_path: Path) -> None:
    """A kill leaves ``.<name>.incomplete-<pid>``; ``resume=True`` continues in it (renamed to
    this process) and publishes the run under its name with what the first try wrote."""
    final = tmp_path / "run"
    killed = tmp_path / f".run.incomplete-{_dead_pid()}"
    (killed / "parts").mkdir(parents=True)
    (killed / "parts" / "first.json").write_text("1")
    with staged_run_dir(final, "evaluate", resume=True) as tmp:
        assert tmp.name == f".run.incomplete-{os.getpid()}" and not killed.exists()
        assert (tmp / "parts" / "first.json").read_text() == "1"
        (tmp / "second.json").write_text("2")
    assert sorted(p.name for p in final.rglob("*.json")) == ["first.json", "second.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(FileExistsError, match="already a complete evaluate run"):
        staged_run_dir(final, "evaluate", resume=True).__enter__()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        staged_run_dir(tmp_path / "other", "evaluate", resume=True).__enter__()


def test_a_staging_folder_of_a_live_process_is_not_taken(tmp_path: Path) -> None:
    (tmp_path / f".run.incomplete-{os.getppid()}").mkdir()
    with pytest.raises(FileExistsError, match=f"still being written by process {os.getppid()}"):
        staged_run_dir(tmp_path / "run", "evaluate", resume=True).__enter__()


@pytest.mark.parametrize("worth", [True, False])
def test_a_failed_run_keeps_its_staging_folder_only_when_worth_resuming(
        tmp_path: Path, worth: bool) -> None:
    final = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), staged_run_dir(
            final, "evaluate", keep_if=lambda d: (d / "part").exists()) as tmp:
        if worth:
            (tmp / "part").write_text("")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ([tmp.name] if worth else [])
    assert not final.exists()


def test_overwrite_replaces_a_run_only_once_the_new_one_is_complete(tmp_path: Path) -> None:
    final = tmp_path / "run"
    final.mkdir()
    write_manifest(final, "evaluate", {"n": 1})
    with pytest.raises(ValueError), staged_run_dir(final, "evaluate", overwrite=True):
        raise ValueError("failed half-way")
    assert json.loads((final / "manifest.json").read_text())["config"] == {"n": 1}
    with staged_run_dir(final, "evaluate", overwrite=True) as tmp:
        write_manifest(tmp, "evaluate", {"n": 2})
        assert json.loads((final / "manifest.json").read_text())["config"] == {"n": 1}
    assert json.loads((final / "manifest.json").read_text())["config"] == {"n": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(FileExistsError, match="not a run folder"):
        staged_run_dir(tmp_path, "evaluate", overwrite=True).__enter__()
