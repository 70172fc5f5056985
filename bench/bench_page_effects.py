"""Where an agent's list ranking is lost: inside a page or between pages.

A 1:m list is shown in pages of 4 and each item is scored in its page's context, while AUC
compares every positive with every negative of the person's list. This reads a finished
evaluate run's list answers and, per method and ratio, splits each user's (positive, negative)
pairs into those on the same page and those on different pages and reports how often each
kind is ordered correctly, beside the item's match number alone; and how much a score falls
when the page-mates match well (a least-squares slope on the other slots' mean match, relative
to the slope on the item's own match; the lists' own labels give the same ratio from a logistic
regression, which is what the lists reward). It also asks whether a score knows anything its
perceived numbers do not: a logistic regression on the numbers alone and on the numbers plus
the score, each fit on four fifths of the users and scored on the others (5 folds). Last, what
an offset can do for F1: each scorer's per-user mean F1 at its own cut beside the best F1 of any
single cut, searched on the lists' own labels (a bound no calibration can pass). And where on a
page a score sits: its mean residual per slot after a least-squares fit on the item's match
(the lists' positives fall on every slot alike), and the AUC once each slot's mean residual,
taken from the other folds' users, is removed: what a position bias costs the ranking.

``python bench/bench_page_effects.py BUNDLE RUN [--prepared FILE]`` where BUNDLE comes from
the run's own command with ``--prepare-only BUNDLE`` (the same lists) and RUN is its output
folder. With ``--prepared`` (a file from ``alignuser train --prepare-only``) it also compares
the held-out test pages with the validation pages the offsets were calibrated on: the watch
ratio, and the match number of the items the humans watched and skipped there.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score

from agents.browse import pages_of
from evaluation.micro import page_mates
from evaluation.signal import list_features
from memory.evidence import FEATURE_NAMES
from simulator.runs import read_pickle


def list_frame(bundle, m: int) -> pd.DataFrame:
    """One row per list item: user, page, slot, label, match and the page-mates' mean match."""
    rows = []
    for user, items, labels in bundle.lists[m]:
        match = bundle.perceiver.similarity.match_percentiles(bundle.histories.get(user, {}))
        k = 0
        for p, page in enumerate(pages_of(items)):
            ms = [float(match.get(i, 0)) for i in page]
            for slot, (x, mates) in enumerate(zip(ms, page_mates(ms), strict=True), 1):
                rows.append({"user": user, "page": p, "slot": slot, "label": int(labels[k]),
                             "match": x, "mates": mates})
                k += 1
    return pd.DataFrame(rows)


def user_folds(frame: pd.DataFrame, folds: int = 5, seed: int = 0) -> Iterator[np.ndarray]:
    """Per fold, the mask of its users' rows (users shuffled by ``seed``, then split)."""
    users = frame["user"].to_numpy()
    order = np.unique(users)
    np.random.default_rng(seed).shuffle(order)
    for fold in np.array_split(order, folds):
        yield np.isin(users, fold)


def cv_scores(x: np.ndarray, frame: pd.DataFrame, folds: int = 5, seed: int = 0
              ) -> np.ndarray:
    """A logistic regression's log-odds on ``x``, each user scored by a fit on the other
    folds' users."""
    pred = np.zeros(len(frame))
    for test in user_folds(frame, folds, seed):
        fit = LogisticRegression(max_iter=2000).fit(x[~test], frame["label"][~test])
        pred[test] = fit.decision_function(x[test])
    return pred


def cv_auc(x: np.ndarray, frame: pd.DataFrame) -> float:
    """Mean per-user AUC of ``cv_scores``."""
    return concordance(frame.assign(cv=cv_scores(x, frame)), "cv")["auc"]


def mean_f1(frame: pd.DataFrame, col: str, cut: float) -> float:
    """Per-user mean F1 of ``score > cut``, as the evaluation reports it."""
    return float(np.mean([f1_score(g["label"], g[col] > cut, zero_division=0)
                          for _, g in frame.groupby("user")]))


def f1_bound(frame: pd.DataFrame, col: str) -> tuple[float, float]:
    """The best per-user mean F1 of any one cut for all lists, searched on these lists' own
    labels (no offset fitted elsewhere can beat it), and the share of items it says yes to."""
    cuts = np.quantile(frame[col], np.linspace(0.02, 0.98, 97))
    f1s = [mean_f1(frame, col, c) for c in cuts]
    best = int(np.argmax(f1s))
    return f1s[best], float((frame[col] > cuts[best]).mean())


