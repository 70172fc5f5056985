"""The signal check: do the cues the agent perceives point the same way on training pages as
on held-out lists?

A model learns whatever separates watched from skipped slots on its training pages. If a cue
(popularity, similarity to the person's history, the collaborative match) is *lower* for the
items people chose than for the fillers beside them, training teaches the inverse of preference,
while held-out lists reward the opposite. This prints, per cue, the AUC of watched vs skipped
slots on training pages beside the AUC of held-out positives vs never-rated items on validation
1:1 lists, for the same users.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import groupby

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from agents.world import World
from evaluation.micro import page_mates
from memory.evidence import FEATURE_NAMES, ItemSimilarity
from simulator.env import PAGE_SIZE
from simulator.trajectories import Trajectory, TrajectoryConfig, experienced


def _auc(labels: Sequence[int], values: Sequence[float]) -> float:
    return float(roc_auc_score(labels, values)) if len(set(labels)) > 1 else float("nan")


def page_features(world: World, trajs: Sequence[Trajectory],
                  similarity: ItemSimilarity | None = None,
                  leave_out: bool = True) -> pd.DataFrame:
    """One row per page slot: the cues perceived from the ratings before the session plus
    this session's earlier watches (as in training: with ``leave_out``, the match without the
    person's own ratings), whether the person watched it, and which page it was on."""
    sim = similarity or world.similarity
    train = world.split.train
    by_user = {int(u): g for u, g in train.groupby("user")}
    rows, page = [], 0
    for t in trajs:
        g = by_user.get(t.user)
        past = {} if g is None else dict(zip(g.loc[g["timestamp"] < t.start, "item"].astype(int),
                                             g.loc[g["timestamp"] < t.start, "rating"],
                                             strict=True))
        session: dict[int, float] = {}
        for step in t.steps:
            history = {**past, **session}
            match = sim.match_percentiles(history, without=t.user if leave_out else None)
            for item in step.items:
                rows.append({**sim.features(item, history, match),
                             "label": int(item in step.watched), "page": page})
            page += 1
            session.update({i: float(r) for i, r in step.watched.items()})
    return pd.DataFrame(rows)


