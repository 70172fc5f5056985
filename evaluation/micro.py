"""Step-wise fidelity on held-out humans: 1:m discrimination, ratings, next action, next state.

Every method answers the same lists and pages. LLM agents see what they would see when running
(persona, page facts, their own evidence from the train split, world-model predictions when on)
and decide greedily; their watch score is log P(watch) - log P(skip) and they say yes when it is
positive, as an agent browsing would. Baselines score the same items and get one threshold tuned
on validation 1:1 lists (accuracy). AUC is reported beside F1 because it needs no threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from agents.browse import accuracy_cut
from agents.text import NextState
from agents.transition import Transition
from agents.world import World
from agents.world_model import read_next_state
from evaluation.metrics import (
    action_match,
    action_match_mean,
    binary_scores,
    next_exit_scores,
    next_state_f1_difference,
    next_state_f1_micro,
    per_user_mean,
    rmse_mae,
)
from memory.evidence import FEATURE_NAMES

ItemScorer = Callable[[int, Sequence[int]], np.ndarray]


def feature_frame(world: World, user: int, items: Sequence[int]) -> pd.DataFrame:
    history = world.histories.get(user, {})
    match = world.similarity.match_percentiles(history)
    return pd.DataFrame([world.similarity.features(i, history, match) for i in items],
                        columns=list(FEATURE_NAMES))


def baseline_scorers(world: World, valid_lists, seed: int = 0) -> dict[str, ItemScorer]:
    """Random, popularity, ItemKNN, BPR and EASE scores, and a logistic regression on the
    numeric evidence the agent perceives (fit on validation lists: the bar an LLM must clear).
    EASE is here because the agent's match percentile is EASE's score (``memory.evidence``)."""
    counts = world.split.train["item"].value_counts()
    rng_seed = [seed]

    def rand(user: int, items: Sequence[int]) -> np.ndarray:
        return np.random.default_rng([*rng_seed, user, len(items)]).random(len(items))

    def pop(user: int, items: Sequence[int]) -> np.ndarray:
        return np.asarray([float(counts.get(i, 0)) for i in items])

    def rec(name: str) -> ItemScorer:
        model = world.recommender(name, reactive=False, seed=seed)
        return lambda user, items: np.asarray(model.scores(user, list(items)), dtype=float)

    x = pd.concat([feature_frame(world, u, items) for u, items, _ in valid_lists])
    y = np.concatenate([labels for _, _, labels in valid_lists])
    lr = LogisticRegression(max_iter=1000).fit(x, y)

    def features_lr(user: int, items: Sequence[int]) -> np.ndarray:
        return lr.decision_function(feature_frame(world, user, items))

    return {"random": rand, "popularity": pop, "itemknn": rec("itemknn"), "bpr": rec("bpr"),
            "ease": rec("ease"), "feature regression": features_lr}


def _threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The baselines' cut: the one maximising accuracy of ``score >= cut``."""
    return accuracy_cut(scores, labels)


def discrimination(methods: Mapping[str, ItemScorer], valid_lists, test_lists: Mapping[int, list],
                   fixed: Mapping[str, float] | None = None,
                   ) -> tuple[list[dict], dict[str, dict[int, dict]]]:
    """Rows per (method, m) and per-user results for paired comparisons.

    Scorers without a natural yes/no get the accuracy-maximising cut on validation lists; a
    method in ``fixed`` keeps its own cut (an agent says watch when log-odds > 0)."""
    rows, per_user = [], {}
    fixed = fixed or {}
    for name, score in methods.items():
        if name in fixed:
            cut = fixed[name]
        else:
            v_scores = np.concatenate([score(u, items) for u, items, _ in valid_lists])
            v_labels = np.concatenate([labels for _, _, labels in valid_lists])
            cut = _threshold(v_scores, v_labels)
        per_user[name] = {}
        for m, lists in test_lists.items():
            user_rows = []
            for u, items, labels in tqdm(lists, desc=f"{name} 1:{m}", unit="list", leave=False):
                s = score(u, items)
                r = binary_scores(labels, (s >= cut).astype(int))
                r["auc"] = float(roc_auc_score(labels, s)) if len(set(labels)) > 1 else 0.5
                user_rows.append(r)
                per_user[name].setdefault(m, {})[u] = r
            rows.append({"method": name, "m": f"1:{m}", **per_user_mean(user_rows),
                         "threshold": round(cut, 4)})
    return rows, per_user