def concordance(frame: pd.DataFrame, col: str) -> dict[str, float]:
    """Mean per-user AUC, and the share of same-page and cross-page pairs ordered right."""
    same, cross, aucs = [0.0, 0], [0.0, 0], []
    for _, g in frame.groupby("user"):
        y, s, pg = g["label"].to_numpy(), g[col].to_numpy(), g["page"].to_numpy()
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, s))
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        right = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        on_page = pg[pos][:, None] == pg[neg][None, :]
        same[0] += right[on_page].sum()
        same[1] += on_page.sum()
        cross[0] += right[~on_page].sum()
        cross[1] += (~on_page).sum()
    return {"auc": float(np.mean(aucs)), "same_page": same[0] / max(same[1], 1),
            "cross_page": cross[0] / max(cross[1], 1), "same_pairs": same[1],
            "cross_pairs": cross[1]}


def mates_ratio(frame: pd.DataFrame, col: str) -> float:
    """Slope on the page-mates' mean match over the slope on the item's own match."""
    x = np.column_stack([np.ones(len(frame)), frame["match"], frame["mates"]])
    beta, *_ = np.linalg.lstsq(x, frame[col].to_numpy(), rcond=None)
    return float(beta[2] / beta[1])


def slot_residuals(frame: pd.DataFrame, col: str) -> pd.Series:
    """Each item's score minus a least-squares line on its match."""
    x = np.column_stack([np.ones(len(frame)), frame["match"]])
    beta, *_ = np.linalg.lstsq(x, frame[col].to_numpy(), rcond=None)
    return frame[col] - x @ beta


def slot_effects(frame: pd.DataFrame, col: str, folds: int = 5, seed: int = 0
                 ) -> tuple[pd.Series, float]:
    """Mean residual per slot (``slot_residuals``), and the mean per-user AUC of the score with
    each slot's mean residual removed, the means taken from the other folds' users."""
    res = slot_residuals(frame, col)
    debiased = frame[col].to_numpy(dtype=float).copy()
    for test in user_folds(frame, folds, seed):
        means = res[~test].groupby(frame["slot"][~test]).mean()
        debiased[test] -= frame["slot"][test].map(means).fillna(0.0).to_numpy()
    auc = concordance(frame.assign(debiased=debiased), "debiased")["auc"]
    return res.groupby(frame["slot"]).mean(), auc


def page_shift(named: dict[str, list]) -> Table:
    """Held-out pages by where they come from: the humans' watch ratio and exit share, and the
    match number of what they watched and skipped."""
    table = Table(title="held-out pages: the humans' rates and the match they perceived")
    for col in ("pages", "n", "watch ratio", "exit share", "match, watched", "match, skipped",
                "watched with match >= 80"):
        table.add_column(col)
    for name, trs in named.items():
        slots = [(k in tr.ratings, float(v.match or 0)) for tr in trs
                 for k, v in enumerate(tr.views, 1)]
        seen = np.asarray([m for w, m in slots if w])
        skipped = np.asarray([m for w, m in slots if not w])
        table.add_row(name, str(len(trs)), f"{len(seen) / len(slots):.3f}",
                      f"{np.mean([tr.then == 'exit' for tr in trs]):.3f}", f"{seen.mean():.1f}",
                      f"{skipped.mean():.1f}", f"{(seen >= 80).mean():.2f}")
    return table


