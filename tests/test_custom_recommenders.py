"""Bringing one's own recommender: a factory object, a LensKit component, a ranking file.

Each form runs through ``World.recommender`` and ``offline_metrics`` on the 40-user ml-100k world,
and through the CLI with that world standing in for the dataset load; bad specs are refused
before any data loads, as one line that names the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from agents.world import World
from alignuser import cli
from alignuser.config import OfflineConfig, SimulateConfig
from evaluation import macro
from evaluation.run import EvalConfig, static_pages
from examples.my_recommender import factory, write_ranking_file
from simulator.custom import check_recommenders, recommender_label
from simulator.offline import offline_metrics

FACTORY = "examples.my_recommender:factory"
KNN = "lenskit.knn:ItemKNNScorer?k=20&feedback=implicit"


class OnlyFit:
    """Half a recommender: the error must name what is missing."""

    name = "half"

    def fit(self, train: pd.DataFrame) -> OnlyFit:
        return self


def _users(world: World) -> list[int]:
    return sorted(int(u) for u in world.split.test["user"].unique())[:8]


def _history(world: World, user: int) -> set[int]:
    train = world.split.train
    return set(train.loc[train["user"] == user, "item"].astype(int))


@pytest.fixture
def world_cli(small_world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    """Commands get the small world instead of loading a dataset."""
    monkeypatch.setattr("alignuser.config.load_world", lambda *a, **k: small_world)
    return small_world


@pytest.fixture
def rank_file(small_world: World, tmp_path: Path) -> Path:
    """A ranking exported by 'another system': ranks, not scores, for the first 5 test users,
    with one item the dataset does not have (ignored)."""
    rows, known = [], set(small_world.split.train["item"].astype(int))
    for u in _users(small_world)[:5]:
        order = [i for i in range(1, 200) if i in known - _history(small_world, u)][::-1][:30]
        rows += [(u, i, r) for r, i in enumerate([99999, *order], start=1)]
    path = tmp_path / "prod_ranks.csv"
    pd.DataFrame(rows, columns=["user", "item", "rank"]).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- (a) a factory's object

def test_factory_object_ranks_like_itself_under_the_page_rules(small_world: World) -> None:
    rec = small_world.recommender(FACTORY)
    own = factory().fit(small_world.split.train)
    assert rec.name == "pop-quality" and small_world.recommender(FACTORY) is rec
    for u in _users(small_world):
        seen = _history(small_world, u)
        assert rec.rank(u, 10) == own.rank(u, 10)
        page = rec.rank(u, 10, exclude={318, 483}, session=[12])
        assert len(page) == 10 and not {318, 483, 12} & set(page) and not seen & set(page)
    u = _users(small_world)[0]
    session = rec.rank(u, 2)
    assert rec.rank(u, 10, session=session) == own.rank(u, 10, session=session)
    static = small_world.recommender(FACTORY, reactive=False)
    assert static.rank(u, 10, session=session) == own.rank(u, 10, exclude=set(session))
    np.testing.assert_allclose(rec.scores(u, [1, 50]), own.scores(u, [1, 50]))


def test_factory_object_in_offline_metrics(small_world: World) -> None:
    recs = {r.name: r for r in (small_world.recommender(s) for s in ("pop", FACTORY))}
    frame = offline_metrics(recs, small_world.split.train, small_world.split.valid, k=10)
    assert list(frame.index) == ["pop", "pop-quality"]
    assert frame.loc["pop-quality", "Recall@10"] > 0
    assert frame.loc["pop-quality", "NDCG@10"] != frame.loc["pop", "NDCG@10"]


# ---------------------------------------------------------------- (b) a LensKit component

def test_lenskit_component_is_wrapped_like_the_builtins(small_world: World) -> None:
    """The built-in itemknn is this very component and config, so the pages must agree, with a
    session as well: the wrapper reuses the built-ins' query, fallback and exclusion."""
    ours, builtin = small_world.recommender(KNN), small_world.recommender("itemknn")
    assert ours.name == "ItemKNNScorer(k=20,feedback=implicit)"
    for u in _users(small_world):
        assert ours.rank(u, 10) == builtin.rank(u, 10)
        session = builtin.rank(u, 2)
        assert ours.rank(u, 10, session=session) == builtin.rank(u, 10, session=session)


