"""A killed `alignuser simulate` resumes to the run an uninterrupted one writes; sessions are
typed records whose JSON form is the one ``sessions.jsonl`` has always had."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignuser import cli
from simulator.data import Dataset
from simulator.sessions import PageRecord, SessionLog, SessionRecord
from tests.test_cli_errors import write_folder

ALIGNUSER = str(Path(sys.executable).with_name("alignuser"))
RUN = ["simulate", "--policy", "popularity", "--agents", "6", "--pages", "3",
       "--recommenders", "pop,itemknn"]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([ALIGNUSER, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _committed(parent: Path, name: str) -> int:
    """Sessions committed so far by the staged run of ``name``."""
    files = list(parent.glob(f".{name}.incomplete-*/sessions.partial.jsonl"))
    return files[0].read_bytes().count(b"\n") if files else 0


def _metrics(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("wall_seconds")
    return metrics


def _checkpoints(run: Path) -> dict[str, int]:
    with sqlite3.connect(run / "traces.sqlite") as conn:
        rows = conn.execute("SELECT thread_id, count(*) FROM checkpoints GROUP BY thread_id")
        return dict(rows.fetchall())


def test_a_killed_run_resumes_to_the_uninterrupted_one(tmp_path: Path) -> None:
    reference = _start([*RUN, "--output", "ref"], tmp_path)  # runs beside the one to kill
    killed = _start([*RUN, "--output", "X"], tmp_path)
    deadline = time.monotonic() + 120
    while _committed(tmp_path, "X") < 1:
        assert killed.poll() is None, f"finished before it could be killed: {killed.stderr.read()}"
        assert time.monotonic() < deadline, "no session committed within 120 s"
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    done_before = _committed(tmp_path, "X")
    assert 1 <= done_before < 12 and not (tmp_path / "X").exists()

    resumed = subprocess.run([ALIGNUSER, *RUN, "--resume", "X"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming X: {done_before} of 12 sessions already done" in resumed.stdout
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    ref, run = tmp_path / "ref", tmp_path / "X"
    assert (run / "sessions.jsonl").read_bytes() == (ref / "sessions.jsonl").read_bytes()
    assert _metrics(run) == _metrics(ref)
    # the agent cut short was re-run from a clean thread: no checkpoint twice
    assert _checkpoints(run) == _checkpoints(ref) and len(_checkpoints(run)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "ref"]
    assert not (run / "sessions.partial.jsonl").exists()


def _staged(tmp_path: Path, config: dict) -> Path:
    """A killed run's staged folder: its manifest and no committed session."""
    staged = tmp_path / ".X.incomplete-999999999"
    staged.mkdir()
    (staged / "manifest.json").write_text(json.dumps({"kind": "simulate", "config": config}))
    return staged


def test_resume_refuses_flags_that_contradict_the_run(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recorded = cli.simulate_config(cli.build_parser().parse_args(RUN))
    _staged(tmp_path, recorded.model_dump(mode="json"))
    for extra, named in ((["--agents", "7"], "--agents (7 vs recorded 6)"),
                         (["--no-memory"], "--no-memory (none vs recorded chroma)")):
        assert cli.main([*RUN, *extra, "--resume", "X"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    assert cli.main(["simulate", "--resume", "nothing"]) == 2
    assert "no unfinished simulate run" in capsys.readouterr().err


def test_an_existing_run_needs_overwrite_and_is_replaced_only_when_complete(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "X"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    assert cli.main([*RUN, "--output", "X"]) == 2
    assert "or --overwrite to replace the run" in capsys.readouterr().err
    _staged(tmp_path, {})
    (old / "manifest.json").unlink()
    old.rmdir()
    assert cli.main([*RUN, "--output", "X"]) == 2  # an unfinished run is pointed at --resume
    assert "pass --resume X" in capsys.readouterr().err


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path: Path) -> None:
    log = SessionLog(tmp_path / "sessions.partial.jsonl")
    first = SessionRecord(thread="pop:1", user=1, recommender="pop", end="exit",
                          pages=[PageRecord(page=1, items=[3, 4], watched={4: 5}, then="exit")])
    log.commit(first)
    with log.path.open("a") as fh:
        fh.write(first.line()[:30])  # the kill came mid-write
    assert log.has_commits()
    assert log.read() == {"pop:1": first}
    assert log.path.read_text() == first.line() + "\n"


def test_a_record_keeps_int_items_and_the_json_form_string_keys() -> None:
    page = PageRecord.model_validate({"page": 1, "items": [7, 9], "watched": {"9": 4},
                                      "then": "next", "watch_scores": {"1": -0.5}})
    assert page.watched == {9: 4} and page.watch_scores == {1: -0.5}
    session = SessionRecord(thread="pop:2", user=2, recommender="pop", pages=[page])
    line = json.loads(session.line())
    assert list(line) == ["thread", "user", "recommender", "pages", "end", "satisfaction",
                          "interview"]
    assert line["pages"][0]["watched"] == {"9": 4}
    assert SessionRecord.model_validate_json(session.line()) == session


def test_overwrite_replaces_a_run_only_once_the_new_one_completes(
        tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["simulate", "--dataset", str(write_folder(tiny_dataset, tmp_path / "tiny")),
            "--policy", "random", "--agents", "3", "--pages", "2", "--recommenders", "pop",
            "--no-memory", "--output", str(tmp_path / "X")]
    assert cli.main([*args, "--seed", "1"]) == 0
    first = (tmp_path / "X" / "sessions.jsonl").read_text()

    def broken(*a: object, **k: object) -> None:
        raise ValueError("the new run failed")

    with monkeypatch.context() as m:
        m.setattr("alignuser.simulate.session_metrics", broken)
        assert cli.main([*args, "--seed", "2", "--overwrite"]) == 2
    assert (tmp_path / "X" / "sessions.jsonl").read_text() == first  # the old run stands
    assert cli.main([*args, "--seed", "2", "--overwrite"]) == 0
    second = (tmp_path / "X" / "sessions.jsonl").read_text()
    assert second != first and len(second.splitlines()) == 3
    assert json.loads((tmp_path / "X" / "manifest.json").read_text())["config"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "tiny"]