def _load(ap: argparse.ArgumentParser, path: str, field: str, what: str):
    """A pickled input, or a one-line error (exit 2) when it is not the kind asked for."""
    try:
        obj = read_pickle(path)
    except Exception as exc:  # any unreadable file is the same user error
        ap.error(f"{path} is not {what}: {type(exc).__name__}")
    if not hasattr(obj, field):
        ap.error(f"{path} is not {what}")
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="file from the run's command with --prepare-only")
    ap.add_argument("run", help="the evaluate run's output folder")
    ap.add_argument("--prepared", help="file from alignuser train --prepare-only: compare the "
                    "held-out pages with its calibration pages")
    args = ap.parse_args()
    for path in (args.bundle, args.prepared):
        if path is not None and not Path(path).is_file():
            ap.error(f"{path}: no such file")
    answers = {f.stem.removeprefix("outputs-"): pickle.loads(f.read_bytes())
               for f in sorted((Path(args.run) / "parts").glob("outputs-*.pkl"))}
    if not answers:
        ap.error(f"{args.run}: no parts/outputs-*.pkl (not a finished evaluate run)")
    bundle = _load(ap, args.bundle, "lists", "an evaluation bundle (alignuser evaluate "
                   "--prepare-only)")
    prep = None if args.prepared is None else _load(
        ap, args.prepared, "calib", "a prepared file (alignuser train --prepare-only)")
    console = Console(width=120)
    for m in sorted(bundle.lists):
        frame = list_frame(bundle, m)
        lr = LogisticRegression(max_iter=1000).fit(frame[["match", "mates"]], frame["label"])
        table = Table(title=f"1:{m} lists, {frame['user'].nunique()} users: pairs ordered "
                            "right (the lists' labels reward a page-mates/own ratio of "
                            f"{lr.coef_[0][1] / lr.coef_[0][0]:+.2f})")
        for col in ("scorer", "AUC", "same page", "different pages", "page-mates / own"):
            table.add_column(col)
        rows = {"match number alone": frame["match"]}
        for name, out in answers.items():
            scores = out.get("lists", {}).get(m)
            if scores is not None:
                rows[name] = np.concatenate([np.asarray(s, dtype=float) for s in scores])
                if len(rows[name]) != len(frame):
                    ap.error(f"{name}'s 1:{m} answers hold {len(rows[name])} items, the "
                             f"bundle's lists {len(frame)}: not the run's bundle")
        for name, values in rows.items():
            frame["score"] = values
            c = concordance(frame, "score")
            table.add_row(name, f"{c['auc']:.3f}", f"{c['same_page']:.3f}",
                          f"{c['cross_page']:.3f}", f"{mates_ratio(frame, 'score'):+.2f}")
        console.print(table)
        console.print(f"pairs per list: {c['same_pairs'] / frame['user'].nunique():.1f} on the "
                      f"same page, {c['cross_pairs'] / frame['user'].nunique():.1f} across pages")
        numbers = list_features(bundle.perceiver.similarity, bundle.histories,
                                bundle.lists[m])[list(FEATURE_NAMES)].to_numpy(dtype=float)
        added = Table(title=f"1:{m} lists: what a score adds to the perceived numbers (logistic "
                            "regression, 5 folds of users)")
        for col in ("inputs", "AUC"):
            added.add_column(col)
        frame["regression"] = cv_scores(numbers, frame)
        added.add_row("the numbers alone", f"{concordance(frame, 'regression')['auc']:.3f}")
        for name, values in rows.items():
            if name != "match number alone":
                added.add_row(f"the numbers + {name}",
                              f"{cv_auc(np.column_stack([numbers, values]), frame):.3f}")
        console.print(added)
        bound = Table(title=f"1:{m} lists: F1 at the scorer's own cut, and the best of any one "
                            "cut chosen on these lists' labels")
        for col in ("scorer", "F1 at its cut (0)", "best F1 of any cut", "says yes to"):
            bound.add_column(col)
        for name, values in {**rows, "regression on the numbers": frame["regression"]}.items():
            frame["score"] = values
            own = "" if name == "match number alone" else f"{mean_f1(frame, 'score', 0.0):.3f}"
            best, share = f1_bound(frame, "score")
            bound.add_row(name, own, f"{best:.3f}", f"{share:.2f}")
        console.print(bound)
        slots = sorted(frame["slot"].unique())
        by_slot = Table(title=f"1:{m} lists: mean score residual per slot (after a line on the "
                              "match; positives per slot "
                              + " / ".join(f"{frame.loc[frame['slot'] == k, 'label'].mean():.2f}"
                                           for k in slots)
                              + "), and the AUC with each slot's mean removed (5 folds of "
                                "users)")
        for col in ("scorer", *(f"slot {k}" for k in slots), "AUC", "AUC, slot means removed"):
            by_slot.add_column(col)
        for name, values in rows.items():
            if name == "match number alone":
                continue
            frame["score"] = values
            means, debiased = slot_effects(frame, "score")
            by_slot.add_row(name, *(f"{means.get(k, 0.0):+.3f}" for k in slots),
                            f"{concordance(frame, 'score')['auc']:.3f}", f"{debiased:.3f}")
        console.print(by_slot)
    if prep is not None:
        console.print(page_shift({"test (this run's)": bundle.pages,
                                  "validation (calibration)": prep.calib}))


if __name__ == "__main__":
    main()
