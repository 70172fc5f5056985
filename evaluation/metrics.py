"""Fidelity metrics on plain data (arrays, frames, dicts), so they can be tested without agents.

Every function returns plain floats in dicts, ready for ``metrics.json`` and the report.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    precision_score,
    recall_score,
    root_mean_squared_error,
)
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits


def binary_scores(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "f1": float(f1_score(y_true, y_pred, zero_division=0))}


def per_user_mean(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Macro average, as Agent4Rec reports: every user weighs the same whatever their list."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("per_user_mean: no per-user rows to average")
    out = {k: float(v) for k, v in frame.mean(numeric_only=True).items()}
    out["n_users"] = len(frame)
    return out


def rmse_mae(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    return {"rmse": float(root_mean_squared_error(y_true, y_pred)),
            "mae": float(mean_absolute_error(y_true, y_pred)), "n": len(y_true)}


def action_match(true_watched: set[Hashable], pred_watched: set[Hashable]) -> dict[str, float]:
    """Page-level agreement; two empty sets agree fully, since skipping a page is a choice."""
    union = true_watched | pred_watched
    jaccard = len(true_watched & pred_watched) / len(union) if union else 1.0
    return {"exact": float(true_watched == pred_watched), "jaccard": float(jaccard)}


def action_match_mean(pairs: Iterable[tuple[set[Hashable], set[Hashable]]]) -> dict[str, float]:
    return per_user_mean(action_match(t, p) for t, p in pairs)


def next_exit_scores(true_exit: Sequence[bool], pred_exit: Sequence[bool]) -> dict[str, float]:
    """Next-vs-exit decisions; balanced accuracy since 'always go on' wins on raw accuracy."""
    yt, yp = np.asarray(true_exit, dtype=int), np.asarray(pred_exit, dtype=int)
    if len(yt) == 0:
        raise ValueError("next_exit_scores: no decisions to score")
    return {"accuracy": float(accuracy_score(yt, yp)),
            "balanced_accuracy": float(balanced_accuracy_score(yt, yp)),
            "exit_f1": float(f1_score(yt, yp, zero_division=0)), "n": len(yt)}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    if tp + fp + fn == 0:  # both states empty: nothing to get wrong
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def next_state_f1(true_fields: set[Hashable], pred_fields: set[Hashable]) -> dict[str, float]:
    """Set F1 over (field, value) tuples, so a state counts as matched field by field."""
    tp = len(true_fields & pred_fields)
    return _prf(tp, len(pred_fields) - tp, len(true_fields) - tp)


def next_state_f1_micro(pairs: Iterable[tuple[set[Hashable], set[Hashable]]]) -> dict[str, float]:
    """Pooled counts over transitions, so large states weigh by their number of fields."""
    tp = fp = fn = 0
    for true_fields, pred_fields in pairs:
        hit = len(true_fields & pred_fields)
        tp, fp, fn = tp + hit, fp + len(pred_fields) - hit, fn + len(true_fields) - hit
    return _prf(tp, fp, fn)


def next_state_f1_difference(pairs: Sequence[tuple[set, set]],
                             baseline: Sequence[tuple[set, set]], n_boot: int = 1000,
                             seed: int = 0, level: float = 0.95) -> dict[str, object]:
    """Pooled F1 of ``pairs`` minus ``baseline``'s on the same states (one pair each, in the
    same order), with a percentile bootstrap CI over the states, resampled together."""
    def counts(prs: Sequence[tuple[set, set]]) -> np.ndarray:
        return np.asarray([(len(t & p), len(p - t), len(t - p)) for t, p in prs],
                          dtype=float).reshape(-1, 3)

    a, b = counts(pairs), counts(baseline)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} states against {len(b)} for the baseline")

    def diff(idx: np.ndarray) -> float:
        return _prf(*a[idx].sum(axis=0))["f1"] - _prf(*b[idx].sum(axis=0))["f1"]

    if not len(a):
        return {"difference": 0.0, "ci": None}
    rng = np.random.default_rng(seed)
    boot = np.asarray([diff(idx) for idx in rng.integers(0, len(a), (n_boot, len(a)))])
    return {"difference": diff(np.arange(len(a))), "ci": _ci(boot, level)}


def distribution_distance(human: Sequence[float], sim: Sequence[float]) -> dict[str, float]:
    h, s = np.asarray(human, dtype=float), np.asarray(sim, dtype=float)
    if h.size == 0 or s.size == 0:
        raise ValueError("distribution_distance: both samples must be non-empty")
    ks = stats.ks_2samp(h, s)
    return {"w1": float(stats.wasserstein_distance(h, s)), "ks": float(ks.statistic),
            "ks_p": float(ks.pvalue), "mean_human": float(h.mean()), "mean_sim": float(s.mean()),
            "n_human": int(h.size), "n_sim": int(s.size)}


def discriminator_auc(human_feats: np.ndarray, sim_feats: np.ndarray, seed: int = 0,
                      model: str = "logreg") -> dict[str, float]:
    """Cross-validated ROC AUC of a classifier telling humans from agents; 0.5 = indistinguishable.

    ``model`` is ``logreg`` (scaled logistic regression) or ``gbm`` (gradient boosting), the
    latter catching non-linear giveaways a linear probe misses.
    """
    h = np.asarray(human_feats, dtype=float).reshape(len(human_feats), -1)
    s = np.asarray(sim_feats, dtype=float).reshape(len(sim_feats), -1)
    if h.shape[1] != s.shape[1]:
        raise ValueError(f"feature widths differ: human {h.shape[1]}, sim {s.shape[1]}")
    folds = min(5, len(h), len(s))
    if folds < 2:
        raise ValueError("discriminator_auc needs at least 2 samples of each kind")
    if model == "logreg":
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    elif model == "gbm":
        clf = HistGradientBoostingClassifier(random_state=seed)
    else:
        raise ValueError(f"model must be 'logreg' or 'gbm', got {model!r}")
    x = np.vstack([h, s])
    y = np.r_[np.zeros(len(h), dtype=int), np.ones(len(s), dtype=int)]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # Session sets are small: OpenMP threads cost more than they give and starve other workers.
    with threadpool_limits(limits=1, user_api="openmp"):
        aucs = cross_val_score(clf, x, y, cv=cv, scoring="roc_auc")
    return {"auc": float(aucs.mean()), "auc_std": float(aucs.std()), "n_folds": folds}


def _tau_rho(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant ranking has no order to agree with
        return float("nan"), float("nan")
    return (float(stats.kendalltau(x, y).statistic), float(stats.spearmanr(x, y).statistic))


def _ci(values: np.ndarray, level: float) -> list[float]:
    alpha = (1 - level) / 2 * 100
    if np.all(np.isnan(values)):
        return [float("nan"), float("nan")]
    return [float(v) for v in np.nanpercentile(values, [alpha, 100 - alpha])]


def rank_agreement(truth: Mapping[str, float], predicted: Mapping[str, float],
                   n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, object]:
    """Order agreement between true and simulated recommender scores.

    Its CIs resample recommenders, which is crude with a handful of them; prefer
    ``rank_agreement_boot`` whenever per-user values exist.
    """
    keys = sorted(set(truth) & set(predicted))
    if len(keys) < 2:
        raise ValueError("rank_agreement needs at least 2 recommenders scored by both")
    x = np.array([truth[k] for k in keys], dtype=float)
    y = np.array([predicted[k] for k in keys], dtype=float)
    tau, rho = _tau_rho(x, y)
    rng = np.random.default_rng(seed)
    boots = np.array([_tau_rho(x[i], y[i]) for i in
                      (rng.integers(0, len(keys), len(keys)) for _ in range(n_boot))])
    return {"kendall_tau": tau, "spearman_rho": rho, "tau_ci": _ci(boots[:, 0], level),
            "rho_ci": _ci(boots[:, 1], level), "n_recommenders": len(keys)}


def rank_agreement_boot(truth_per_user: pd.DataFrame, pred_per_user: pd.DataFrame,
                        n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, object]:
    """Agreement of recommender orderings with CIs from resampling users (rows, paired).

    Frames are users x recommenders; only shared users and recommenders count. A NaN cell (user
    not evaluated under a recommender) is left out of that column's mean.
    """
    users = truth_per_user.index.intersection(pred_per_user.index)
    recs = sorted(set(truth_per_user.columns) & set(pred_per_user.columns))
    if len(recs) < 2 or len(users) < 2:
        raise ValueError("rank_agreement_boot needs >= 2 shared users and >= 2 recommenders")
    t = truth_per_user.loc[users, recs].to_numpy(dtype=float)
    p = pred_per_user.loc[users, recs].to_numpy(dtype=float)
    tau, rho = _tau_rho(np.nanmean(t, axis=0), np.nanmean(p, axis=0))
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        for b in range(n_boot):
            idx = rng.integers(0, len(users), len(users))
            boots[b] = _tau_rho(np.nanmean(t[idx], axis=0), np.nanmean(p[idx], axis=0))
    return {"kendall_tau": tau, "spearman_rho": rho, "tau_ci": _ci(boots[:, 0], level),
            "rho_ci": _ci(boots[:, 1], level), "n_users": len(users), "n_recommenders": len(recs)}


def _strictly_first(boot: np.ndarray, best: int) -> float:
    """Share of resamples where ``best`` beats every other column outright (a tie is no win)."""
    boot = np.nan_to_num(boot, nan=-np.inf)
    if boot.shape[1] == 1:
        return 1.0
    others = np.delete(boot, best, axis=1).max(axis=1)
    return float(np.mean(boot[:, best] > others))


def best_choice(per_user: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict[str, object]:
    """The recommender a users x recommenders outcome table would ship, with a CI of its mean,
    its lead over the runner-up (paired, users resampled), and how often it stays first."""
    frame = per_user.dropna(how="all")
    if frame.shape[1] < 1 or len(frame) < 2:
        raise ValueError("best_choice needs >= 2 users and >= 1 recommender")
    values = frame.to_numpy(dtype=float)
    means = np.nanmean(values, axis=0)
    order = np.argsort(-means, kind="stable")
    best = int(order[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(frame), (n_boot, len(frame)))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a column entirely
        boot = np.stack([np.nanmean(values[i], axis=0) for i in idx])
    out: dict[str, object] = {"recommender": str(frame.columns[best]), "mean": float(means[best]),
                              "ci": _ci(boot[:, best], level),
                              "p_first": _strictly_first(boot, best),
                              "n_users": len(frame)}
    if len(order) > 1:
        second = int(order[1])
        out |= {"runner_up": str(frame.columns[second]),
                "lead": float(means[best] - means[second]),
                "lead_ci": _ci(boot[:, best] - boot[:, second], level)}
    return out


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict[str, float] | None:
    """Spearman's rho of paired values with a percentile bootstrap CI (pairs resampled); None
    with fewer than 3 pairs or a constant side, where no order can agree."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    rng = np.random.default_rng(seed)
    boot = []
    for idx in rng.integers(0, a.size, (n_boot, a.size)):
        boot.append(_tau_rho(a[idx], b[idx])[1])
    return {"rho": _tau_rho(a, b)[1], "ci": _ci(np.asarray(boot), level), "n": int(a.size)}


