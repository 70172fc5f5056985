"""Bad flags, files and data end as one `error:` line and exit status 2; `--debug` re-raises.

Every test runs the CLI's ``main`` in process on the tiny hand-made dataset (or none at all):
flags are refused before any data loads, so no model or ml-100k is ever read here.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from langgraph.errors import GraphRecursionError
from pydantic import ValidationError

from agents.policy import FixedPolicy
from alignuser import cli
from graph.graph import build_graph
from graph.runner import recursion_limit, run_agent, run_config, thread_id
from graph.runtime import Runtime
from graph.world import World
from memory.store import NoMemory
from simulator.data import DataError, Dataset, Item, User, validate
from simulator.policies import RandomPolicy
from simulator.split import make_split

INTER_HEAD = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEAD = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"


def write_folder(ds: Dataset, folder: Path) -> Path:
    """``ds`` as RecBole atomic files, the shape ``--dataset <folder>`` reads."""
    folder.mkdir(parents=True)
    inter = [f"{r.user}\t{r.item}\t{r.rating:g}\t{r.timestamp}" for r in ds.ratings.itertuples()]
    items = [f"{i.id}\t{i.title}\t{i.year}\t{' '.join(i.genres)}" for i in ds.items.values()]
    (folder / f"{folder.name}.inter").write_text("\n".join([INTER_HEAD, *inter]) + "\n")
    (folder / f"{folder.name}.item").write_text("\n".join([ITEM_HEAD, *items]) + "\n")
    return folder


@pytest.fixture
def tiny_folder(tiny_dataset: Dataset, tmp_path: Path) -> Path:
    return write_folder(tiny_dataset, tmp_path / "tiny")


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command loads any dataset: its flags should be refused first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the flags were checked")

    monkeypatch.setattr("alignuser.config.load_world", refuse)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of one in-process CLI call; stderr must be one line."""
    capsys.readouterr()
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 1, err
    return status, err.strip()


# ---------------------------------------------------------------- flags, before any data loads

