"""What the training pages can teach: scorers of the perceived cues (a logistic regression and
gradient-boosted trees) fit on train-page slots, scored on validation 1:1 lists; per history
threshold (``TrainConfig.min_history``), with ``--exposures`` per filler mixture
(``TrajectoryConfig.exposure``), with ``--match`` per match variant (and its leak on training
pages), with ``--page-counts`` per page composition (how many of the human's items a page
holds, and the page-mates' pull it teaches), with ``--lambdas`` the match alone on validation
lists per EASE weight, with ``--pseudo-lists`` per train-only source (pages, or lists cut from
train ratings) beside the regression fit on the validation lists themselves.
``python bench/bench_signal.py [--users 400] [--min-history 0,1,3,5,10,20] [--exposures |
--match | --page-counts | --pseudo-lists | --lambdas 500,1000,2000]``."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

from bench_population import table
from rich.console import Console

from agents.world import load_world
from evaluation.pseudo_lists import pseudo_list_regression
from evaluation.signal import (
    exposure_regression,
    match_lambdas,
    match_regression,
    page_count_regression,
    page_regression,
)
from training.config import TrainConfig

# Filler mixtures compared by --exposures: the recommender picks of the earlier default, fewer
# of them, a weak recommender among them, none, and uniform alone.
MIXTURES = {
    "uniform .7, popular .1, itemknn .1, bpr .1": {"uniform": .7, "popular": .1, "itemknn": .1,
                                                   "bpr": .1},
    "uniform .8, popular .1, itemknn .05, bpr .05": {"uniform": .8, "popular": .1,
                                                     "itemknn": .05, "bpr": .05},
    "uniform .8, popular .1, pop .05, itemknn .025, bpr .025": {
        "uniform": .8, "popular": .1, "pop": .05, "itemknn": .025, "bpr": .025},
    "uniform .6, popular .3, pop .1": {"uniform": .6, "popular": .3, "pop": .1},
    "uniform .9, popular .1 (default)": {"uniform": .9, "popular": .1},
    "uniform 1": {"uniform": 1.0},
}

# Page compositions compared by --page-counts: the earlier cap at 2 of the human's items a page,
# and each slot independently the human's (the default; the same 1.15 items a page on average).
COUNTS = {"0 / 1 / 2 of 4 at .20 / .45 / .35": {"watch_probs": (0.2, 0.45, 0.35)},
          "each slot independently, .2875 (default)": {"watch_probs": None}}


def _show(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    Console().print(table(title, list(columns), [list(r) for r in rows]))


def _pages_title(table, min_history: int, what: str) -> str:
    return (f"{what} ({table.attrs['users']} users, visits with >= {min_history} earlier "
            f"ratings) -> {table.attrs['lists']} validation 1:1 lists")


def _exposures(users: int, seed: int, min_history: int) -> None:
    table = exposure_regression(load_world(), MIXTURES, users=users, min_history=min_history,
                                seed=seed)
    _show(_pages_title(table, min_history, "fit on train pages"),
          ("fillers", "slots", "watch ratio", "watched at match 80-89 / 90-94 / 95+",
           "regression AUC", "trees AUC"),
          ((r.exposure, f"{r.slots:,}", f"{r.watch_ratio:.3f}",
            f"{r.watch_match_80_90:.2f} / {r.watch_match_90_95:.2f} / "
            f"{r.watch_match_95_101:.2f}", f"{r.valid_list_auc:.3f}",
            f"{r.valid_list_auc_trees:.3f}") for r in table.itertuples()))


def _matches(users: int, seed: int, min_history: int) -> None:
    table = match_regression(load_world(), users=users, min_history=min_history, seed=seed)
    _show(_pages_title(table, min_history, "the match on train pages, scorers fit on them"),
          ("match", "slots", "match AUC, train pages", "match AUC, lists", "regression AUC",
           "trees AUC"),
          ((r.match, f"{r.slots:,}", f"{r.train_page_auc:.3f}", f"{r.valid_list_match_auc:.3f}",
            f"{r.valid_list_auc:.3f}", f"{r.valid_list_auc_trees:.3f}")
           for r in table.itertuples()))
    cues = ("max_sim", "n_similar", "close_watched", "popularity")
    _show("the other cues' AUC on the same train pages", ("match", *cues),
          ((r.match, *(f"{getattr(r, 'train_page_auc_' + c):.3f}" for c in cues))
           for r in table.itertuples()))


def _page_counts(users: int, seed: int, min_history: int) -> None:
    table = page_count_regression(load_world(), COUNTS, users=users, min_history=min_history,
                                  seed=seed)
    _show(_pages_title(table, min_history, "fit on train pages")
          + f"; the lists' own page-mate pull {table.attrs['list_pull']:+.2f}",
          ("human items a page", "slots", "watch ratio", "page-mate pull learned",
           "regression AUC", "regression + page-mates AUC", "trees + page-mates AUC"),
          ((r.pages, f"{r.slots:,}", f"{r.watch_ratio:.3f}", f"{r.pull:+.2f}",
            f"{r.valid_list_auc_own:.3f}", f"{r.valid_list_auc_mates:.3f}",
            f"{r.valid_list_auc_trees:.3f}") for r in table.itertuples()))


def _pseudo_lists(users: int, seed: int, min_history: int) -> None:
    table = pseudo_list_regression(load_world(), users=users, min_history=min_history,
                                   seed=seed)
    _show(f"fit on train-only sources ({table.attrs['users']} users, >= {min_history} earlier "
          f"ratings) -> {table.attrs['lists']} validation 1:1 lists; the match alone "
          f"{table.attrs['match_alone']:.3f}; the regression fit on those lists (5-fold) "
          f"{table.attrs['validation_bar']:.3f}",
          ("source", "rows", "positive share", "regression AUC", "trees AUC"),
          ((r.source, f"{r.rows:,}", f"{r.positive_share:.3f}", f"{r.valid_list_auc:.3f}",
            f"{r.valid_list_auc_trees:.3f}") for r in table.itertuples()))


def _thresholds(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers") from None
    if any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: thresholds must be >= 0")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=400, help="train users sampled")
    ap.add_argument("--min-history", type=_thresholds, default=None,
                    help="comma-separated thresholds to compare (default 0,1,3,5,10,20); with "
                         "--exposures the first, default the training default")
    ap.add_argument("--exposures", action="store_true",
                    help="compare filler mixtures instead of history thresholds")
    ap.add_argument("--lambdas", type=lambda t: [float(x) for x in t.split(",")],
                    default=None, help="comma-separated EASE weights: the match alone on "
                    "validation 1:1 lists for each, and for the summed cosine")
    ap.add_argument("--match", action="store_true",
                    help="compare match variants (summed cosine, EASE with and without the "
                    "person's own row) instead of history thresholds")
    ap.add_argument("--page-counts", action="store_true",
                    help="compare page compositions (how many of the human's items a page "
                    "holds) instead of history thresholds")
    ap.add_argument("--pseudo-lists", action="store_true",
                    help="compare train-only sources (training pages, lists cut from train "
                    "ratings) against the regression fit on validation lists")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.lambdas:
        table = match_lambdas(load_world(), args.lambdas, seed=args.seed)
        _show(f"the match alone on {table['lists'].iloc[0]} validation 1:1 lists",
              ("match", "mean per-user AUC"),
              ((r.match, f"{r.valid_list_match_auc:.3f}") for r in table.itertuples()))
        return
    if args.match:
        _matches(args.users, args.seed, args.min_history[0] if args.min_history
                 else TrainConfig().min_history)
        return
    if args.pseudo_lists:
        _pseudo_lists(args.users, args.seed, args.min_history[0] if args.min_history
                      else TrainConfig().min_history)
        return
    if args.page_counts:
        _page_counts(args.users, args.seed, args.min_history[0] if args.min_history
                     else TrainConfig().min_history)
        return
    if args.exposures:
        _exposures(args.users, args.seed, args.min_history[0] if args.min_history
                   else TrainConfig().min_history)
        return
    table = page_regression(load_world(), users=args.users, seed=args.seed,
                            min_histories=args.min_history or [0, 1, 3, 5, 10, 20])
    _show(f"fit on train pages ({table.attrs['users']} users) -> {table.attrs['lists']} "
          f"validation 1:1 lists; the match cue alone: {table.attrs['match_alone']:.3f}",
          ("earlier ratings >=", "visits", "slots", "regression AUC", "trees AUC"),
          ((str(r.min_history), f"{r.visits:,}", f"{r.slots:,}", f"{r.valid_list_auc:.3f}",
            f"{r.valid_list_auc_trees:.3f}") for r in table.itertuples()))

if __name__ == "__main__":
    main()
