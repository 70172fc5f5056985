"""Can train ratings alone teach what validation lists reward?

The bar the agent must clear on held-out lists is a logistic regression on its perceived numbers
*fit on validation 1:1 lists*. Training may use train ratings only, so the question is whether
any train-only source teaches a scorer of the same numbers to rank validation lists that well.
Besides the training pages (``evaluation.signal.page_features``) this builds pseudo-lists: a
person's train ratings cut at a time inside their train period, the history before the cut,
positives rated after it, negatives never rated in any part, as a 1:1 list is built from the
periods after train (``simulator.lists``). Scorers fit on either source are scored on every
validation 1:1 list, beside the regression fit on those lists themselves (cross-validated).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from agents.world import World
from evaluation.signal import (
    fit_and_score,
    match_alone,
    page_features,
    sample_users,
    valid_lists,
)
from memory.evidence import FEATURE_NAMES
from simulator.trajectories import experienced

Positives = Literal["next", "later"]


def pseudo_list_features(world: World, users: list[int], *, seed: int, min_history: int = 5,
                         per_user: int = 2, n_pos: int = 10, n_neg: int = 10,
                         positives: Positives = "next", leave_out: bool = True
                         ) -> pd.DataFrame:
    """One row per pseudo-list item: the cues perceived from the train ratings before a cut,
    and whether the person rated it after the cut (``next``: among their next ``n_pos`` train
    ratings; ``later``: ``n_pos`` drawn from all later ones). Cuts fall between two distinct
    timestamps with at least ``min_history`` ratings before and ``n_pos`` after; up to
    ``per_user`` cuts a person. With ``leave_out`` the match is computed without the person's
    own row, as on their training pages (the positives are in it). Only train ratings are
    read, apart from the negatives' exclusion. Each row also names its list, user, item and
    cut (the first timestamp after the history)."""
    sim = world.similarity
    train = world.split.train
    rated = world.rated_in()
    catalogue = np.array(sorted(world.ds.items), dtype=np.int64)
    rng = np.random.default_rng(seed)
    rows, lists = [], 0
    for user in users:
        g = train[train["user"] == user].sort_values("timestamp", kind="stable")
        ts = g["timestamp"].to_numpy()
        items, ratings = g["item"].astype(int).to_numpy(), g["rating"].to_numpy(dtype=float)
        cuts = [k for k in range(max(min_history, 1), len(g) - n_pos + 1) if ts[k] > ts[k - 1]]
        pool = catalogue[~np.isin(catalogue, sorted(rated.get(user, set())))]
        if not cuts or len(pool) < n_neg:
            continue
        for k in sorted(rng.choice(cuts, size=min(per_user, len(cuts)), replace=False)):
            history = dict(zip(items[:k].tolist(), ratings[:k].tolist(), strict=True))
            after = items[k:k + n_pos] if positives == "next" else items[k:]
            pos = rng.choice(after, n_pos, replace=False)
            neg = rng.choice(pool, n_neg, replace=False)
            match = sim.match_percentiles(history, without=user if leave_out else None)
            rows += [{**sim.features(int(i), history, match), "label": y, "list": lists,
                      "user": user, "item": int(i), "cut": int(ts[k])}
                     for i, y in [*((i, 1) for i in pos), *((i, 0) for i in neg)]]
            lists += 1
    return pd.DataFrame(rows)


def validation_bar(valid, folds: int = 5) -> float:
    """Mean per-list AUC of the regression on the perceived numbers fit on validation lists,
    each list scored by a fit on the other folds: the bar's own footing, which no train-only
    source has."""
    names = list(FEATURE_NAMES)
    aucs = []
    for f in range(folds):
        fit = [v for j, v in enumerate(valid) if j % folds != f]
        lr = LogisticRegression(max_iter=2000).fit(pd.concat([x for _, x in fit])[names],
                                                   np.concatenate([y for y, _ in fit]))
        aucs += [roc_auc_score(y, lr.decision_function(x[names]))
                 for j, (y, x) in enumerate(valid) if j % folds == f and len(set(y)) > 1]
    return float(np.mean(aucs))


def pseudo_list_regression(world: World, *, users: int, min_history: int,
                           seed: int = 0) -> pd.DataFrame:
    """Per train-only source (training pages; pseudo-lists with the next or any later ratings as
    positives, with and without the person's row in the match), the two scorers of
    ``evaluation.signal`` fit on it and scored on every validation 1:1 list; attrs carry the
    match alone and the validation-fit bar on the same lists."""
    valid = valid_lists(world, seed)
    chosen = sample_users(world, users, seed)
    pages = page_features(world, experienced(
        world.trajectories("train", users=chosen, progress=False), world.split.train,
        min_history))
    sources = {"training pages (default)": pages}
    for name, kw in (("pseudo-lists, next 10 ratings", {}),
                     ("pseudo-lists, any 10 later ratings", {"positives": "later"}),
                     ("pseudo-lists, next 10, the person's row in the match",
                      {"leave_out": False})):
        sources[name] = pseudo_list_features(world, chosen, seed=seed,
                                             min_history=min_history, **kw)
    rows = [{"source": name, "rows": len(frame), "positive_share": float(frame["label"].mean()),
             **fit_and_score(frame, valid)} for name, frame in sources.items()]
    out = pd.DataFrame(rows)
    out.attrs.update(users=len(chosen), lists=len(valid), match_alone=match_alone(valid),
                     validation_bar=validation_bar(valid))
    return out