@pytest.mark.parametrize(("flags", "expect"), [
    (["--agents", "0"], "--agents 0: input should be greater than or equal to 1"),
    (["--agents", "-3"], "--agents -3: input should be greater than or equal to 1"),
    (["--pages", "0"], "--pages 0: input should be greater than or equal to 1"),
    (["--temperature", "-0.5"], "--temperature -0.5: input should be greater than or equal to 0"),
    (["--temperature", "nan"], "--temperature nan: input should be a finite number"),
    (["--seed", "-1"], "--seed -1: input should be greater than or equal to 0"),
    (["--recommenders", "pop,svd"], "--recommenders: unknown recommender(s) 'svd'; known:"),
    (["--recommenders", ""], "--recommenders: unknown recommender(s) ''"),
])
@pytest.mark.usefixtures("no_data")
def test_simulate_refuses_bad_flags(flags: list[str], expect: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run_cli(["simulate", "--policy", "random", *flags], capsys)
    assert status == 2 and err.startswith(f"error: {expect}")


@pytest.mark.parametrize(("flags", "expect"), [
    (["--k", "0"], "--k 0: input should be greater than or equal to 1"),
    (["--k", "-5"], "--k -5: input should be greater than or equal to 1"),
    (["--seed", "-2"], "--seed -2: input should be greater than or equal to 0"),
    (["--recommenders", "pop,,als"], "--recommenders: unknown recommender(s) ''"),
])
@pytest.mark.usefixtures("no_data")
def test_recommenders_eval_refuses_bad_flags(flags: list[str], expect: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run_cli(["recommenders", "eval", *flags], capsys)
    assert status == 2 and err.startswith(f"error: {expect}")


@pytest.mark.usefixtures("no_data")
def test_simulate_refuses_bad_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "sessions.jsonl").write_text("{}")
    cases = {str(a_file): "is an existing file, not a run directory",
             str(a_file / "run"): "notes.txt is a file, not a folder",
             str(full): "is not empty; pass another --output"}
    for output, expect in cases.items():
        status, err = run_cli(["simulate", "--policy", "random", "--output", output], capsys)
        assert status == 2 and err.startswith("error:") and expect in err, err
    assert not (a_file / "run").exists() and a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.usefixtures("no_data")
def test_simulate_refuses_unwritable_output(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        status, err = run_cli(["simulate", "--policy", "random", "--output",
                               str(locked / "run")], capsys)
    finally:
        locked.chmod(0o700)
    assert status == 2 and "no permission to write in" in err


@pytest.mark.usefixtures("no_data")
def test_missing_checkpoint_is_refused_before_loading(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run_cli(["simulate", "--policy", "aligned", "--checkpoint",
                           str(tmp_path / "nope")], capsys)
    assert status == 2 and err == f"error: --checkpoint {tmp_path / 'nope'} does not exist"


# ---------------------------------------------------------------- errors after data loads

def test_more_agents_than_users_is_an_error(tiny_folder: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    status, err = run_cli(["simulate", "--dataset", str(tiny_folder), "--policy", "random",
                           "--agents", "7", "--output", str(out)], capsys)
    assert status == 2
    assert err == ("error: --agents 7 is more than the 6 users with test ratings in tiny; "
                   "pass --agents 6 or fewer")
    assert not out.exists()


def test_small_simulation_still_runs(tiny_folder: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["simulate", "--dataset", str(tiny_folder), "--policy", "random",
                     "--agents", "6", "--pages", "2", "--recommenders", "POP", "--no-memory",
                     "--output", str(out)]) == 0
    assert len((out / "sessions.jsonl").read_text().splitlines()) == 6


def test_bad_data_is_one_line(tiny_dataset: Dataset, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tiny_dataset, tmp_path / "bad")
    inter = folder / "bad.inter"
    lines = inter.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t-5"
    inter.write_text("\n".join(lines) + "\n")
    status, err = run_cli(["recommenders", "eval", "--dataset", str(folder)], capsys)
    assert status == 2
    assert err.startswith("error: bad.inter line 4: timestamp -5 is negative")


def test_trace_of_a_broken_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "traces.sqlite").write_text("this is not sqlite" * 100)
    status, err = run_cli(["trace", str(run)], capsys)
    assert status == 2 and err.startswith(f"error: {run}: cannot read its trace database")
    (run / "traces.sqlite").unlink()
    sqlite3.connect(run / "traces.sqlite").execute(
        "CREATE TABLE checkpoints (thread_id TEXT)").connection.close()
    status, err = run_cli(["trace", str(run)], capsys)
    assert status == 2 and err == f"error: {run}: the trace database records no agents"


# ---------------------------------------------------------------- the one error path

RECURSION = GraphRecursionError("Recursion limit of 200 reached without hitting a stop "
                                "condition.\nFor troubleshooting, visit: https://example")


@pytest.mark.parametrize(("exc", "expect"), [
    (DataError("toy.inter line 3: bad"), "toy.inter line 3: bad"),
    (ValueError("two\nlines"), "two"),
    (FileNotFoundError("no such run"), "no such run"),
    (FileExistsError("run exists"), "run exists"),
    (PermissionError(13, "Permission denied", "/x"), "[Errno 13] Permission denied: '/x'"),
    (OSError("disk full"), "disk full"),
    (sqlite3.DatabaseError("file is not a database"), "file is not a database"),
    (KeyError("thread 'x' unknown"), "thread 'x' unknown"),
    (RECURSION, "Recursion limit of 200 reached without hitting a stop condition. (a session"),
])
def test_expected_failures_are_one_line(exc: Exception, expect: str,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def fail(args: object) -> int:
        raise exc

    monkeypatch.setattr(cli, "cmd_data", fail)
    status, err = run_cli(["data", "info"], capsys)
    assert status == 2 and err.startswith(f"error: {expect}")
    with pytest.raises(type(exc)):
        cli.main(["--debug", "data", "info"])
    with pytest.raises(type(exc)):
        cli.main(["data", "info", "--debug"])


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args: object) -> int:
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "cmd_data", fail)
    with pytest.raises(TypeError):
        cli.main(["data", "info"])


@pytest.mark.usefixtures("no_data")
def test_debug_shows_validation_traceback() -> None:
    with pytest.raises(ValidationError):
        cli.main(["--debug", "simulate", "--agents", "0"])
    with pytest.raises(ValidationError):
        cli.main(["simulate", "--pages", "0", "--debug"])


# ---------------------------------------------------------------- long sessions

def _wide_world() -> World:
    """3 users and 200 items: enough unseen items for 33 pages of 2."""
    items = {i: Item(id=i, title=f"Movie {i}", year=1990, genres=("Drama",))
             for i in range(1, 201)}
    rows = [(u, u * 10 + k, 3.0, 100 * k) for u in (1, 2, 3) for k in range(5)]
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    ds = validate("wide", {u: User(id=u) for u in (1, 2, 3)}, items, ratings)
    return World(ds=ds, split=make_split(ds.ratings))


def test_pages_33_fit_the_recursion_limit() -> None:
    """``--pages 33`` needed exactly the old fixed limit of 200 steps and died; it now scales."""
    world = _wide_world()

    def fresh(user: int, page: int, k: int, seen: object, session: object) -> list[int]:
        return [i for i in range(1, 201) if i not in seen][:k]  # type: ignore[operator]

    never_exits = FixedPolicy(RandomPolicy(seed=1, p_exit=0.0), "random")
    rt = Runtime(perceiver=world.perceiver, histories=world.histories,
                 personas={u: "A viewer." for u in (1, 2, 3)}, pages=fresh, policy=never_exits,
                 memory=NoMemory(), page_size=2, max_pages=33)
    app = build_graph("none", "off")
    assert recursion_limit(5) == 200 and recursion_limit(33) > 6 * 33 + 2
    assert run_config(rt, "pop:1")["recursion_limit"] == recursion_limit(33)
    with pytest.raises(GraphRecursionError):
        app.invoke({"agent_id": "pop:2", "user": 2, "recommender": "pop"},
                   {**run_config(rt, thread_id("pop", 2)), "recursion_limit": 200})
    session = run_agent(app, rt, "pop", 1)
    assert len(session["pages"]) == 33 and session["end"] == "max_pages"