def list_features(similarity: ItemSimilarity, histories: Mapping[int, Mapping[int, float]],
                  lists) -> pd.DataFrame:
    """One row per list item: the cues perceived from the person's history, and its label.
    Takes the similarity and histories, not a World, so an evaluation bundle can use it too."""
    rows, pages = [], 0
    for user, items, labels in lists:
        history = histories.get(user, {})
        match = similarity.match_percentiles(history)
        # Shown in pages of PAGE_SIZE, in list order (agents.browse).
        rows += [{**similarity.features(i, history, match), "label": int(y),
                  "page": pages + k // PAGE_SIZE}
                 for k, (i, y) in enumerate(zip(items, labels, strict=True))]
        pages += -(-len(items) // PAGE_SIZE)
    return pd.DataFrame(rows)


def signal_table(world: World, cfg: TrajectoryConfig | None = None, *, users: int,
                 seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Per-feature AUC on training pages (configured construction) and validation 1:1 lists.
    ``users`` has no default here: ``DataInfoConfig.signal_users`` is its one source."""
    valid = world.lists("valid", 1, None, seed)
    pool = sorted({u for u, _, _ in valid} & set(world.split.train["user"].unique()))
    rng = np.random.default_rng(seed)
    chosen = sorted(int(u) for u in rng.choice(pool, size=min(users, len(pool)), replace=False))
    trajs = world.trajectories("train", cfg=cfg, users=chosen, progress=progress)
    pages = page_features(world, trajs)
    lists = list_features(world.similarity, world.histories,
                          [row for row in valid if row[0] in set(chosen)])
    out = pd.DataFrame({
        "feature": list(FEATURE_NAMES),
        "train_pages": [_auc(pages["label"], pages[f]) for f in FEATURE_NAMES],
        "valid_lists": [_auc(lists["label"], lists[f]) for f in FEATURE_NAMES]})
    out.attrs.update(users=len(chosen), slots=len(pages),
                     watch_ratio=float(pages["label"].mean()) if len(pages) else 0.0)
    return out


def inverted(table: pd.DataFrame, margin: float = 0.0) -> list[str]:
    """Features whose training-page AUC sits on the other side of .5 from the lists'."""
    bad = []
    for _, r in table.iterrows():
        a, b = r["train_pages"] - 0.5, r["valid_lists"] - 0.5
        if np.isfinite(a) and np.isfinite(b) and a * b < 0 and min(abs(a), abs(b)) > margin:
            bad.append(str(r["feature"]))
    return bad


def valid_lists(world: World, seed: int, similarity: ItemSimilarity | None = None,
                mates: bool = False) -> list[tuple[Sequence[int], pd.DataFrame]]:
    """Validation 1:1 lists' labels and perceived features; with ``mates`` also each slot's
    page-mates' mean match, the lists shown in pages of 4 (``with_mates``)."""
    out = []
    for u, items, labels in world.lists("valid", 1, None, seed):
        x = list_features(similarity or world.similarity, world.histories, [(u, items, labels)])
        out.append((labels, with_mates(x) if mates else x[list(FEATURE_NAMES)]))
    return out


def sample_users(world: World, users: int, seed: int) -> list[int]:
    pool = sorted(int(u) for u in world.split.train["user"].unique())
    rng = np.random.default_rng(seed)
    return sorted(int(u) for u in rng.choice(pool, size=min(users, len(pool)), replace=False))


def match_alone(valid) -> float:
    """Mean per-user AUC of the match number alone on prepared validation lists."""
    return float(np.mean([_auc(y, x["match"]) for y, x in valid]))


def fit_and_score(pages: pd.DataFrame, valid) -> dict[str, float]:
    """Mean per-user validation-list AUC of two scorers fit on the page slots: a logistic
    regression, and gradient-boosted trees, which, like an LLM reading the numbers, can learn a
    non-monotone function of a cue (so a filler source that makes the best-matching items look
    skipped shows up here, not in the regression)."""
    names = list(FEATURE_NAMES)
    lr = LogisticRegression(max_iter=1000).fit(pages[names], pages["label"])
    gb = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05,
                                        random_state=0).fit(pages[names], pages["label"])
    return {"valid_list_auc": float(np.mean([_auc(y, lr.decision_function(x))
                                             for y, x in valid])),
            "valid_list_auc_trees": float(np.mean([_auc(y, gb.predict_proba(x)[:, 1])
                                                   for y, x in valid]))}


def _match_rates(pages: pd.DataFrame) -> dict[str, float]:
    """Watch ratio of the best-matching slots: it should rise with the match, as on lists."""
    m, y = pages["match"].to_numpy(), pages["label"].to_numpy()
    out = {}
    for lo, hi in ((80, 90), (90, 95), (95, 101)):
        sel = (m >= lo) & (m < hi)
        out[f"watch_match_{lo}_{hi}"] = float(y[sel].mean()) if sel.any() else float("nan")
    return out


def page_regression(world: World, cfg: TrajectoryConfig | None = None, *, users: int,
                    min_histories: Sequence[int], seed: int = 0) -> pd.DataFrame:
    """What training pages can teach a scorer of the perceived cues, per ``min_history``: two
    scorers fit on the slots of ``users`` sampled train users' visits with at least that many
    earlier ratings, scored by mean per-user AUC on every validation 1:1 list (the bar
    ``TrainConfig.min_history`` is chosen by; test lists are never used)."""
    valid = valid_lists(world, seed)
    chosen = sample_users(world, users, seed)
    trajs = world.trajectories("train", cfg=cfg, users=chosen, progress=False)
    rows = []
    for n in min_histories:
        kept = experienced(trajs, world.split.train, n)
        pages = page_features(world, kept)
        rows.append({"min_history": n, "visits": len(kept), "slots": len(pages),
                     **fit_and_score(pages, valid)})
    out = pd.DataFrame(rows)
    out.attrs.update(users=len(chosen), lists=len(valid),
                     match_alone=match_alone(valid))
    return out


def exposure_regression(world: World, exposures: Mapping[str, Mapping[str, float]], *,
                        users: int, min_history: int, seed: int = 0) -> pd.DataFrame:
    """The same bar per filler mixture (``TrajectoryConfig.exposure``): which construction's
    pages best teach what validation lists reward. Chooses the default mixture."""
    valid = valid_lists(world, seed)
    chosen = sample_users(world, users, seed)
    rows = []
    for name, mix in exposures.items():
        cfg = TrajectoryConfig.model_validate({**world.trajectory_config.model_dump(),
                                               "exposure": dict(mix)})
        kept = experienced(world.trajectories("train", cfg=cfg, users=chosen, progress=False),
                           world.split.train, min_history)
        pages = page_features(world, kept)
        rows.append({"exposure": name, "slots": len(pages),
                     "watch_ratio": float(pages["label"].mean()), **_match_rates(pages),
                     **fit_and_score(pages, valid)})
    out = pd.DataFrame(rows)
    out.attrs.update(users=len(chosen), lists=len(valid))
    return out


MATES = "mates_match"


def with_mates(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus each slot's page-mates' mean match (``evaluation.micro.page_mates``)."""
    out = frame.copy()
    out[MATES] = frame.groupby("page")["match"].transform(
        lambda m: page_mates(list(m)))
    return out


def _pull_of(lr: LogisticRegression, cols: Sequence[str]) -> float:
    """A logistic fit's weight on the page-mates' match, per unit of the item's own."""
    coef = dict(zip(cols, lr.coef_[0], strict=True))
    return float(coef[MATES] / coef["match"])


def _pull(frame: pd.DataFrame) -> float:
    cols = [*FEATURE_NAMES, MATES]
    return _pull_of(LogisticRegression(max_iter=2000).fit(frame[cols], frame["label"]), cols)


def page_count_regression(world: World, counts: Mapping[str, Mapping], *, users: int,
                          min_history: int, seed: int = 0) -> pd.DataFrame:
    """How many of the human's items a training page holds (``TrajectoryConfig.slot_share`` or
    ``watch_probs``, given per construction in ``counts``). A scorer that sees the whole page,
    as the agent does, learns from pages capped at 2 of the human's items that a well-matching
    page-mate makes a slot likelier a filler. Per construction: a logistic regression fit on the
    train-page slots without and with the page-mates' mean match, and trees with it, scored on
    validation 1:1 lists shown in pages of 4; and the pull the fit learns (its weight on the
    page-mates' match per unit of the item's own), beside the pull the lists themselves have."""
    valid = valid_lists(world, seed, mates=True)
    chosen = sample_users(world, users, seed)
    own, mates = list(FEATURE_NAMES), [*FEATURE_NAMES, MATES]
    rows = []
    for name, overrides in counts.items():
        cfg = TrajectoryConfig.model_validate({**world.trajectory_config.model_dump(),
                                               **overrides})
        kept = experienced(world.trajectories("train", cfg=cfg, users=chosen, progress=False),
                           world.split.train, min_history)
        pages = with_mates(page_features(world, kept))
        row = {"pages": name, "slots": len(pages), "watch_ratio": float(pages["label"].mean())}
        for tag, cols in (("own", own), ("mates", mates)):
            lr = LogisticRegression(max_iter=2000).fit(pages[cols], pages["label"])
            row[f"valid_list_auc_{tag}"] = float(np.mean([_auc(y, lr.decision_function(x[cols]))
                                                          for y, x in valid]))
            if tag == "mates":
                row["pull"] = _pull_of(lr, cols)
        gb = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05,
                                            random_state=0).fit(pages[mates], pages["label"])
        row["valid_list_auc_trees"] = float(np.mean([_auc(y, gb.predict_proba(x[mates])[:, 1])
                                                     for y, x in valid]))
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(users=len(chosen), lists=len(valid),
                     list_pull=_pull(pd.concat([x for _, x in valid], ignore_index=True)))
    return out


def refit_page_features(world: World, trajs: Sequence[Trajectory],
                        pages: pd.DataFrame) -> pd.DataFrame:
    """``pages`` (``page_features(world, trajs)``) with every other cue leave-one-person-out:
    each person's slots read neighbours, popularity and mean ratings refitted on the train split
    without their rows; the match (already EASE's exact downdate) and page ids are kept. The
    measure of what the cosine cues' own leak is worth; training keeps the full cosine fit (see
    ``match_regression``). One refit per run of a person's trajectories (once per person when
    they come grouped, as ``World.trajectories`` gives them)."""
    train = world.split.train
    parts = [page_features(world, list(run), ItemSimilarity.fit(train[train["user"] != user],
                                                                match_lambda=None),
                           leave_out=False)
             for user, run in groupby(trajs, key=lambda t: t.user)]
    out = pd.concat(parts, ignore_index=True) if parts else pages.iloc[:0].copy()
    out[["match", "page"]] = pages[["match", "page"]].to_numpy()
    return out


def match_regression(world: World, *, users: int, min_history: int,
                     seed: int = 0) -> pd.DataFrame:
    """Which match to perceive, and the leak on training pages. A train page's labels are in
    its person's own train row, so a match fitted with that row scores them above what any
    held-out item gets. Per variant: the match's AUC on train-page slots beside validation 1:1
    lists (the gap is the leak), and the two scorers fit on the slots, scored on the lists.
    The last variant also takes the person's row out of the cosine cues, popularity and mean
    rating (``refit_page_features``)."""
    chosen = sample_users(world, users, seed)
    kept = experienced(world.trajectories("train", users=chosen, progress=False),
                       world.split.train, min_history)
    cosine = ItemSimilarity.fit(world.split.train, match_lambda=None)
    lists = {id(sim): valid_lists(world, seed, sim) for sim in (cosine, world.similarity)}
    default = page_features(world, kept)
    variants = (
        ("summed cosine, the person's row in the fit", cosine,
         page_features(world, kept, cosine, leave_out=False)),
        ("EASE, the person's row in the fit", world.similarity,
         page_features(world, kept, leave_out=False)),
        ("EASE, without the person's row (default)", world.similarity, default),
        ("every cue without the person's row", world.similarity,
         refit_page_features(world, kept, default)))
    rows = []
    for name, sim, pages in variants:
        valid = lists[id(sim)]
        rows.append({"match": name, "slots": len(pages),
                     "train_page_auc": _auc(pages["label"], pages["match"]),
                     **{f"train_page_auc_{f}": _auc(pages["label"], pages[f])
                        for f in ("max_sim", "n_similar", "close_watched", "popularity")},
                     "valid_list_match_auc": match_alone(valid),
                     **fit_and_score(pages, valid)})
    out = pd.DataFrame(rows)
    out.attrs.update(users=len(chosen), lists=len(valid))
    return out


def match_lambdas(world: World, lambdas: Sequence[float], seed: int = 0) -> pd.DataFrame:
    """The match alone (mean per-user AUC) on every validation 1:1 list, per EASE weight and
    for the summed cosine: how ``memory.evidence.MATCH_LAMBDA`` is chosen."""
    rows = []
    for lam in [None, *lambdas]:
        sim = ItemSimilarity.fit(world.split.train, match_lambda=lam)
        valid = valid_lists(world, seed, sim)
        rows.append({"match": "summed cosine" if lam is None else f"EASE, lambda {lam:g}",
                     "lists": len(valid), "valid_list_match_auc": match_alone(valid)})
    return pd.DataFrame(rows)