def page_metrics(world: World, trs: Sequence[Transition], outputs: Mapping[str, Mapping],
                 explained: str | None) -> dict:
    """Next action and ratings on held-out pages (the human's session so far given) for every
    method, beside popularity and the classical rating predictors; and what ``explained``'s
    watch scores depend on."""
    from simulator.offline import rating_predictions

    pairs = pd.DataFrame([(tr.user, tr.items[s - 1]) for tr in trs for s in tr.ratings],
                         columns=["user", "item"])
    mf = rating_predictions(world.split.train, pairs) if len(pairs) else {}
    y = [r for tr in trs for r in tr.ratings.values()]
    rating_rows = [{"method": k, **rmse_mae(y, v)} for k, v in mf.items()]
    counts, top = world.popularity
    na_rows = [{"method": "popularity", **baseline_actions(
        trs, lambda tr: {s for s, i in enumerate(tr.items, 1) if counts.get(i, 0) >= top},
        lambda tr, s: float(np.clip(world.similarity.mean_rating(tr.items[s - 1]) or 3.5, 1, 5)))}]
    out: dict = {}
    for name, o in outputs.items():
        pages, ratings = o["pages"], o["ratings"]
        pred = [set(p["watched"]) for p in pages]
        shown = sum(len(tr.items) for tr in trs)
        res = {**{f"action_{k}": v for k, v in action_match_mean(
            [(set(tr.ratings), w) for tr, w in zip(trs, pred, strict=True)]).items()},
               **{f"then_{k}": v for k, v in next_exit_scores(
                   [tr.then == "exit" for tr in trs],
                   [p["then"] == "exit" for p in pages]).items()},
               "watch_ratio": sum(map(len, pred)) / max(shown, 1),
               "human_watch_ratio": sum(len(tr.ratings) for tr in trs) / max(shown, 1)}
        na_rows.append({"method": name, **res})
        y_pred = [r[int(s)] if int(s) in r else r[str(s)]
                  for tr, r in zip(trs, ratings, strict=True) for s in tr.ratings]
        rating_rows.append({"method": name, **rmse_mae(y, y_pred)})
        if name == explained:
            scored = [{"score": p["watch_scores"][k] if k in p["watch_scores"]
                       else p["watch_scores"][str(k)], "watched": int(k in tr.ratings), **f}
                      for tr, p in zip(trs, pages, strict=True)
                      for k, f in enumerate(slot_features(tr), 1)]
            if scored:
                from evaluation.run import explain

                out["explain"] = {"rows": explain(scored).to_dict("records"),
                                  "note": f"regression of {explained}'s watch scores on what it "
                                          "perceived on held-out pages"}
    out["next_action"] = {"rows": na_rows, "note": f"{len(trs)} held-out pages "
                          "(exposure-mixture pages, human session given)"}
    out["rating"] = {"rows": rating_rows, "note": "raw 1-5 held-out ratings of watched items"}
    return out


