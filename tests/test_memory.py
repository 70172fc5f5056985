"""Personal evidence (item similarity) and episodic memory."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memory.evidence import FEATURE_NAMES, MATCH_LAMBDA, ItemSimilarity
from memory.store import ChromaMemory, Memory, NoMemory, default_embedder, make_memory

# Users 1-4 x items 10, 20, 30. Binary item vectors over users (1, 2, 3, 4):
# 10 = (1,1,1,0), 20 = (1,1,0,1), 30 = (0,1,1,0), so by hand:
# cos(10,20) = 2/3, cos(10,30) = 2/sqrt(6), cos(20,30) = 1/sqrt(6).
HAND = pd.DataFrame(
    [(1, 10, 5.0, 1), (1, 20, 4.0, 2), (2, 10, 3.0, 3), (2, 20, 2.0, 4), (2, 30, 4.0, 5),
     (3, 10, 4.0, 6), (3, 30, 1.0, 7), (4, 20, 5.0, 8)],
    columns=["user", "item", "rating", "timestamp"])
COS_10_20, COS_10_30, COS_20_30 = 2 / 3, 2 / math.sqrt(6), 1 / math.sqrt(6)


def test_similarity_matches_hand_computed_cosine() -> None:
    sim = ItemSimilarity.fit(HAND)
    got = sim.similar_in_history(10, {20: 4.0, 30: 2.0, 10: 5.0})
    assert [(i, r) for i, _, r in got] == [(30, 2.0), (20, 4.0)]  # best first, itself excluded
    assert got[0][1] == pytest.approx(COS_10_30, rel=1e-6)
    assert got[1][1] == pytest.approx(COS_10_20, rel=1e-6)
    assert dict(sim.neighbours(20))[30] == pytest.approx(COS_20_30, rel=1e-6)
    assert sim.similar_in_history(10, {20: 4.0, 30: 2.0}, k=1) == got[:1]
    assert sim.popularity(10) == 3 and sim.popularity(99) == 0
    assert sim.mean_rating(10) == pytest.approx(4.0) and sim.mean_rating(99) is None


def test_truncation_keeps_neighbours_either_item_lists() -> None:
    sim = ItemSimilarity.fit(HAND, n_neighbours=1)
    # Top-1 lists: 10 -> 30, 20 -> 10, 30 -> 10; symmetrised, 10 also keeps 20.
    assert [i for i, _ in sim.neighbours(10)] == [30, 20]
    assert [i for i, _ in sim.neighbours(20)] == [10]
    assert sim.similar_in_history(20, {30: 1.0}) == []


def test_features_keys_and_values() -> None:
    sim = ItemSimilarity.fit(HAND)
    f = sim.features(10, {20: 4.0, 30: 2.0})
    assert tuple(f) == FEATURE_NAMES and all(isinstance(v, float) for v in f.values())
    s1, s2 = COS_10_30, COS_10_20
    assert f["popularity"] == pytest.approx(math.log1p(3))
    assert f["mean_rating"] == pytest.approx(4.0)
    assert f["max_sim"] == pytest.approx(s1, rel=1e-6)
    assert f["mean_sim_top3"] == pytest.approx((s1 + s2) / 3, rel=1e-6)
    assert f["sim_weighted_rating"] == pytest.approx((s1 * 2 + s2 * 4) / (s1 + s2), rel=1e-6)
    assert f["n_similar"] == 2.0
    cold = sim.features(99, {20: 4.0, 30: 2.0})  # unseen item: fall back, never NaN
    assert cold["popularity"] == 0.0 and cold["max_sim"] == 0.0 and cold["n_similar"] == 0.0
    assert cold["mean_rating"] == pytest.approx(HAND["rating"].mean())
    assert cold["sim_weighted_rating"] == pytest.approx(3.0)  # the person's own mean
    assert sim.features(10, {})["sim_weighted_rating"] == pytest.approx(HAND["rating"].mean())


def test_match_percentiles_and_closest_watched_by_hand() -> None:
    sim = ItemSimilarity.fit(HAND, match_lambda=None)  # the summed-cosine match
    # item-kNN scores for history {20}: the row of 20, i.e. 10 -> 2/3, 20 -> 0, 30 -> 1/sqrt(6).
    np.testing.assert_allclose(sim.history_scores({20: 4.0}), [COS_10_20, 0.0, COS_20_30],
                               rtol=1e-6)
    # Percentile = share of the catalogue scoring strictly lower, floored.
    assert sim.match_percentiles({20: 4.0}) == {10: 66, 20: 0, 30: 33}
    assert sim.match_percentiles({20: 4.0, 30: 2.0}) == {10: 66, 20: 0, 30: 0}  # tie at 1/sqrt(6)
    assert sim.match_percentiles({}) == {10: 0, 20: 0, 30: 0}
    assert sim.match_percentiles({99: 3.0}) == {10: 0, 20: 0, 30: 0}  # unseen history item
    # Of 10's closest items (30, then 20) the person watched both / one / none.
    assert sim.closest_watched(10, {20: 4.0, 30: 2.0}) == (2, 3.0)
    assert sim.closest_watched(10, {20: 4.0}) == (1, 4.0)
    assert sim.closest_watched(10, {20: 4.0}, n=1) == (0, None)  # only 30 is among the top 1
    assert sim.closest_watched(99, {20: 4.0}) == (0, None)
    f = sim.features(10, {20: 4.0})
    assert (f["match"], f["close_watched"], f["close_rating"]) == (66.0, 1.0, 4.0)
    assert sim.features(10, {20: 4.0}, match={10: 12}) == {**f, "match": 12.0}
    cold = sim.features(99, {20: 4.0, 30: 2.0})
    assert cold["match"] == 0.0 and cold["close_watched"] == 0.0
    assert cold["close_rating"] == pytest.approx(3.0)  # falls back like sim_weighted_rating


def test_knn_rating_by_hand() -> None:
    sim = ItemSimilarity.fit(HAND)
    # Item means 10: 4, 20: 11/3, 30: 2.5 (global 3.5). Residuals of the history: 20 at 4 is
    # +1/3 above its mean, 30 at 2 is 0.5 below; weighted by the cosine to 10, shrunk by 0.5.
    num = COS_10_20 * (4.0 - 11 / 3) + COS_10_30 * (2.0 - 2.5)
    assert sim.knn_rating(10, {20: 4.0, 30: 2.0}) == pytest.approx(
        4.0 + num / (COS_10_20 + COS_10_30 + 0.5))
    assert sim.knn_rating(10, {20: 4.0}, shrink=0.0) == pytest.approx(4.0 + 1 / 3)
    assert sim.knn_rating(10, {10: 1.0}) == pytest.approx(4.0)  # itself is not evidence
    assert sim.knn_rating(10, {}) == pytest.approx(4.0)  # nothing watched: the item's mean
    assert sim.knn_rating(99, {20: 4.0}) == pytest.approx(3.5)  # unseen: the global mean


def test_ease_match_by_hand() -> None:
    # Binary X (users 1-4 x items 10, 20, 30); EASE: P = (X'X + lam I)^-1, B = -P / diag(P).
    x = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=float)
    lam = 2.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(3))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    sim = ItemSimilarity.fit(HAND, match_lambda=lam)
    np.testing.assert_allclose(sim.history_scores({20: 4.0}), b[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sim.history_scores({20: 4.0, 30: 1.0, 99: 3.0}), b[1] + b[2],
                               rtol=1e-5, atol=1e-7)
    ranks = np.argsort(np.argsort(b[1], kind="stable"), kind="stable")
    assert sim.match_percentiles({20: 4.0}) == {
        i: int(np.floor(100 * np.sum(b[1] < b[1][k]) / 3)) for k, i in enumerate((10, 20, 30))}
    assert ranks[0] > ranks[2]  # 10 (2 co-watchers with 20) above 30 (1)
    assert sim.features(10, {20: 4.0})["match"] == 66.0
    with pytest.raises(ValueError, match="positive"):
        ItemSimilarity.fit(HAND, match_lambda=0.0)


def test_a_catalogue_too_large_for_ease_falls_back_to_cosine_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import memory.evidence as evidence

    monkeypatch.setattr(evidence, "MAX_EASE_ITEMS", 2)
    with pytest.warns(UserWarning, match="summed cosine"):
        sim = ItemSimilarity.fit(HAND)
    np.testing.assert_allclose(sim.history_scores({20: 4.0}), [COS_10_20, 0.0, COS_20_30],
                               rtol=1e-6)


def test_ease_without_a_person_equals_a_fit_without_their_ratings(split100k) -> None:
    """The rank-one downdate is exact: scoring without user u equals refitting without u."""
    train = split100k.train
    sim = ItemSimilarity.fit(train)
    counts = train["item"].value_counts()
    shared = train.groupby("user")["item"].agg(lambda s: bool((counts[s] > 1).all()))
    for user in shared[shared].index[:3]:  # a refit without them keeps the same catalogue
        own = train[train["user"] == user]
        refit = ItemSimilarity.fit(train[train["user"] != user])
        history = {int(i): 3.0 for i in own["item"].iloc[:40]}
        np.testing.assert_allclose(sim.history_scores(history, without=user),
                                   refit.history_scores(history), rtol=1e-6, atol=1e-8)
        a, b = sim.match_percentiles(history, without=user), refit.match_percentiles(history)
        pa, pb = (np.array([p[i] for i in sorted(p)]) for p in (a, b))
        assert a.keys() == b.keys() and np.corrcoef(pa, pb)[0, 1] > 0.9999  # near-ties swap
        assert not np.allclose(sim.history_scores(history), refit.history_scores(history))
    # Someone with no train ratings: nothing to take out.
    h = {1: 4.0, 50: 3.0}
    np.testing.assert_array_equal(sim.history_scores(h, without=10**9), sim.history_scores(h))


def test_ease_match_pickles_without_its_inverse_and_scores_the_same(split100k) -> None:
    """A pickled perceiver travels to other machines (training and evaluation files): it
    carries X and lambda, not the items-squared inverse, and refits to the same scores."""
    import pickle

    sim = ItemSimilarity.fit(split100k.train)
    blob = pickle.dumps(sim)
    assert len(blob) < 8 * sim._ease._inv.nbytes // 10  # the inverse alone is ~20 MB
    back = pickle.loads(blob)
    history = {int(i): 4.0 for i in split100k.train["item"].unique()[:30]}
    user = int(split100k.train["user"].iloc[0])
    for without in (None, user):
        np.testing.assert_allclose(back.history_scores(history, without=without),
                                   sim.history_scores(history, without=without),
                                   rtol=1e-9, atol=1e-12)
        assert (back.match_percentiles(history, without=without)
                == sim.match_percentiles(history, without=without))


def test_ease_match_agrees_with_lenskit_on_ml100k(split100k) -> None:
    """The closed form against LensKit's EASEScorer, fitted on the same train split."""
    import warnings

    from lenskit.data import from_interactions_df
    from lenskit.knn import EASEScorer

    from simulator.recommenders import keep_torch_threads

    train = split100k.train
    sim = ItemSimilarity.fit(train)
    keep_torch_threads()  # LensKit's first training must not cut this process's torch threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        data = from_interactions_df(train[["user", "item", "rating", "timestamp"]].copy())
    lk = EASEScorer(regularization=MATCH_LAMBDA)
    lk.train(data)
    order = lk.items.numbers(sim.items)
    history = {int(i): 4.0 for i in train.loc[train["user"] == 1, "item"]}
    q = np.zeros(len(sim.items), dtype=np.float32)
    q[np.searchsorted(sim.items, sorted(history))] = 1.0
    np.testing.assert_allclose(sim.history_scores(history), (q @ lk.weights[order][:, order]),
                               rtol=1e-3, atol=1e-5)