def test_explicit_lenskit_scorer_reads_ratings_and_sessions(small_world: World) -> None:
    rec = small_world.recommender("lenskit.als:BiasedMFScorer?embedding_size=8")
    u = _users(small_world)[0]
    page = rec.rank(u, 10)
    assert rec.name == "BiasedMFScorer(embedding_size=8)" and len(page) == 10
    assert not _history(small_world, u) & set(page)
    assert np.isfinite(rec.scores(u, page)).all()
    assert rec.scores(u, page)[0] >= rec.scores(u, page)[-1]
    knn = small_world.recommender("lenskit.knn:ItemKNNScorer")  # explicit feedback by default
    rest = knn.rank(u, 30, exclude=page[:2])
    assert not np.allclose(knn.scores(u, rest, session=page[:2]), knn.scores(u, rest))


# ---------------------------------------------------------------- (c) a ranking file

def test_ranking_file_follows_the_file_then_popularity(small_world: World,
                                                       rank_file: Path) -> None:
    rec = small_world.recommender(str(rank_file))
    frame = pd.read_csv(rank_file)
    pop = small_world.recommender("pop")
    assert rec.name == "prod_ranks"
    for u in frame["user"].unique():
        listed = [int(i) for i in frame.loc[frame["user"] == u].sort_values("rank")["item"]
                  if i != 99999]
        assert rec.rank(int(u), 10) == listed[:10]
        assert rec.rank(int(u), 10, session=listed[:3]) == listed[3:13]  # static: no reaction
        assert rec.rank(int(u), 40)[30:] == pop.rank(int(u), 10, exclude=set(listed))[:10]
    stranger = _users(small_world)[-1]
    assert rec.rank(stranger, 10) == pop.rank(stranger, 10)


def test_parquet_scores_and_offline_metrics(small_world: World, tmp_path: Path) -> None:
    """Export the example recommender's lists as Parquet; read back, they rank the same."""
    own = factory().fit(small_world.split.train)
    users = _users(small_world)
    csv = tmp_path / "exported.csv"
    write_ranking_file(own, users, str(csv), k=20)
    path = tmp_path / "exported.parquet"
    pd.read_csv(csv).to_parquet(path)
    rec = small_world.recommender(f"file:{path}")
    for u in users:
        assert rec.rank(u, 10) == own.rank(u, 10)
    frame = offline_metrics({rec.name: rec, "pop-quality": small_world.recommender(FACTORY)},
                            small_world.split.train, small_world.split.test, k=10, users=users)
    assert frame.loc["exported"].equals(frame.loc["pop-quality"])


# ---------------------------------------------------------------- the commands

