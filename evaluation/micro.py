"""Step-wise fidelity on held-out humans: 1:m discrimination, ratings, next action, next state.

Every method answers the same lists and pages. LLM agents see what they would see when running
(persona, page facts, their own evidence from the train split, world-model predictions when on)
and decide greedily; their watch score is log P(watch) - log P(skip) and they say yes when it is
positive, as an agent browsing would. Baselines score the same items and get one threshold tuned
on validation 1:1 lists (accuracy). AUC is reported beside F1 because it needs no threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from agents import prompts, text
from agents.policy import DecisionInput, LLMPolicy, Scorer
from agents.text import NextState
from agents.world_model import expected_ratings, predict_next_state
from evaluation.metrics import (
    action_match_mean,
    binary_scores,
    discrimination_lists,
    next_exit_scores,
    next_state_f1_micro,
    per_user_mean,
    rmse_mae,
)
from graph.world import World
from memory.evidence import FEATURE_NAMES
from training.rollout import Transition

ItemScorer = Callable[[int, Sequence[int]], np.ndarray]


@dataclass
class AgentVariant:
    """An LLM agent as evaluated: its weights (scorer) and which perception nodes are on."""

    name: str
    scorer: Scorer
    memory: bool = True
    world_model: bool = True

    def policy(self) -> LLMPolicy:
        return LLMPolicy(self.scorer, name=self.name, temperature=0.0)


def page_text(views: Sequence[text.ItemView], page: int, session: Sequence[tuple[str, int]],
              memory: bool) -> str:
    return text.page_prompt(page, 5, views, session, evidence=memory)


def _decide(agent: AgentVariant, user: int, persona: str, items: Sequence[int], page: int,
            body: str):
    preds = {}
    if agent.world_model:
        preds = expected_ratings(agent.scorer, prompts.persona_block(persona) + body, len(items))
    return agent.policy().decide(DecisionInput(user=user, page=page, items=list(items),
                                               persona_text=persona, page_text=body,
                                               predictions=preds)), preds


def agent_item_scores(agent: AgentVariant, world: World) -> ItemScorer:
    """Show a list in pages of 4 as one session; return the watch score of every item."""
    def score(user: int, items: Sequence[int]) -> np.ndarray:
        history = world.histories.get(user, {})
        persona = world.personas[user]
        out, session = [], []
        for p, start in enumerate(range(0, len(items), 4), 1):
            page_items = list(items[start:start + 4])
            views = world.perceiver.page(page_items, {**history, **dict(session)})
            titles = [(world.ds.items[i].title, r) for i, r in session]
            d, _ = _decide(agent, user, persona, page_items, p,
                           page_text(views, p, titles, agent.memory))
            out += [d.watch_scores[s] for s in range(1, len(page_items) + 1)]
            session += list(d.action.watched.items())
        return np.asarray(out)

    return score


def feature_frame(world: World, user: int, items: Sequence[int]) -> pd.DataFrame:
    history = world.histories.get(user, {})
    return pd.DataFrame([world.similarity.features(i, history) for i in items],
                        columns=list(FEATURE_NAMES))


def baseline_scorers(world: World, valid_lists, seed: int = 0) -> dict[str, ItemScorer]:
    """Random, popularity, ItemKNN and BPR scores, and a logistic regression on the numeric
    evidence the agent perceives (fit on validation lists: the bar an LLM must clear)."""
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
            "feature regression": features_lr}


def lists_for(world: World, part: str, m: int, users: Sequence[int] | None, seed: int):
    """Agent4Rec lists: positives held out in ``part``, negatives never rated in any split."""
    rated: dict[int, set[int]] = {}
    for p in ("train", "valid", "test"):
        if p == part:
            continue
        for u, items in world.split.part(p).groupby("user")["item"]:
            rated.setdefault(int(u), set()).update(int(i) for i in items)
    lists = discrimination_lists(world.split.part(part), rated, list(world.ds.items), m, seed)
    if users is not None:
        keep = set(users)
        lists = [row for row in lists if row[0] in keep]
    return lists


def _threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cut maximising accuracy (midpoints between sorted scores)."""
    s = np.sort(np.unique(scores))
    cuts = np.concatenate([[s[0] - 1], (s[:-1] + s[1:]) / 2, [s[-1] + 1]])
    acc = [np.mean((scores >= c) == labels) for c in cuts]
    return float(cuts[int(np.argmax(acc))])


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