def test_neighbours_agree_with_dense_cosine_on_ml100k(split100k) -> None:
    train = split100k.train
    sim = ItemSimilarity.fit(train, n_neighbours=50)
    ids = np.sort(train["item"].unique())
    x = pd.crosstab(train["item"], train["user"]).reindex(ids).to_numpy(dtype=float) > 0
    x = x.astype(float)
    norms = np.linalg.norm(x, axis=1)
    for item in (1, 50, 181, 1000):
        k = int(np.searchsorted(ids, item))
        dense = x @ x[k] / (norms * norms[k])
        dense[k] = -1.0
        order = np.argsort(-dense, kind="stable")
        cut = dense[order[50]]  # the 51st best: anything strictly above must be kept, exactly
        kept = dict(sim.neighbours(item))
        for j in order[:50]:
            if dense[j] > cut + 1e-6:
                assert kept[int(ids[j])] == pytest.approx(dense[j], rel=1e-5)
    held_out = set(split100k.test["item"]) - set(train["item"])
    for item in list(held_out)[:5]:  # items only rated after the split are unknown to evidence
        assert sim.popularity(item) == 0 and sim.neighbours(item) == []


def _hash_embedder(texts: Sequence[str]) -> np.ndarray:
    """Bag of hashed words: texts sharing words are similar; fast and deterministic."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1.0, norms)


def test_memories_are_isolated_between_agents(tmp_path: Path) -> None:
    mem = ChromaMemory(tmp_path / "chroma", embedder=_hash_embedder)
    mem.add("alice", "watched alien and loved the horror", step=1, meta={"item": 7})
    mem.add("bob", "watched toy story with the kids", step=1)
    got = mem.recall("bob", "watched alien and loved the horror", step=2, k=5)
    assert [m.text for m in got] == ["watched toy story with the kids"]
    alice = mem.recall("alice", "alien horror", step=2)
    assert [m.text for m in alice] == ["watched alien and loved the horror"]
    assert alice[0].meta == {"item": 7} and isinstance(alice[0], Memory)
    assert mem.recall("carol", "alien", step=2) == []
    # Persisted: a fresh client on the same folder sees both; reset touches one agent only.
    again = ChromaMemory(tmp_path / "chroma", embedder=_hash_embedder)
    again.reset("alice")
    assert again.recall("alice", "alien horror", step=2) == []
    assert again.count("bob") == 1


def test_recall_ignores_memories_from_later_steps(tmp_path: Path) -> None:
    mem = ChromaMemory(tmp_path, embedder=_hash_embedder)
    mem.add_many("a", ["page one liked drama", "page three liked drama"], steps=[1, 3])
    assert [m.step for m in mem.recall("a", "liked drama", step=2, k=5)] == [1]
    with pytest.raises(ValueError, match="reserved"):
        mem.add("a", "x", step=1, meta={"agent_id": "b"})


@pytest.mark.slow
def test_recency_decay_changes_ranking_with_minilm(tmp_path: Path) -> None:
    old, new = "I loved the space adventure Star Wars", "I watched a family comedy on holiday"
    query = "space adventure movie like Star Wars"
    flat = ChromaMemory(tmp_path / "flat", decay=1.0)
    for m in (flat, ChromaMemory(tmp_path / "decayed", decay=0.5)):
        m.add("u", old, step=0)
        m.add("u", new, step=6)
    no_decay = flat.recall("u", query, step=6, k=2)
    assert [m.text for m in no_decay] == [old, new]  # pure relevance
    decayed = ChromaMemory(tmp_path / "decayed", decay=0.5).recall("u", query, step=6, k=2)
    assert [m.text for m in decayed] == [new, old]
    rel = {m.text: m.score for m in no_decay}
    assert decayed[1].score == pytest.approx(rel[old] * 0.5 ** 6, rel=1e-4)
    assert decayed[0].score == pytest.approx(rel[new], rel=1e-4)
    assert default_embedder() is default_embedder()  # loaded once per process


def test_no_memory_and_factory(tmp_path: Path) -> None:
    none = make_memory("none")
    none.add("a", "anything", step=0)
    assert isinstance(none, NoMemory) and none.recall("a", "anything", step=1) == []
    assert isinstance(make_memory("chroma", tmp_path), ChromaMemory)
    with pytest.raises(ValueError):
        make_memory("chroma")
    with pytest.raises(ValueError):
        make_memory("faiss", tmp_path)  # type: ignore[arg-type]
