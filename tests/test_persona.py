"""Personas: trait tiers per the percentile protocol, train-only evidence, stable rendering."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest

from agents.persona import Persona, build_personas, render_persona
from simulator.data import Dataset


def _tier(v: float, lo: float, hi: float) -> str:
    return "low" if v < lo else "medium" if v < hi else "high"


def _raw_traits(ds: Dataset, train: pd.DataFrame) -> dict[int, tuple[int, int, float]]:
    """(ratings, genres covering 80% of genre mass, mean squared deviation) by plain loops."""
    item_sum: dict[int, float] = defaultdict(float)
    item_n: Counter[int] = Counter()
    by_user: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for u, i, r in train[["user", "item", "rating"]].itertuples(index=False):
        item_sum[i] += r
        item_n[i] += 1
        by_user[u].append((i, r))
    out = {}
    for u, rows in by_user.items():
        mass = Counter(g for i, _ in rows for g in ds.items[i].genres)
        total, acc, k = sum(mass.values()), 0, 0
        for c in sorted(mass.values(), reverse=True):
            if acc >= 0.8 * total:
                break
            acc, k = acc + c, k + 1
        msd = float(np.mean([(r - item_sum[i] / item_n[i]) ** 2 for i, r in rows]))
        out[u] = (len(rows), k, msd)
    return out


def test_tiers_match_percentile_definitions(ml100k: Dataset, split100k) -> None:
    train = split100k.train
    personas = build_personas(ml100k, train)
    assert len(personas) == 943
    raw = _raw_traits(ml100k, train)
    users = sorted(raw)
    n, k, msd = (np.array([raw[u][j] for u in users], dtype=float) for j in range(3))
    a_lo, a_hi = np.percentile(n, [60, 90])
    d_lo, d_hi = np.percentile(k, [33, 66])
    c_lo, c_hi = np.percentile(msd, [25, 80])
    flip = {"low": "high", "medium": "medium", "high": "low"}
    for j, u in enumerate(users):
        p = personas[u]
        assert (p.n_ratings, p.n_genres_80) == (int(n[j]), int(k[j]))
        assert p.rating_deviation == pytest.approx(msd[j], abs=1e-9)
        assert p.activity == _tier(n[j], a_lo, a_hi), u
        assert p.diversity == _tier(k[j], d_lo, d_hi), u
        # Low deviation from item means is high conformity (Agent4Rec's "dedicated follower").
        assert p.conformity == flip[_tier(msd[j], c_lo, c_hi)], u
    counts = Counter(p.activity for p in personas.values())
    assert counts["high"] < counts["medium"] < counts["low"]


def test_persona_uses_train_split_only(ml100k: Dataset, split100k) -> None:
    train = split100k.train
    held = pd.concat([split100k.valid, split100k.test])
    loved_later = held[held["rating"] == 5].groupby("user")["item"].apply(set)
    user = int(loved_later.index[0])
    mine = build_personas(ml100k, train)[user]
    everything = build_personas(ml100k, ml100k.ratings)[user]
    # The full log would put the held-out favourites first (they are the most recent) ...
    assert set(everything.favourite_items) & loved_later[user]
    # ... the train persona never shows them, and counts only train ratings.
    assert not set(mine.favourite_items) & set(held.loc[held.user == user, "item"])
    assert mine.n_ratings == int((train["user"] == user).sum())
    text = render_persona(mine, ml100k.items)
    for item in loved_later[user] - set(train.loc[train.user == user, "item"]):
        assert ml100k.items[item].label() not in text


def test_taste_definitions_on_tiny(tiny_dataset: Dataset) -> None:
    p = build_personas(tiny_dataset, tiny_dataset.ratings)[1]
    # User 1 rates items 1..6 as 2,3,4,5,1,2 at timestamps 1000..1050.
    assert p.favourite_items == (4,)
    assert p.disliked_items == (6, 5)  # rated <= 2, most recent first
    assert p.rating_mean == pytest.approx(17 / 6)
    # Rated >= 4: item 3 (Drama, Horror) and item 4 (Horror, Romance); ties by name.
    assert [(g.genre, g.count) for g in p.liked_genres] == [
        ("Horror", 2), ("Drama", 1), ("Romance", 1)]
    # >= 2 ratings, mean below the user's 17/6: Sci-Fi (items 5, 6: 1.5), Action (1, 6: 2.0),
    # Comedy (1, 2: 2.5); lowest two shown.
    assert [(g.genre, g.count, g.mean) for g in p.disliked_genres] == [
        ("Sci-Fi", 2, 1.5), ("Action", 2, 2.0)]
    # Same-second favourites are ordered by item id.
    tie = pd.DataFrame([(1, 9, 5.0, 7), (1, 2, 5.0, 7), (1, 5, 5.0, 3)],
                       columns=["user", "item", "rating", "timestamp"])
    assert build_personas(tiny_dataset, tie)[1].favourite_items == (2, 9, 5)


def test_user_without_train_history_gets_neutral_persona(tiny_dataset: Dataset) -> None:
    train = tiny_dataset.ratings[tiny_dataset.ratings.user != 3]
    p = build_personas(tiny_dataset, train)[3]
    assert (p.n_ratings, p.activity, p.conformity, p.rating_mean) == (0, "low", "medium", None)
    assert "user 3" in render_persona(p, tiny_dataset.items)


def test_render_is_deterministic_and_compact(ml100k: Dataset, split100k) -> None:
    a = build_personas(ml100k, split100k.train)
    b = build_personas(ml100k, split100k.train.sample(frac=1.0, random_state=0))
    reversed_items = dict(reversed(list(ml100k.items.items())))
    for u in (1, 13, 405, 943):
        text = render_persona(a[u], ml100k.items)
        assert a[u] == b[u]  # row order of the train frame does not matter
        assert text == render_persona(b[u], reversed_items)
        assert text == render_persona(Persona.model_validate(a[u].model_dump()), ml100k.items)
        assert 60 <= len(text.split()) <= 150
        assert "page" not in text.lower()