def paired_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, float]:
    """Mean of per-user a - b with a percentile bootstrap CI (users are the unit of sampling)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        raise ValueError("paired_diff_ci needs at least 2 paired values")
    if np.ptp(d) == 0:
        lo = hi = float(d[0])
    else:
        res = stats.bootstrap((d,), np.mean, n_resamples=n_boot, method="percentile",
                              confidence_level=level, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"mean_diff": float(d.mean()), "lo": lo, "hi": hi, "n": int(d.size)}


def _r2(x: pd.DataFrame, y: np.ndarray) -> float:
    if x.shape[1] == 0 or np.ptp(y) == 0:
        return 0.0
    return float(LinearRegression().fit(x, y).score(x, y))


def explain_scores(scores: Sequence[float], features: pd.DataFrame,
                   groups: Mapping[str, list[str]]) -> pd.DataFrame:
    """How much of the agent's behaviour each cue group explains (in-sample linear R²).

    ``r2_alone`` is the group's own R² (``share_of_full`` relative to all features); ``r2_drop``
    the loss when it is removed (its unique share).
    ``dominant`` flags a group explaining over 90% alone: a policy that is one cue in disguise.
    Non-numeric columns are one-hot encoded.
    """
    y = np.asarray(scores, dtype=float)
    if len(y) != len(features):
        raise ValueError(f"{len(y)} scores but {len(features)} feature rows")
    missing = sorted({c for cols in groups.values() for c in cols} - set(features.columns))
    if missing:
        raise ValueError(f"explain_scores: unknown feature column(s) {', '.join(missing)}")
    encoded = {c: pd.get_dummies(features[[c]], drop_first=True, dtype=float)
               if not pd.api.types.is_numeric_dtype(features[c]) else features[[c]].astype(float)
               for c in features.columns}

    def design(cols: Iterable[str]) -> pd.DataFrame:
        parts = [encoded[c] for c in cols]
        return pd.concat(parts, axis=1) if parts else pd.DataFrame(index=features.index)

    full = _r2(design(features.columns), y)
    rows = [{"group": "all features", "n_features": len(features.columns), "r2_alone": full,
             "share_of_full": 1.0, "r2_without": float("nan"), "r2_drop": float("nan"),
             "dominant": False}]
    for name, cols in groups.items():
        alone = _r2(design(cols), y)
        without = _r2(design([c for c in features.columns if c not in cols]), y)
        rows.append({"group": name, "n_features": len(cols), "r2_alone": alone,
                     "share_of_full": alone / full if full > 0 else float("nan"),
                     "r2_without": without, "r2_drop": full - without, "dominant": alone > 0.9})
    return pd.DataFrame(rows)


def read_ab_results(path: str | Path, experiment: str | None = None) -> dict[str, float]:
    """Variant -> outcome from a user's A/B CSV (``experiment,variant,value``).

    With several experiments in one file, ``experiment`` must pick one, since variants of
    different experiments are not comparable on one ranking.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"A/B results file not found: {p}")
    try:
        frame = pd.read_csv(p, dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("experiment", "variant", "value") if c not in frame.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {', '.join(missing)}; "
                         "expected header experiment,variant,value")
    if frame.empty:
        raise ValueError(f"{p}: no rows")
    values = pd.to_numeric(frame["value"], errors="coerce")
    bad = values.isna() | ~np.isfinite(values.fillna(0))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{p}: line {i + 2}: value {frame['value'].iloc[i]!r} is not a number")
    frame = frame.assign(value=values)
    names = sorted(frame["experiment"].unique())
    if experiment is None and len(names) > 1:
        raise ValueError(f"{p}: several experiments ({', '.join(names)}); choose one")
    chosen = experiment if experiment is not None else names[0]
    sub = frame[frame["experiment"] == chosen]
    if sub.empty:
        raise ValueError(f"{p}: no rows for experiment {chosen!r}; found {', '.join(names)}")
    dup = sub["variant"][sub["variant"].duplicated()]
    if not dup.empty:
        raise ValueError(f"{p}: variant {dup.iloc[0]!r} appears twice in experiment {chosen!r}")
    return {str(v): float(x) for v, x in zip(sub["variant"], sub["value"], strict=True)}
