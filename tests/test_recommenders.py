"""The recommenders under evaluation: accuracy sanity on ml-100k, page rules, reactivity, seeds."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from simulator.offline import offline_metrics
from simulator.recommenders import RECOMMENDERS, Recommender, make_recommender
from simulator.split import Split

TRAINED = ("pop", "itemknn", "userknn", "als", "bpr", "ease")
REACTIVE = ("itemknn", "userknn", "als", "bpr", "ease")


@pytest.fixture(scope="module")
def fitted(split100k: Split) -> dict[str, Recommender]:
    return {name: make_recommender(name, seed=0).fit(split100k.train) for name in RECOMMENDERS}


@pytest.fixture(scope="module")
def static(split100k: Split) -> dict[str, Recommender]:
    return {name: make_recommender(name, reactive=False, seed=0).fit(split100k.train)
            for name in REACTIVE}


@pytest.fixture(scope="module")
def metrics(fitted: dict[str, Recommender], split100k: Split) -> dict[str, pd.DataFrame]:
    train, valid, test = split100k.train, split100k.valid, split100k.test
    return {"valid": offline_metrics(fitted, train, valid, k=10),
            "test": offline_metrics(fitted, pd.concat([train, valid]), test, k=10)}


def _users(split: Split, step: int = 19) -> list[int]:
    return sorted(int(u) for u in split.train["user"].unique())[::step]


def _history(split: Split, user: int) -> set[int]:
    return set(split.train.loc[split.train["user"] == user, "item"].tolist())


@pytest.mark.parametrize("part", ["valid", "test"])
def test_trained_models_beat_random_and_als_itemknn_ease_beat_pop(
        metrics: dict[str, pd.DataFrame], part: str) -> None:
    ndcg = metrics[part]["NDCG@10"]
    for name in TRAINED:
        assert ndcg[name] > ndcg["random"] + 0.03, (part, name, ndcg.to_dict())
    for name in ("als", "itemknn", "ease"):
        assert ndcg[name] > ndcg["pop"], (part, name, ndcg.to_dict())


def test_metric_table_shape(metrics: dict[str, pd.DataFrame]) -> None:
    table = metrics["valid"]
    assert list(table.index) == list(RECOMMENDERS)
    assert {"Recall@10", "Precision@10", "NDCG@10"} <= set(table.columns)
    assert ((table[["Recall@10", "Precision@10", "NDCG@10"]] >= 0)
            & (table[["Recall@10", "Precision@10", "NDCG@10"]] <= 1)).all().all()
    assert (table["users"] == 943).all()


def test_offline_metrics_respects_user_subset(fitted: dict[str, Recommender],
                                              split100k: Split) -> None:
    table = offline_metrics({"pop": fitted["pop"]}, split100k.train, split100k.valid,
                            k=5, users=[1, 2, 3, 10**9])
    assert int(table.loc["pop", "users"]) == 3
    assert "NDCG@5" in table.columns


@pytest.mark.parametrize("name", RECOMMENDERS)
def test_rank_returns_k_unseen_unexcluded_items(fitted: dict[str, Recommender],
                                                split100k: Split, name: str) -> None:
    rec = fitted[name]
    for user in _users(split100k, 47):
        first = rec.rank(user, 10)
        exclude = set(first[:5]) | {1, 50, 100}
        session = first[5:7]
        page = rec.rank(user, 10, exclude=exclude, session=session)
        assert len(first) == 10 and len(page) == 10
        assert len(set(page)) == 10
        forbidden = _history(split100k, user) | exclude | set(session)
        assert not set(page) & forbidden
        assert not set(first) & _history(split100k, user)
        assert all(isinstance(i, int) for i in page)


@pytest.mark.parametrize("name", REACTIVE)
def test_reactive_session_changes_the_next_page(fitted: dict[str, Recommender],
                                                split100k: Split, name: str) -> None:
    rec = fitted[name]
    users = _users(split100k)
    changed = 0
    for user in users:
        first = rec.rank(user, 10)
        plain = rec.rank(user, 10, exclude=first)
        after = rec.rank(user, 10, exclude=first, session=first[:3])
        changed += plain != after
    assert changed >= 0.8 * len(users), (name, changed, len(users))


def test_reactive_session_pulls_in_neighbours_of_watched_items(
        fitted: dict[str, Recommender], split100k: Split) -> None:
    """A watched item must raise the kNN score of items similar to it, not just reshuffle."""
    rec = fitted["itemknn"]
    user = _users(split100k)[0]
    watched = rec.rank(user, 1)
    others = rec.rank(user, 200, exclude=watched)
    before = rec.scores(user, others)
    after = rec.scores(user, others, session=watched)
    assert (after >= before - 1e-4).all() and (after > before + 1e-3).any()


@pytest.mark.parametrize("name", REACTIVE)
def test_static_mode_ignores_session(static: dict[str, Recommender], split100k: Split,
                                     name: str) -> None:
    rec = static[name]
    for user in _users(split100k, 47):
        first = rec.rank(user, 10)
        session = first[:3]
        with_session = rec.rank(user, 10, exclude=first[3:], session=session)
        as_exclusions = rec.rank(user, 10, exclude=first)
        assert with_session == as_exclusions
        items = rec.rank(user, 50, exclude=first)
        np.testing.assert_array_equal(rec.scores(user, items, session=session),
                                      rec.scores(user, items))


@pytest.mark.parametrize("name", RECOMMENDERS)
def test_same_seed_same_pages(split100k: Split, fitted: dict[str, Recommender],
                              name: str) -> None:
    """ALS and FlexMF are not promised bit-exact across runs, so they get a tolerance."""
    again = make_recommender(name, seed=0).fit(split100k.train)
    users = _users(split100k, 47)
    overlap = np.mean([len(set(fitted[name].rank(u, 10)) & set(again.rank(u, 10))) / 10
                       for u in users])
    items = list(range(1, 301))
    for user in users:
        a = fitted[name].scores(user, items, session=[50, 100])
        b = again.scores(user, items, session=[50, 100])
        if name in ("als", "bpr"):
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
        else:
            np.testing.assert_array_equal(a, b)
    assert overlap >= (0.9 if name in ("als", "bpr") else 1.0)


def test_random_depends_on_seed_and_user(split100k: Split, fitted: dict[str, Recommender]) -> None:
    other = make_recommender("random", seed=1).fit(split100k.train)
    assert fitted["random"].rank(1, 10) != other.rank(1, 10)
    assert fitted["random"].rank(1, 10) != fitted["random"].rank(2, 10)


@pytest.mark.parametrize("name", RECOMMENDERS)
def test_scores_agree_with_rank_and_floor_unscorable(fitted: dict[str, Recommender],
                                                     name: str) -> None:
    rec = fitted[name]
    user = 1
    page = rec.rank(user, 20)
    s = rec.scores(user, [*page, -7])
    assert s.dtype == np.float64 and np.isfinite(s).all()
    assert (np.diff(s[:-1]) <= 1e-9).all()  # best first
    assert s[-1] <= s[:-1].min()  # an unknown item scores lowest


def test_unknown_user_gets_popular_items(fitted: dict[str, Recommender]) -> None:
    popular = fitted["pop"].rank(10**9, 10)
    for name in TRAINED:
        assert fitted[name].rank(10**9, 10) == popular


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown recommender 'svd'.*itemknn.*bpr"):
        make_recommender("svd")


def test_rank_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        make_recommender("pop").rank(1, 10)


_THREADS_AFTER_FIT = """
import numpy as np, pandas as pd, torch
torch.set_num_threads(3)
from simulator.recommenders import make_recommender
rng = np.random.default_rng(0)
frame = pd.DataFrame({"user": rng.integers(0, 40, 600), "item": rng.integers(0, 60, 600),
                      "rating": rng.integers(1, 6, 600), "timestamp": np.arange(600)})
frame = frame.drop_duplicates(["user", "item"])
for name in ("itemknn", "bpr"):
    make_recommender(name).fit(frame)
print(torch.get_num_threads())
"""


def test_fitting_lenskit_models_keeps_torch_threads() -> None:
    """LensKit's default first-training setup cuts torch to cores // its threads (1 on two
    cores), which halved every LLM forward of a simulate run with itemknn pages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LK_NUM")}
    out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_FIT], capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    assert out.stdout.split()[-1] == "3"
