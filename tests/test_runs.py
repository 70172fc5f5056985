"""Run folders are never half-written: staged runs appear only when complete, a training folder
says in its manifest whether it finished and can be resumed, never mistaken for another run."""

from __future__ import annotations

import json
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
