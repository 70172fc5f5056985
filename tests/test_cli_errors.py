"""Bad flags, files and data end as one `error:` line and exit status 2; `--debug` re-raises.

Every test runs the CLI's ``main`` in process on the tiny hand-made dataset (or none at all):
flags are refused before any data loads, so no model or ml-100k is ever read here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from langgraph.errors import GraphRecursionError
from pydantic import ValidationError

from agents.policy import FixedPolicy
from agents.world import World
from alignuser import cli
from graph.deps import AgentDeps
from graph.graph import build_graph
from graph.runner import recursion_limit, run_agent, run_config, run_context, thread_id
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


# ---------------------------------------------------------------- a small run after the checks
# (the bad flags, files and data themselves are the table in tests/test_bad_inputs.py)

def test_small_simulation_still_runs(tiny_folder: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["simulate", "--dataset", str(tiny_folder), "--policy", "random",
                     "--agents", "6", "--pages", "2", "--recommenders", "POP", "--no-memory",
                     "--output", str(out)]) == 0
    assert len((out / "sessions.jsonl").read_text().splitlines()) == 6


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
    rt = AgentDeps(perceiver=world.perceiver, histories=world.histories,
                   personas={u: "A viewer." for u in (1, 2, 3)}, pages=fresh,
                   policy=never_exits, memory=NoMemory(), page_size=2, max_pages=33)
    app = build_graph("none", "off")
    assert recursion_limit(5) == 200 and recursion_limit(33) > 6 * 33 + 2
    assert run_config(rt, "pop:1")["recursion_limit"] == recursion_limit(33)
    with pytest.raises(GraphRecursionError):
        app.invoke({"agent_id": "pop:2", "user": 2, "recommender": "pop"},
                   {**run_config(rt, thread_id("pop", 2)), "recursion_limit": 200},
                   context=run_context(rt))
    session = run_agent(app, rt, "pop", 1)
    assert len(session.pages) == 33 and session.end == "max_pages"


@pytest.mark.parametrize("argv, expect", [
    (["--wm-format", "posters"], "--wm-format posters: input should be 'titles' or 'genres'"),
    (["--lr", "fast"], "--lr fast: input should be a valid number, unable to parse string as a "
     "number"),
])
def test_fit_prepared_refuses_a_bad_value_in_one_line(
        argv: list[str], expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The training entry point for another machine names a bad TrainConfig value as the front
    door does, before it reads the prepared file (which does not exist here)."""
    from training.fit_prepared import main as fit_main

    with pytest.raises(SystemExit) as exc:
        fit_main([str(tmp_path / "prep.pkl"), str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"python -m training.fit_prepared: error: {expect}"
    assert not (tmp_path / "out").exists()


def test_fit_prepared_names_a_missing_prepared_file(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from training.fit_prepared import main as fit_main

    with pytest.raises(SystemExit) as exc:
        fit_main([str(tmp_path / "prep.pkl"), str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "prep.pkl: no such file" in capsys.readouterr().err.strip().splitlines()[-1]
