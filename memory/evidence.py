"""Personal evidence for one candidate item: what this person watched that resembles it.

A small model scoring items from popularity and average rating alone learns popularity and nothing
personal; handing it the person's own similar titles (and how they rated them) is what moves it.
Everything here is fitted on the train split only, so held-out items can never leak into evidence.

The same :meth:`ItemSimilarity.features` feeds the agent's perception, the logistic-regression
baseline and the regression that explains the agent's scores, so all three see identical numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import sparse

FEATURE_NAMES: tuple[str, ...] = ("popularity", "mean_rating", "max_sim", "mean_sim_top3",
                                  "sim_weighted_rating", "n_similar", "match",
                                  "close_watched", "close_rating")
TOP_SIMILAR = 3
CLOSEST = 20  # an item's closest neighbours whose watching (and ratings) the agent perceives
MATCH_LAMBDA = 1000.0
"""EASE's L2 weight behind the match percentile. Chosen on ml-100k's 375 validation 1:1 lists
(the match alone, mean per-user AUC; ``bench/bench_signal.py --lambdas``): 300 .865, 500 .869,
1000 .871, 2000 .867, 3000 .862; the summed cosine it replaced, .857."""
KNN_SHRINK = 0.5
"""Shrinkage of ``ItemSimilarity.knn_rating`` toward the item's mean (added to the summed
similarity it divides by). Chosen on the 669 ratings of the 200 evaluated users' validation
pages (RMSE, ``bench/bench_ratings.py --shrinks``): 0 .971, .25 .959, .5 .957, 1 .959, 2 .966."""
MAX_EASE_ITEMS = 10_000  # EASE keeps a dense item x item inverse: 800 MB of float64 at this size
_MATCH_DECIMALS = 7
# Dense similarity rows computed per block are bounded to about this many floats (128 MB).
_BLOCK_CELLS = 1 << 24


class ItemSimilarity:
    """Item–item cosine on the binary user×item train matrix, truncated to top-N neighbours.

    Implicit (watched or not) rather than rating-valued vectors: whether people watch two films
    together is what predicts watching; how this person rated the neighbours is added separately.
    Keeping N neighbours per item (symmetrised: j is kept for i when either lists the other) bounds
    memory at O(items × N) and makes a lookup O(N) however long the history is.
    """

    def __init__(self, n_neighbours: int = 50) -> None:
        if n_neighbours < 1:
            raise ValueError("n_neighbours must be at least 1")
        self.n_neighbours = n_neighbours
        self._index: dict[int, int] = {}
        self._ids = np.empty(0, dtype=np.int64)
        self._nbrs = sparse.csr_matrix((0, 0))
        self._ease: EaseMatch | None = None
        self._count = np.empty(0, dtype=np.int64)
        self._mean = np.empty(0)
        self.global_mean = float("nan")

    @classmethod
    def fit(cls, train: pd.DataFrame, n_neighbours: int = 50,
            match_lambda: float | None = MATCH_LAMBDA) -> ItemSimilarity:
        """Fit on a train ratings frame (columns user, item, rating); duplicates count once.

        ``match_lambda`` is EASE's weight for the match (``history_scores``); None, or a
        catalogue above ``MAX_EASE_ITEMS``, scores by summed cosine over the kept neighbours."""
        if train.empty:
            raise ValueError("cannot fit item similarity on an empty ratings frame")
        self = cls(n_neighbours)
        # Canonical row order, so means are the same floats however the frame was ordered.
        train = train.sort_values(["user", "item"], kind="mergesort")
        pairs = train[["user", "item"]].drop_duplicates()
        ids = np.sort(pairs["item"].unique()).astype(np.int64)
        self._ids = ids
        self._index = {int(i): k for k, i in enumerate(ids)}
        users, u_idx = np.unique(pairs["user"].to_numpy(), return_inverse=True)
        i_idx = np.searchsorted(ids, pairs["item"].to_numpy())
        x = sparse.csc_matrix((np.ones(len(pairs), dtype=np.float32), (u_idx, i_idx)),
                              shape=(len(users), len(ids)))
        self._nbrs = _top_neighbours(x, n_neighbours)
        if match_lambda is not None and len(ids) > MAX_EASE_ITEMS:
            warnings.warn(f"{len(ids):,} items: above {MAX_EASE_ITEMS:,}, the match is the summed "
                          "cosine, not EASE (its dense inverse would not fit)", stacklevel=2)
        elif match_lambda is not None:
            self._ease = EaseMatch.fit(x, match_lambda, users)

        stats = train.groupby("item")["rating"].agg(["size", "mean"]).reindex(ids)
        self._count = stats["size"].to_numpy(dtype=np.int64)
        self._mean = stats["mean"].to_numpy(dtype=np.float64)
        self.global_mean = float(train["rating"].mean())
        return self

    @property
    def items(self) -> np.ndarray:
        """Item ids seen in training, ascending."""
        return self._ids

    def neighbours(self, item: int) -> list[tuple[int, float]]:
        """Kept neighbours of ``item`` as (item, similarity), best first; [] for unseen items."""
        k = self._index.get(int(item))
        if k is None:
            return []
        lo, hi = self._nbrs.indptr[k], self._nbrs.indptr[k + 1]
        cols, sims = self._nbrs.indices[lo:hi], self._nbrs.data[lo:hi]
        order = np.lexsort((cols, -sims))
        return [(int(self._ids[cols[j]]), float(sims[j])) for j in order]

    def _history_matches(self, item: int,
                         history: Mapping[int, float]) -> list[tuple[int, float, float]]:
        k = self._index.get(int(item))
        if k is None or not history:
            return []
        lo, hi = self._nbrs.indptr[k], self._nbrs.indptr[k + 1]
        found = []
        for col, sim in zip(self._nbrs.indices[lo:hi], self._nbrs.data[lo:hi], strict=True):
            other = int(self._ids[col])
            if other != item and other in history:
                found.append((other, float(sim), float(history[other])))
        found.sort(key=lambda t: (-t[1], t[0]))
        return found

    def similar_in_history(self, item: int, history: Mapping[int, float],
                           k: int = TOP_SIMILAR) -> list[tuple[int, float, float]]:
        """The person's rated items most similar to ``item``: (item, similarity, their rating).

        Best first, ties by item id; the item itself is excluded (re-watching is not evidence).
        """
        return self._history_matches(item, history)[:k]

    def popularity(self, item: int) -> int:
        """Number of train ratings of ``item`` (0 when unseen)."""
        k = self._index.get(int(item))
        return 0 if k is None else int(self._count[k])

    def mean_rating(self, item: int) -> float | None:
        """Mean train rating of ``item``, or None when nobody rated it in train."""
        k = self._index.get(int(item))
        return None if k is None else float(self._mean[k])

    def history_scores(self, history: Mapping[int, float],
                       without: int | None = None) -> np.ndarray:
        """The collaborative score of every item for this person's history (watched or not).

        EASE's when fitted: on validation lists it ranks held-out items better than the summed
        cosine of the kept neighbours (see ``MATCH_LAMBDA``), which is the fallback,
        O(history × N). ``without`` names a train user whose own ratings are taken out of the
        EASE fit first: on that person's *training* pages their watches are the labels, and a
        fit that saw them scores them higher than any held-out item (see ``EaseMatch``)."""
        idx = [self._index[int(i)] for i in history if int(i) in self._index]
        if not idx:
            return np.zeros(len(self._ids))
        if self._ease is not None:
            return self._ease.scores(idx, without)
        return np.asarray(self._nbrs[idx].sum(axis=0)).ravel().astype(np.float64)

    def match_percentiles(self, history: Mapping[int, float],
                          without: int | None = None) -> dict[int, int]:
        """Person-relative match 0..100 of every item: the share of the catalogue whose
        collaborative score (``history_scores``) is below this item's. A raw score means little
        to a model (it grows with history length); a percentile reads the same for everyone.
        Scores are rounded to ``_MATCH_DECIMALS`` first: EASE leaves many items a hair apart,
        and BLAS round-off (which varies with its thread count) would reorder them."""
        scores = np.round(self.history_scores(history, without), _MATCH_DECIMALS)
        if not len(scores):
            return {}
        order = np.sort(scores)
        below = np.searchsorted(order, scores, side="left")
        pct = np.floor(100 * below / len(scores)).astype(int)
        return {int(i): int(p) for i, p in zip(self._ids, pct, strict=True)}

    def closest_watched(self, item: int, history: Mapping[int, float],
                        n: int = CLOSEST) -> tuple[int, float | None]:
        """How many of ``item``'s ``n`` closest items this person watched, and their mean
        rating of those (None when none): the collaborative evidence, in two small numbers."""
        close = [j for j, _ in self.neighbours(item)[:n]]
        rated = [float(history[j]) for j in close if j in history]
        return len(rated), (float(np.mean(rated)) if rated else None)

    def knn_rating(self, item: int, history: Mapping[int, float],
                   shrink: float = KNN_SHRINK) -> float:
        """Item-kNN rating with an item baseline: the item's mean plus the similarity-weighted
        mean of how far this person rated its kept neighbours from their means, shrunk toward
        the item's mean when little of the neighbourhood was watched. One number a small model
        can read: on held-out watched items it rates better than biased MF
        (``bench/bench_ratings.py``), while the person's mean and the closest items' mean
        rating do so only in a fitted combination."""
        base = self.mean_rating(item)
        base = self.global_mean if base is None else base
        num = den = 0.0
        for other, sim, rating in self._history_matches(item, history):
            other_mean = self.mean_rating(other)
            num += sim * (rating - (self.global_mean if other_mean is None else other_mean))
            den += sim
        return base + (num / (den + shrink) if den + shrink > 0 else 0.0)

    def features(self, item: int, history: Mapping[int, float],
                 match: Mapping[int, int] | None = None) -> dict[str, float]:
        """Numeric evidence for ``item`` given this person's train history {item: rating}.

        popularity is log1p(train count), so a few blockbusters do not swamp a linear model;
        mean_rating falls back to the global train mean for unseen items; mean_sim_top3 divides by
        3 whatever was found (an absent neighbour counts as similarity 0), so it grows with
        evidence; sim_weighted_rating falls back to the person's own mean rating (or the global
        mean for an empty history) when nothing similar was watched; n_similar counts all history
        items among the kept neighbours, not just the top 3. match, close_watched and
        close_rating are the numbers the agent reads on its page (``match`` may be passed when
        the percentiles of this history are already computed); close_rating falls back like
        sim_weighted_rating.
        """
        matches = self._history_matches(item, history)
        top = matches[:TOP_SIMILAR]
        n_close, close_rating = self.closest_watched(item, history)
        mean = self.mean_rating(item)
        if top and sum(s for _, s, _ in top) > 0:
            weighted = sum(s * r for _, s, r in top) / sum(s for _, s, _ in top)
        elif history:
            weighted = float(np.mean(list(history.values())))
        else:
            weighted = self.global_mean
        return {
            "popularity": math.log1p(self.popularity(item)),
            "mean_rating": self.global_mean if mean is None else mean,
            "max_sim": top[0][1] if top else 0.0,
            "mean_sim_top3": sum(s for _, s, _ in top) / TOP_SIMILAR,
            "sim_weighted_rating": float(weighted),
            "n_similar": float(len(matches)),
            "match": float((match if match is not None else self.match_percentiles(history))
                           .get(int(item), 0)),
            "close_watched": float(n_close),
            "close_rating": float(weighted if close_rating is None else close_rating),
        }


class EaseMatch:
    """EASE (Steck, 2019): item-to-item weights B = -P / diag(P), zero diagonal, with
    P = (XᵀX + λI)⁻¹ on the binary user×item train matrix; a history's score is the sum of its
    rows of B.

    Leave-one-person-out for training pages: their labels (the items watched in the session)
    sit in X's row of the same person, so a fit that saw that row scores them far above what a
    held-out item gets (on 400 train users' pages the match's AUC was 0.900 with the row, 0.815
    without it, against 0.871 on validation lists: ``bench/bench_signal.py --match``).
    Removing one row is a rank-one downdate of P (Sherman–Morrison), exact and
    O(items × history) per page.

    LensKit's ``EASEScorer`` fits the same B (``tests/test_memory.py`` compares them); it is not
    used here because its first training sets LensKit's process-wide parallelism (torch at one
    thread, see ``simulator.recommenders.keep_torch_threads``) and it has no downdate."""

    def __init__(self, x: sparse.spmatrix, lam: float, users: np.ndarray) -> None:
        if lam <= 0:
            raise ValueError("match_lambda must be positive")
        self._x, self._lam = x.tocsr(), float(lam)
        self._users = np.asarray(users)
        self._row_of = {int(u): k for k, u in enumerate(self._users)}
        gram = (self._x.T @ self._x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self._lam
        self._inv = np.linalg.inv(gram)
        self._diag = np.diag(self._inv).copy()

    @classmethod
    def fit(cls, x: sparse.spmatrix, lam: float, users: np.ndarray) -> EaseMatch:
        """``x`` users × items (binary), its rows the train ``users`` (kept for ``without``)."""
        return cls(x, lam, users)

    def __getstate__(self) -> dict:
        # The dense inverse is items² float64 (20 MB on ml-100k) while X is under 1 MB, and the
        # inverse takes about a second to refit: pickles (training and evaluation files that
        # travel to another machine) carry X and λ only.
        return {"x": self._x, "lam": self._lam, "users": self._users}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["x"], state["lam"], state["users"])

    def scores(self, idx: list[int], without: int | None = None) -> np.ndarray:
        """Scores of every item for the history columns ``idx``, from a fit without the train
        row of user ``without`` (None, or a user with no train row: the full fit)."""
        inv_rows, diag = self._inv[idx].sum(axis=0), self._diag
        k = None if without is None else self._row_of.get(int(without))
        out_row = None if k is None else self._x.indices[self._x.indptr[k]:self._x.indptr[k + 1]]
        if out_row is not None and len(out_row):
            v = self._inv[:, out_row].sum(axis=1)  # P x for the removed row x
            scale = 1.0 / (1.0 - float(v[out_row].sum()))
            inv_rows = inv_rows + scale * float(v[idx].sum()) * v
            diag = diag + scale * v * v
        scores = -inv_rows / diag
        scores[idx] += 1.0  # B's diagonal is zero: drop each history item's own -1
        return scores


def _top_neighbours(x: sparse.csc_matrix, n: int) -> sparse.csr_matrix:
    """Symmetrised top-n cosine neighbours per column of ``x``, computed in bounded blocks."""
    n_items = x.shape[1]
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    norms[norms == 0] = 1.0
    xt = x.T.tocsr()
    keep = min(n, max(n_items - 1, 0))
    block = max(1, _BLOCK_CELLS // max(n_items, 1))
    rows, cols, vals = [], [], []
    for start in range(0, n_items, block):
        stop = min(start + block, n_items)
        sims = (xt[start:stop] @ x).toarray() / norms[start:stop, None] / norms[None, :]
        sims[np.arange(stop - start), np.arange(start, stop)] = 0.0
        if keep == 0:
            continue
        # Stable sort so equal similarities keep the lower item index: same neighbours every run.
        top = np.argsort(-sims, axis=1, kind="stable")[:, :keep]
        top_vals = np.take_along_axis(sims, top, axis=1)
        ok = top_vals > 0
        rows.append(np.broadcast_to(np.arange(start, stop)[:, None], top.shape)[ok])
        cols.append(top[ok])
        vals.append(top_vals[ok])
    if not rows:
        return sparse.csr_matrix((n_items, n_items), dtype=np.float32)
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    half = sparse.coo_matrix((v, (r, c)), shape=(n_items, n_items)).tocsr()
    # Cosine is symmetric, so the larger of the two entries is the similarity itself.
    return half.maximum(half.T).tocsr().astype(np.float32)
