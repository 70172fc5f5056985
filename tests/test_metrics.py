"""Metrics against hand-computed cases, so a wrong formula fails here before it reaches a report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.metrics import (
    action_match,
    action_match_mean,
    best_choice,
    binary_scores,
    discriminator_auc,
    distribution_distance,
    explain_scores,
    next_exit_scores,
    next_state_f1,
    next_state_f1_difference,
    next_state_f1_micro,
    paired_diff_ci,
    per_user_mean,
    rank_agreement,
    rank_agreement_boot,
    read_ab_results,
    rmse_mae,
    spearman_ci,
)
from simulator.lists import LIST_SIZES, discrimination_lists


def test_binary_scores_hand_example() -> None:
    # tp=2 (idx 0, 4), fp=1 (idx 2), fn=1 (idx 1), tn=1 (idx 3)
    s = binary_scores([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)


def test_binary_scores_zero_division_is_zero() -> None:
    s = binary_scores([1, 0, 1], [0, 0, 0])
    assert s["precision"] == 0.0 and s["f1"] == 0.0 and s["accuracy"] == pytest.approx(1 / 3)


def test_per_user_mean_is_macro() -> None:
    out = per_user_mean([{"f1": 1.0, "accuracy": 0.5}, {"f1": 0.0, "accuracy": 1.0}])
    assert out == {"f1": 0.5, "accuracy": 0.75, "n_users": 2.0}
    with pytest.raises(ValueError):
        per_user_mean([])


def test_rmse_mae_hand() -> None:
    out = rmse_mae([1, 2, 3], [2, 2, 5])  # errors 1, 0, 2
    assert out["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert out["mae"] == pytest.approx(1.0)


def test_action_match_and_mean() -> None:
    assert action_match({1, 2}, {2, 3}) == {"exact": 0.0, "jaccard": pytest.approx(1 / 3)}
    assert action_match(set(), set()) == {"exact": 1.0, "jaccard": 1.0}
    assert action_match({4}, {4}) == {"exact": 1.0, "jaccard": 1.0}
    mean = action_match_mean([({1, 2}, {2, 3}), ({4}, {4})])
    assert mean["exact"] == 0.5 and mean["jaccard"] == pytest.approx(2 / 3)


def test_next_exit_scores_rewards_no_constant_policy() -> None:
    out = next_exit_scores([0, 0, 0, 1], [0, 0, 0, 0])
    assert out["accuracy"] == 0.75
    assert out["balanced_accuracy"] == 0.5
    assert out["exit_f1"] == 0.0


def test_next_state_f1_difference_is_paired_over_states() -> None:
    """The pooled F1 difference of two predictors on the same states, with a CI over states
    resampled together: equal predictors differ by exactly 0 in every resample."""
    truth = [{("g", "a"), ("g", "b")}, {("g", "c")}, {("r", 1, 4)}]
    good = [(t, t) for t in truth]
    half = [(t, set(list(sorted(t))[:1]) | {("g", "x")}) for t in truth]
    out = next_state_f1_difference(good, half, n_boot=200)
    assert out["difference"] == pytest.approx(1.0 - next_state_f1_micro(half)["f1"])
    assert out["ci"][0] <= out["difference"] <= out["ci"][1]
    assert next_state_f1_difference(half, half, n_boot=50) == {"difference": 0.0,
                                                               "ci": [0.0, 0.0]}
    with pytest.raises(ValueError, match="3 states against 2"):
        next_state_f1_difference(good, half[:2])


def test_next_state_f1_hand() -> None:
    true = {("page", 2), ("watched", 7), ("exit", False)}
    pred = {("page", 2), ("watched", 9)}
    out = next_state_f1(true, pred)  # tp=1, fp=1, fn=2
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(0.4)
    assert next_state_f1(set(), set())["f1"] == 1.0
    micro = next_state_f1_micro([(true, pred), ({("a", 1)}, {("a", 1)})])  # tp=2 fp=1 fn=2
    assert micro["precision"] == pytest.approx(2 / 3)
    assert micro["recall"] == pytest.approx(0.5)
    assert micro["f1"] == pytest.approx(4 / 7)


def test_distribution_distance_hand() -> None:
    shifted = distribution_distance([0, 1, 3], [5, 6, 8])
    assert shifted["w1"] == pytest.approx(5.0)
    assert shifted["ks"] == pytest.approx(1.0)
    # sorted pairs (0,0) and (1,3): mean absolute gap (0 + 2) / 2
    assert distribution_distance([0, 1], [0, 3])["w1"] == pytest.approx(1.0)
    same = distribution_distance([1, 2, 3], [1, 2, 3])
    assert same["w1"] == 0.0 and same["ks"] == 0.0 and same["ks_p"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        distribution_distance([], [1.0])


@pytest.mark.parametrize("model", ["logreg", "gbm"])
def test_discriminator_auc_identical_vs_separated(model: str) -> None:
    rng = np.random.default_rng(0)
    human = rng.normal(size=(400, 3))
    same = discriminator_auc(human, rng.normal(size=(400, 3)), seed=0, model=model)
    assert abs(same["auc"] - 0.5) < 0.1
    apart = discriminator_auc(human, rng.normal(loc=5.0, size=(400, 3)), seed=0, model=model)
    assert apart["auc"] > 0.99
    assert apart["n_folds"] == 5


def test_discriminator_auc_small_and_bad_input() -> None:
    out = discriminator_auc(np.array([0.0, 1.0, 2.0]), np.array([10.0, 11.0, 12.0]), seed=0)
    assert out["n_folds"] == 3 and out["auc"] == 1.0
    with pytest.raises(ValueError):
        discriminator_auc(np.array([0.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        discriminator_auc(np.zeros((4, 2)), np.zeros((4, 3)))


def test_rank_agreement_known_permutation() -> None:
    truth = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}
    swapped = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 5.0, "e": 4.0}  # 9 concordant, 1 discordant
    out = rank_agreement(truth, swapped, n_boot=200, seed=0)
    assert out["kendall_tau"] == pytest.approx(0.8)
    assert out["spearman_rho"] == pytest.approx(1 - 6 * 2 / (5 * 24))
    lo, hi = out["tau_ci"]
    assert lo <= hi <= 1.0
    reverse = rank_agreement(truth, {k: -v for k, v in truth.items()}, n_boot=50)
    assert reverse["kendall_tau"] == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        rank_agreement({"a": 1.0}, {"a": 2.0})


def test_rank_agreement_boot_resamples_users() -> None:
    rng = np.random.default_rng(1)
    users = pd.Index(range(60), name="user")
    recs = ["pop", "mf", "random", "itemknn"]
    truth = pd.DataFrame(rng.normal(size=(60, 4)) * 0.3 + [3.0, 4.0, 1.0, 2.0],
                         index=users, columns=recs)
    pred = truth + rng.normal(scale=0.05, size=truth.shape)
    out = rank_agreement_boot(truth, pred, n_boot=300, seed=0)
    assert out["kendall_tau"] == pytest.approx(1.0)
    assert out["spearman_rho"] == pytest.approx(1.0)
    assert out["tau_ci"][0] <= 1.0 <= out["tau_ci"][1] + 1e-12
    assert out["n_users"] == 60 and out["n_recommenders"] == 4
    noisy = rank_agreement_boot(truth, truth.sample(frac=1.0, axis=1, random_state=3)
                                .set_axis(recs, axis=1), n_boot=300, seed=0)
    assert noisy["tau_ci"][0] <= noisy["kendall_tau"] <= noisy["tau_ci"][1]


def test_paired_diff_ci() -> None:
    b = np.arange(10, dtype=float)
    exact = paired_diff_ci(b + 1.0, b, n_boot=200, seed=0)
    assert exact == {"mean_diff": 1.0, "lo": 1.0, "hi": 1.0, "n": 10.0}
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 1.0, size=300)
    out = paired_diff_ci(a, np.zeros(300), n_boot=500, seed=0)
    assert out["lo"] < out["mean_diff"] < out["hi"]
    assert out["lo"] < 0.5 < out["hi"]
    assert out == paired_diff_ci(a, np.zeros(300), n_boot=500, seed=0)


def test_explain_scores_single_cue_dominates() -> None:
    rng = np.random.default_rng(0)
    feats = pd.DataFrame({"popularity": rng.normal(size=200), "genre_match": rng.normal(size=200),
                          "recency": rng.normal(size=200),
                          "slot": rng.choice(["top", "mid", "low"], size=200)})
    scores = 2.0 * feats["popularity"] + 1.0
    table = explain_scores(scores.to_numpy(), feats,
                           {"popularity": ["popularity"], "taste": ["genre_match", "recency"],
                            "position": ["slot"]}).set_index("group")
    assert table.loc["all features", "r2_alone"] == pytest.approx(1.0)
    assert table.loc["popularity", "r2_alone"] == pytest.approx(1.0)
    assert table.loc["popularity", "r2_drop"] > 0.95
    assert bool(table.loc["popularity", "dominant"])
    assert table.loc["taste", "r2_alone"] < 0.05 and not table.loc["taste", "dominant"]
    assert table.loc["position", "r2_drop"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="unknown feature"):
        explain_scores(scores.to_numpy(), feats, {"x": ["nope"]})


def _split(n_users: int = 30, n_items: int = 200,
           seed: int = 0) -> tuple[pd.DataFrame, dict[int, set[int]]]:
    rng = np.random.default_rng(seed)
    test_rows: list[tuple[int, int]] = []
    train: dict[int, set[int]] = {}
    for u in range(1, n_users + 1):
        n_test = 3 if u % 5 == 0 else 12  # every fifth user has too few for 1:1 and 1:2
        items = rng.choice(np.arange(1, n_items + 1), 40, replace=False)
        train[u] = set(items[n_test:].tolist())
        test_rows += [(u, int(i)) for i in items[:n_test]]
    return pd.DataFrame(test_rows, columns=["user", "item"]).assign(rating=3.0), train


@pytest.mark.parametrize("m", sorted(LIST_SIZES))
def test_discrimination_lists_protocol(m: int) -> None:
    test, train = _split()
    n_pos, n_neg = LIST_SIZES[m]
    lists = discrimination_lists(test, train, list(range(1, 201)), m=m, seed=7)
    test_by_user = test.groupby("user")["item"].apply(set).to_dict()
    eligible = {u for u, s in test_by_user.items() if len(s) >= n_pos}
    assert {u for u, _, _ in lists} == eligible
    shuffled = False
    for user, items, labels in lists:
        assert len(items) == n_pos + n_neg == len(labels) and len(set(items)) == len(items)
        pos = {i for i, y in zip(items, labels, strict=True) if y == 1}
        neg = {i for i, y in zip(items, labels, strict=True) if y == 0}
        assert len(pos) == n_pos and len(neg) == n_neg
        assert pos <= test_by_user[user]
        assert not neg & (test_by_user[user] | train[user])
        shuffled |= labels != sorted(labels, reverse=True)
    assert shuffled
    assert lists == discrimination_lists(test, train, list(range(1, 201)), m=m, seed=7)
    assert lists != discrimination_lists(test, train, list(range(1, 201)), m=m, seed=8)


def test_discrimination_lists_sizes_and_bad_ratio() -> None:
    assert LIST_SIZES == {1: (10, 10), 2: (6, 12), 3: (5, 15), 9: (2, 18)}
    test, train = _split(n_users=5)
    assert len(discrimination_lists(test, train, list(range(1, 201)), m=9, seed=0)) == 5
    assert len(discrimination_lists(test, train, list(range(1, 201)), m=1, seed=0)) == 4
    with pytest.raises(ValueError, match="1:m ratio"):
        discrimination_lists(test, train, list(range(1, 201)), m=4, seed=0)


def test_read_ab_results(tmp_path: Path) -> None:
    good = tmp_path / "ab.csv"
    good.write_text("experiment,variant,value\nhome,pop,0.12\nhome,mf,0.15\n")
    assert read_ab_results(good) == {"pop": 0.12, "mf": 0.15}

    def err(text: str | None, pattern: str, **kw: str) -> None:
        path = tmp_path / "bad.csv"
        if text is not None:
            path.write_text(text)
        with pytest.raises(ValueError, match=pattern) as info:
            read_ab_results(path if text is not None else tmp_path / "missing.csv", **kw)
        assert "\n" not in str(info.value)

    err(None, "not found")
    err("experiment,value\nhome,0.1\n", "missing column.*variant")
    err("experiment,variant,value\nhome,pop,0.1\nhome,mf,high\n", "line 3.*'high'.*not a number")
    err("experiment,variant,value\nhome,pop,\n", "line 2.*not a number")
    err("experiment,variant,value\nhome,pop,1\nhome,pop,2\n", "appears twice")
    err("experiment,variant,value\na,pop,1\nb,pop,2\n", "several experiments")
    err("experiment,variant,value\n", "no rows")
    two = tmp_path / "two.csv"
    two.write_text("experiment,variant,value\na,pop,1\nb,pop,2\nb,mf,3\n")
    assert read_ab_results(two, experiment="b") == {"pop": 2.0, "mf": 3.0}


def test_best_choice_names_the_winner_and_never_a_tie() -> None:
    frame = pd.DataFrame({"a": [0.1, 0.2, 0.3, 0.2], "b": [0.3, 0.4, 0.2, 0.5],
                          "c": [0.0, 0.0, 0.1, np.nan]})
    out = best_choice(frame, n_boot=400, seed=0)
    assert (out["recommender"], out["runner_up"]) == ("b", "a")
    assert out["mean"] == pytest.approx(0.35) and out["lead"] == pytest.approx(0.15)
    assert out["ci"][0] < 0.35 < out["ci"][1] and 0.5 < out["p_first"] < 1.0
    tie = best_choice(pd.DataFrame({"a": [0.0, 0.0, 0.0], "b": [0.0, 0.0, 0.0]}), n_boot=50)
    assert tie["lead"] == 0.0 and tie["p_first"] == 0.0  # first by column order only
    with pytest.raises(ValueError, match="needs >= 2 users"):
        best_choice(frame.iloc[:1])


def test_spearman_ci() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    tied = spearman_ci(x, 3 * x + 1)
    assert tied is not None and tied["rho"] == pytest.approx(1.0) and tied["n"] == 400
    assert tied["ci"] == pytest.approx([1.0, 1.0])
    covered = [spearman_ci(a, b, n_boot=200, seed=k) for k, (a, b) in
               enumerate(rng.normal(size=(20, 2, 100)))]  # independent pairs: rho is 0
    assert sum(c is not None and c["ci"][0] < 0 < c["ci"][1] for c in covered) >= 16
    some = spearman_ci(x, x + rng.normal(size=400), seed=1)
    assert some is not None and 0.5 < some["ci"][0] <= some["rho"] <= some["ci"][1] < 0.9
    assert spearman_ci(x[:2], x[:2]) is None and spearman_ci(x, np.ones(400)) is None
