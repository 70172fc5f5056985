"""The signal check: do the cues the agent perceives point the same way on training pages as on
held-out lists, and which filler mixture teaches what validation lists reward?

The world is the 40-user ml-100k ``small_world`` (conftest).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from agents.world import World
from evaluation.signal import exposure_regression, inverted, signal_table
from memory.evidence import FEATURE_NAMES
from simulator.trajectories import TrajectoryConfig


def _table(train: Sequence[float], valid: Sequence[float]) -> pd.DataFrame:
    return pd.DataFrame({"feature": list(FEATURE_NAMES)[:len(train)],
                         "train_pages": list(train), "valid_lists": list(valid)})


def test_inverted_flags_features_on_opposite_sides_of_one_half() -> None:
    consistent = _table([0.8, 0.6, 0.45, 0.5], [0.75, 0.55, 0.4, 0.7])
    assert inverted(consistent) == []  # exactly .5 is on neither side
    flipped = _table([0.8, 0.37, 0.42, 0.52, float("nan")], [0.75, 0.52, 0.6, 0.48, 0.2])
    assert inverted(flipped) == ["mean_rating", "max_sim", "mean_sim_top3"]
    # NaN (one class missing) is never called inverted; a margin ignores near-ties.
    assert inverted(flipped, margin=0.05) == ["max_sim"]


def test_signal_table_on_the_small_world(small_world: World) -> None:
    table = signal_table(small_world, users=10, seed=0)
    assert list(table.columns) == ["feature", "train_pages", "valid_lists"]
    assert list(table["feature"]) == list(FEATURE_NAMES)
    assert table[["train_pages", "valid_lists"]].apply(lambda c: c.between(0, 1)).all().all()
    assert table.attrs["users"] == 10 and table.attrs["slots"] > 1000
    assert 0.2 < table.attrs["watch_ratio"] < 0.4  # ~1.15 of 4 slots, as configured
    # The default exposure mixture: no cue teaches the opposite of what held-out lists reward.
    assert inverted(table) == [], table.to_string()
    # Popularity and the collaborative match point the humans' way on both.
    rows = table.set_index("feature")
    assert (rows.loc[["popularity", "match"]] > 0.6).all().all()


def test_signal_check_catches_a_one_recommender_construction(small_world: World) -> None:
    """Fillers from ItemKNN alone are picked for looking like the history, so on the training
    pages the humans' choices have lower mean ratings than the fillers: the inverse of the
    lists. The check exists to catch exactly this."""
    table = signal_table(small_world, TrajectoryConfig(exposure={"itemknn": 1.0}), users=10,
                         seed=0)
    assert "mean_rating" in inverted(table), table.to_string()


def test_recommender_fillers_make_the_best_matches_look_skipped(small_world: World) -> None:
    """A recommender's picks are the items that best match the person; as skipped fillers they
    lower the watch ratio of the best-matching slots, the opposite of held-out lists, where the
    best matches are the likeliest picks. The default mixture keeps them the most watched."""
    table = exposure_regression(small_world, {"default": TrajectoryConfig().exposure,
                                              "itemknn": {"itemknn": 1.0}},
                                users=20, min_history=1, seed=0).set_index("exposure")
    assert (table["slots"] > 500).all(), table.to_string()
    assert table.loc["default", "watch_match_95_101"] > \
        table.loc["itemknn", "watch_match_95_101"] + 0.1, table.to_string()
    rates = table.loc["default", ["watch_match_80_90", "watch_match_90_95",
                                  "watch_match_95_101"]]
    # No dip at the top: the best-matching bin is watched at least as often as the others, up to
    # about one slot of the few dozen a bin holds on this 20-user fixture.
    assert rates.iloc[-1] >= rates.max() - 0.02, table.to_string()
    assert rates.iloc[-1] > rates.iloc[0] + 0.1, table.to_string()
    aucs = table[["valid_list_auc", "valid_list_auc_trees"]]
    assert aucs.loc["default"].between(0.5, 1).all(), table.to_string()
    # Fit on ItemKNN's fillers, the regression ranks validation lists worse than on the default.
    assert (aucs.loc["itemknn"] < aucs.loc["default"]).all(), table.to_string()


def test_training_pages_perceive_a_match_fitted_without_the_person(small_world: World) -> None:
    """A train page's labels are in the person's own train row; the match on it must come from
    a fit without that row, while held-out pages (labels outside train) use the full fit."""
    from agents.transition import transitions

    world = small_world
    train = world.split.train
    trajs = world.trajectories("train", users=[1, 2, 3, 4], progress=False)
    firsts = [t for t in trajs if t.steps][:6]
    trs = [tr for tr in transitions(firsts, world) if tr.page == 1]
    assert len(trs) == len(firsts)
    moved = 0
    for t, tr in zip(firsts, trs, strict=True):
        rows = train[(train["user"] == t.user) & (train["timestamp"] < t.start)]
        past = dict(zip(rows["item"].astype(int), rows["rating"].astype(float), strict=True))
        seen = [v.match for v in tr.views]
        loo = world.similarity.match_percentiles(past, without=t.user)
        full = world.similarity.match_percentiles(past)
        assert seen == [loo.get(i, 0) for i in t.steps[0].items]
        moved += seen != [full.get(i, 0) for i in t.steps[0].items]
    assert moved  # the person's own row does move the match
    held = world.trajectories("valid", users=[1, 2], progress=False)[:1]
    tr = transitions(held, world, full_history=True)[0]
    full = world.similarity.match_percentiles(world.histories[held[0].user])
    assert [v.match for v in tr.views] == [full.get(i, 0) for i in held[0].steps[0].items]


def test_match_variants_show_the_leak_of_the_persons_own_row(small_world: World) -> None:
    from evaluation.signal import match_regression

    table = match_regression(small_world, users=20, min_history=1, seed=0).set_index("match")
    assert len(table) == 4 and (table["slots"] > 500).all(), table.to_string()
    with_row = table.loc["EASE, the person's row in the fit"]
    without = table.loc["EASE, without the person's row (default)"]
    refit = table.loc["every cue without the person's row"]
    # Same pages and lists: only the training-page match differs.
    assert with_row["valid_list_match_auc"] == without["valid_list_match_auc"]
    assert with_row["train_page_auc"] > without["train_page_auc"] + 0.02, table.to_string()
    # The refit variant keeps the default's match and takes the row out of the cosine cues,
    # which then separate the person's choices less well.
    assert refit["train_page_auc"] == without["train_page_auc"]
    for cue in ("max_sim", "n_similar", "close_watched"):
        assert refit[f"train_page_auc_{cue}"] < without[f"train_page_auc_{cue}"], cue
    aucs = table[["train_page_auc", "valid_list_match_auc", "valid_list_auc"]]
    assert aucs.apply(lambda c: c.between(0.5, 1)).all().all(), table.to_string()


def test_match_lambdas_lists_the_cosine_and_each_weight(small_world: World) -> None:
    from evaluation.signal import match_lambdas

    table = match_lambdas(small_world, [10.0, 1000.0], seed=0)
    assert list(table["match"]) == ["summed cosine", "EASE, lambda 10", "EASE, lambda 1000"]
    assert table["valid_list_match_auc"].between(0.5, 1).all(), table.to_string()
    assert table["valid_list_match_auc"].nunique() == 3  # each weight gives its own ranking


def test_page_count_regression_compares_constructions_on_the_same_lists(
        small_world: World) -> None:
    from evaluation.signal import page_count_regression

    table = page_count_regression(
        small_world, {"capped": {"watch_probs": (0.2, 0.45, 0.35)},
                      "independent": {"watch_probs": None}},
        users=40, min_history=1, seed=0).set_index("pages")
    assert list(table.index) == ["capped", "independent"]
    assert (table["slots"] > 500).all() and table["slots"].nunique() == 2, table.to_string()
    cols = ["valid_list_auc_own", "valid_list_auc_mates", "valid_list_auc_trees"]
    assert table[cols].apply(lambda c: c.between(0.5, 1)).all().all(), table.to_string()
    assert np.isfinite(table["pull"]).all() and np.isfinite(table.attrs["list_pull"])
    # The page-mates' column changes what the regression sees.
    assert (table["valid_list_auc_own"] != table["valid_list_auc_mates"]).any()


def test_pseudo_lists_read_train_ratings_only(small_world: World) -> None:
    """A pseudo-list's history is the person's train ratings before the cut, its positives are
    their next train ratings from the cut on, and its negatives were never rated in any part;
    its cues are those of that history, the match without the person's own row."""
    from evaluation.pseudo_lists import pseudo_list_features

    users = sorted(int(u) for u in small_world.split.train["user"].unique())[:8]
    frame = pseudo_list_features(small_world, users, seed=0, per_user=2, n_pos=5, n_neg=5)
    assert frame["list"].nunique() >= 8
    assert frame.groupby("list")["label"].agg(["sum", "count"]).eq([5, 10]).all().all()
    train, sim = small_world.split.train, small_world.similarity
    rated = small_world.rated_in()
    for (user, cut), rows in frame.groupby(["user", "cut"]):
        g = train[train["user"] == user].sort_values("timestamp", kind="stable")
        before, after = g[g["timestamp"] < cut], g[g["timestamp"] >= cut]
        assert len(before) >= 5
        pos, neg = rows.loc[rows["label"] == 1, "item"], rows.loc[rows["label"] == 0, "item"]
        assert set(pos) <= set(after["item"].head(5)) and not set(pos) & set(before["item"])
        assert not set(neg) & rated[user]
        history = dict(zip(before["item"].astype(int), before["rating"], strict=True))
        match = sim.match_percentiles(history, without=user)
        expected = pd.DataFrame([sim.features(int(i), history, match) for i in rows["item"]])
        np.testing.assert_allclose(rows[list(FEATURE_NAMES)].to_numpy(float),
                                   expected[list(FEATURE_NAMES)].to_numpy(float))


def test_pseudo_lists_keep_the_person_row_in_the_match_only_when_asked(
        small_world: World) -> None:
    from evaluation.pseudo_lists import pseudo_list_features

    users = sorted(int(u) for u in small_world.split.train["user"].unique())[:8]
    kw = {"seed": 3, "per_user": 1, "n_pos": 4, "n_neg": 4, "positives": "later"}
    out = pseudo_list_features(small_world, users, **kw)
    kept = pseudo_list_features(small_world, users, **kw, leave_out=False)
    others = [c for c in out.columns if c != "match"]
    pd.testing.assert_frame_equal(out[others], kept[others])  # the same draw
    # The positives are in the person's row: with it in the fit they match better.
    assert (kept.loc[kept["label"] == 1, "match"].mean()
            > out.loc[out["label"] == 1, "match"].mean())