def page_match_by_user(trs: Sequence[Transition], outputs: Mapping[str, Mapping]
                       ) -> dict[str, dict[int, dict[str, float]]]:
    """Per method and user, the mean exact-set and Jaccard agreement of the watched slots with
    the human's over that user's held-out pages: the unit paired differences resample."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, o in outputs.items():
        rows = pd.DataFrame([{"user": tr.user, **action_match(set(tr.ratings), set(p["watched"]))}
                             for tr, p in zip(trs, o["pages"], strict=True)])
        out[name] = {} if rows.empty else {
            int(u): {k: float(v) for k, v in r.items()}
            for u, r in rows.groupby("user")[["exact", "jaccard"]].mean().iterrows()}
    return out


def slot_features(tr: Transition) -> list[dict]:
    """What the agent perceived per slot, for regressing its scores on it. ``page_mates_match``
    (the other slots' mean match) measures how much a slot's answer leans on its neighbours: a
    score that falls when the neighbours match well shifts whole pages against each other,
    which a list's AUC, comparing items across pages, pays for."""
    matches = [float(v.match or 0) for v in tr.views]
    mates = page_mates(matches)
    return [{"popularity": np.log1p(v.popularity), "mean_rating": v.mean_rating or 0.0,
             "match": matches[k], "close_watched": float(v.close_watched),
             "close_rating": float(v.close_rating or 0.0),
             "n_evidence": len(v.evidence),
             "evidence_rating": np.mean([e.rating for e in v.evidence]) if v.evidence else 0.0,
             "max_similarity": max((e.similarity for e in v.evidence), default=0.0),
             "page_mates_match": mates[k]}
            for k, v in enumerate(tr.views)]


def page_mates(values: Sequence[float]) -> list[float]:
    """Each slot's mean over the other slots of its page (0 on a page of one)."""
    total = sum(values)
    return [(total - x) / max(len(values) - 1, 1) for x in values]


def baseline_actions(trs: Sequence[Transition], watch: Callable[[Transition], set[int]],
                     rating: Callable[[Transition, int], float]) -> dict:
    pairs = [(set(tr.ratings), watch(tr)) for tr in trs]
    y_true = [r for tr in trs for r in tr.ratings.values()]
    y_pred = [rating(tr, s) for tr in trs for s in tr.ratings]
    return {**{f"action_{k}": v for k, v in action_match_mean(pairs).items()},
            **rmse_mae(y_true, y_pred)}


def truth_state(tr: Transition) -> NextState:
    if tr.next_views is None:
        return NextState(ratings=dict(tr.ratings), ends=True)
    return NextState(ratings=dict(tr.ratings), titles=[v.label() for v in tr.next_views],
                     genres=sorted({g for v in tr.next_views for g in v.genres}))


def state_fields(fields: set[tuple]) -> set[tuple]:
    """Next-state fields the action does not spell out: ratings, next-page titles and genres."""
    return {f for f in fields if f[0] != "end"}


def next_state(generated: Sequence[str], trs: Sequence[Transition],
               user_mean: Mapping[int, float]) -> dict:
    """World-model F1 on held-out transitions beside a trivial baseline (this page's genres,
    the person's mean rating), overall and per field (ratings, end, titles, genres)."""
    kinds = ("rating", "end", "title", "genre")
    model_pairs: dict[str, list] = {k: [] for k in ("all", *kinds)}
    base_pairs: dict[str, list] = {k: [] for k in ("all", *kinds)}
    for text_out, tr in zip(generated, trs, strict=True):
        truth = truth_state(tr).fields()
        ends = tr.ends
        pred = read_next_state(text_out, ends).fields()
        guess = NextState(ratings={s: int(round(user_mean.get(tr.user, 3.5)))
                                   for s in tr.ratings}, ends=ends,
                          genres=[] if ends else sorted({g for v in tr.views
                                                         for g in v.genres})).fields()
        for k in kinds:
            model_pairs[k].append(({f for f in truth if f[0] == k}, {f for f in pred
                                                                    if f[0] == k}))
            base_pairs[k].append(({f for f in truth if f[0] == k}, {f for f in guess
                                                                   if f[0] == k}))
        model_pairs["all"].append((state_fields(truth), state_fields(pred)))
        base_pairs["all"].append((state_fields(truth), state_fields(guess)))
    rows = []
    for k in ("all", *kinds):  # the difference's CI resamples the transitions
        diff = next_state_f1_difference(model_pairs[k], base_pairs[k])
        rows.append({"fields": k, "world_model": next_state_f1_micro(model_pairs[k])["f1"],
                     "baseline_this_page": next_state_f1_micro(base_pairs[k])["f1"],
                     "minus_baseline": diff["difference"], "ci": diff["ci"]})
    return {"rows": rows, "n": len(trs),
            "note": "'all' = ratings, next-page titles and genres (the end flag is given by "
                    "the action and the page limit, to the world model as to the baseline: "
                    "after an exit or on the last allowed page no page it writes is read); "
                    "the next page's titles depend on the recommender, which the state does "
                    "not show, so titles are hard to predict by construction (a world model "
                    "trained with --wm-format genres writes the next page's genre mix and no "
                    "title); the CI of minus_baseline resamples the transitions"}