def next_action(agent: AgentVariant, trs: Sequence[Transition]) -> tuple[dict, list[dict]]:
    """Greedy agent action vs the human's on held-out pages (the human's session so far given).
    Also the agent's expected rating of each item the human watched (RMSE/MAE)."""
    pairs, exits_true, exits_pred, y_true, y_pred, scored = [], [], [], [], [], []
    for tr in tqdm(trs, desc=f"{agent.name} pages", unit="page", leave=False):
        body = page_text(tr.views, tr.page, tr.session, agent.memory)
        d, preds = _decide(agent, tr.user, tr.persona, tr.items, tr.page, body)
        pred = {tr.items.index(i) + 1 for i in d.action.watched}
        pairs.append((set(tr.ratings), pred))
        exits_true.append(tr.then == "exit")
        exits_pred.append(d.action.then == "exit")
        for slot, r in tr.ratings.items():
            y_true.append(r)
            y_pred.append(_rating_given_watch(agent, tr, body, preds, slot))
        scored += [{"score": d.watch_scores[s], "watched": int(s in tr.ratings), **feat}
                   for s, feat in enumerate(_features(tr), 1)]
    out = {**{f"action_{k}": v for k, v in action_match_mean(pairs).items()},
           **{f"then_{k}": v for k, v in next_exit_scores(exits_true, exits_pred).items()},
           **rmse_mae(y_true, y_pred)} if pairs else {}
    return out, scored


def _rating_given_watch(agent: AgentVariant, tr: Transition, body: str,
                        preds: Mapping[int, float], slot: int) -> float:
    """Expected rating of ``slot`` once the human's watch/skip lines are given."""
    ctx = (prompts.policy_tail(text.render_predictions(preds))
           + text.render_choices(len(tr.items), list(tr.ratings)))
    logps = np.asarray(agent.scorer.score(prompts.persona_block(tr.persona) + body,
                                          [(ctx, text.rating_line(slot, r))
                                           for r in text.RATINGS]))
    p = np.exp(logps - logps.max())
    return float((p / p.sum()) @ np.arange(1, 6))


def _features(tr: Transition) -> list[dict]:
    """What the agent perceived per slot, for regressing its scores on it."""
    return [{"popularity": np.log1p(v.popularity), "mean_rating": v.mean_rating or 0.0,
             "n_evidence": len(v.evidence),
             "evidence_rating": np.mean([e.rating for e in v.evidence]) if v.evidence else 0.0,
             "max_similarity": max((e.similarity for e in v.evidence), default=0.0)}
            for v in tr.views]


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


def state_fields(ns: NextState) -> set[tuple]:
    """Next-state fields the action does not spell out: ratings, next-page titles and genres."""
    return {f for f in ns.fields() if f[0] != "end"}


def next_state(gen, trs: Sequence[Transition], user_mean: Mapping[int, float]) -> dict:
    """World-model F1 on held-out transitions beside a trivial baseline (this page's genres,
    the person's mean rating)."""
    model_pairs, base_pairs = [], []
    for tr in trs:
        truth = state_fields(truth_state(tr))
        pred = predict_next_state(gen, tr.prefix, len(tr.items), sorted(tr.ratings), tr.then)
        model_pairs.append((truth, state_fields(pred)))
        guess = NextState(ratings={s: int(round(user_mean.get(tr.user, 3.5)))
                                   for s in tr.ratings},
                          genres=sorted({g for v in tr.views for g in v.genres})
                          if tr.then == "next" else [])
        base_pairs.append((truth, state_fields(guess)))
    return {"world_model": next_state_f1_micro(model_pairs),
            "baseline_this_page": next_state_f1_micro(base_pairs), "n": len(trs)}