def test_recommenders_eval_prints_each_form(world_cli: World, rank_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    specs = ["pop", FACTORY, KNN, str(rank_file)]
    assert cli.main(["recommenders", "eval", "--recommenders", ",".join(specs), "--k", "5"]) == 0
    out = capsys.readouterr().out
    recs = {recommender_label(s): world_cli.recommender(s) for s in specs}
    expected = offline_metrics(recs, world_cli.split.train, world_cli.split.valid, k=5)
    valid = out.split("test split")[0]
    shown = {"pop-quality": "pop-quality", "prod_ranks": "prod_ranks",
             "ItemKNNScorer(k=20,feedback=implicit)": "ItemKNNScorer("}
    for name, head in shown.items():
        line = next(ln for ln in valid.splitlines() if head in ln)
        assert f"{expected.loc[name, 'NDCG@5']:.4f}" in line, line


def test_simulate_records_the_specs(world_cli: World, rank_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    specs = [FACTORY, f"file:{rank_file}"]
    assert cli.main(["simulate", "--policy", "random", "--agents", "2", "--pages", "2",
                     "--no-memory", "--recommenders", ",".join(specs), "--output",
                     str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["recommenders"] == specs
    assert manifest["recommender_specs"] == {"pop-quality": FACTORY, "prod_ranks": specs[1]}
    sessions = [json.loads(ln) for ln in (out / "sessions.jsonl").read_text().splitlines()]
    assert {s["recommender"] for s in sessions} == {"pop-quality", "prod_ranks"}
    first = next(s for s in sessions if s["recommender"] == "pop-quality")
    assert cli.main(["trace", str(out), first["thread"], "--from-step", "1", "--output",
                     str(tmp_path / "branch")]) == 0


def test_evaluate_selects_among_custom_recommenders(small_world: World) -> None:
    cfg = EvalConfig.quick(recommenders=["POP", FACTORY])
    assert cfg.recommenders == ["pop", FACTORY]
    users = _users(small_world)[:4]
    pages = static_pages(small_world, FACTORY, users, seed=0)
    assert [p for _, ps in pages for p in ps][0] == factory().fit(
        small_world.split.train).rank(users[0], 4, exclude=_history(small_world, users[0]))
    hits = macro.per_user_hits(small_world, cfg.recommenders, users, "test")
    assert list(hits.columns) == ["pop", "pop-quality"] and hits.notna().all().all()
    args = cli.build_parser().parse_args(["evaluate", "--recommenders", f"pop,{FACTORY}"])
    assert args.recommenders == f"pop,{FACTORY}"


# ---------------------------------------------------------------- errors, before data loads

@pytest.mark.parametrize(("spec", "expect"), [
    ("no_such_pkg.recs:factory", "cannot import module 'no_such_pkg.recs'"),
    ("examples.my_recommender:nope",
     "module 'examples.my_recommender' has no attribute 'nope'"),
    (f"{__name__}:OnlyFit", "OnlyFit() returned a OnlyFit without rank, scores"),
    ("examples.my_recommender:DAMPING", "is a float, neither a factory"),
    ("lenskit.knn:ItemKNNScorer?k=-1", "bad option for ItemKNNScorer (k: Input should "
     "be greater than 0)"),
    ("missing/ranks.csv", "ranking file missing/ranks.csv does not exist"),
    ("svd", "unknown recommender(s) 'svd'; known: random, pop"),
    ("pop,POP", "'pop' and 'pop' would both be shown as 'pop'"),
])
def test_bad_specs_are_one_clear_line(spec: str, expect: str) -> None:
    with pytest.raises(ValueError, match="^[^\n]*$") as err:
        check_recommenders(spec.split(","))
    assert expect in str(err.value)


def test_bad_file_columns_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "recbole.csv"
    pd.DataFrame({"user_id": [1], "item_id": [2], "score": [0.5]}).to_csv(path, index=False)
    with pytest.raises(ValidationError) as err:
        OfflineConfig(recommenders=[str(path)])
    assert (f"ranking file {path}: needs columns user, item and score or rank; it has "
            "user_id, item_id, score") in str(err.value)


def test_bad_file_ids_fail_at_fit(small_world: World, tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    pd.DataFrame({"user": [1, 1], "item": ["a12", "7"], "score": [1.0, 2.0]}).to_csv(
        path, index=False)
    with pytest.raises(ValueError, match=f"ranking file {path}: column item must hold integer "
                       r"ids; 1 row\(s\) do not \(first: 'a12'\)"):
        small_world.recommender(str(path))


def test_cli_refuses_a_bad_spec_before_loading(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the flags were checked")

    monkeypatch.setattr("alignuser.config.load_world", refuse)
    for argv in (["recommenders", "eval"], ["simulate", "--policy", "random"],
                 ["evaluate", "--preset", "quick"]):
        assert cli.main([*argv, "--recommenders", "pop,examples.my_recommender:nope"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --recommenders") and len(err.splitlines()) == 1, err
        assert "has no attribute 'nope'" in err
    with pytest.raises(ValidationError):
        SimulateConfig(recommenders=["no_such_pkg:f"])
