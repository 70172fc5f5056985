"""The recommenders under evaluation, behind one small page-by-page interface.

Simulated users ask for one page at a time, so every recommender answers ``rank(user, k, exclude,
session)``. In *reactive* mode (the default) a page is recomputed from the user's training
history plus the items watched earlier in this session, so an action changes what comes next:

- ``itemknn``, ``userknn``, ``ease``: the session items join the history in the LensKit
  ``RecQuery``.
- ``als``: LensKit's ImplicitMF folds the extended history into a fresh user embedding; it always
  folds in (also without a session) so a page changes only because of what was watched.
- ``bpr``: LensKit's FlexMF cannot fold in a history (it scores by trained user row only), so
  its score is blended: the per-user standardised BPR score plus ``SESSION_WEIGHT`` times the
  implicit item-kNN score of each item against the session items.
- ``pop``, ``random``: not personalised by history, so a session does not move them.

Static mode (``reactive=False``) ignores the session when scoring, as in Agent4Rec's fixed
ranking. Either way, items in the training history, in the session and in ``exclude`` never
appear on a page. Ties, and items a model cannot score, fall back to popularity, then item id.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from lenskit import parallel
from lenskit.als import ImplicitMFScorer
from lenskit.basic import PopScorer, RandomSelector
from lenskit.data import Dataset as LKDataset
from lenskit.data import ItemList, RecQuery, from_interactions_df
from lenskit.flexmf import FlexMFImplicitScorer
from lenskit.knn import EASEScorer, ItemKNNScorer, UserKNNScorer
from lenskit.training import TrainingOptions

RECOMMENDERS: tuple[str, ...] = ("random", "pop", "itemknn", "userknn", "als", "bpr", "ease")
SELECTION: tuple[str, ...] = ("pop", "itemknn", "userknn", "als", "bpr")
"""The recommenders an evaluation ranks by default, and those whose sessions fit the sampled
exit offset (``training.session_offsets.session_offsets``)."""
KNN_NEIGHBOURS = 20
ALS_FACTORS = 50
EASE_REGULARIZATION = 1000.0
"""EASE's L2 weight: the value the agent's match percentile uses (``memory.evidence``), chosen
there on ml-100k validation lists."""
SESSION_WEIGHT = 0.25
"""Weight of the session item-kNN term in the BPR blend, in units of the user's BPR score spread.

Chosen on ml-100k so that one watched item moves the next BPR page about as much as ALS fold-in
moves an ALS page: the next top-10 with and without the watched item share about 94% of items."""
_SESSION_CACHE = 512
_EMPTY = np.zeros(0, dtype=np.int64)


@functools.cache
def keep_torch_threads() -> None:
    """Configure LensKit's parallelism once per process, before its first training.

    Left to its defaults, LensKit's first training sets torch's intra-op threads (and the BLAS
    threads) to its ``backend_threads``, cores // its worker threads: 1 on a 2-core machine.
    Every later LLM forward in the process (simulate with itemknn or bpr pages, evaluate's
    baselines) then ran on one core of two. Its backend threads are torch's current count
    instead, unless ``LK_NUM_BACKEND_THREADS`` sets them."""
    if "LK_NUM_BACKEND_THREADS" in os.environ:
        return
    with warnings.catch_warnings():  # interop threads cannot change once torch has used them
        warnings.simplefilter("ignore", RuntimeWarning)
        parallel.initialize(backend_threads=torch.get_num_threads())


class Recommender(Protocol):
    """What the simulator needs from a recommender: fit once, then rank or score per page.

    ``fit`` gets the training frame (``user, item, rating, timestamp``) and returns the object;
    ``rank`` returns up to ``k`` item ids, best first, none of them in ``exclude``, the session or
    the user's training history; ``scores`` gives one number per item (higher is better).
    ``session`` lists the items watched earlier in this visit, oldest first. Any object with
    these members can be named ``module:factory`` (``simulator.custom``)."""

    name: str

    def fit(self, train: pd.DataFrame) -> Recommender: ...

    def rank(self, user: int, k: int, exclude: Collection[int] = (),
             session: Sequence[int] = ()) -> list[int]: ...

    def scores(self, user: int, items: Sequence[int],
               session: Sequence[int] = ()) -> np.ndarray: ...


class LensKitRecommender:
    """Shared catalogue, history, caching and filtering around one LensKit scorer.

    Subclasses only map (user, history, session) to raw catalogue scores; everything a page needs
    on top (tie-breaking, exclusion, caching) lives here so every model behaves alike.
    """

    uses_session = True

    def __init__(self, name: str, reactive: bool = True, seed: int = 0) -> None:
        self.name = name
        self.reactive = reactive
        self.seed = seed
        self._fitted = False

    def __repr__(self) -> str:
        mode = "reactive" if self.reactive else "static"
        return f"<{type(self).__name__} {self.name} {mode} seed={self.seed}>"

    # ---- training -------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame) -> LensKitRecommender:
        frame = train[["user", "item", "rating", "timestamp"]].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            data = from_interactions_df(frame)
        self._ids = np.asarray(data.items.ids(), dtype=np.int64)
        self._pos = {int(i): p for p, i in enumerate(self._ids)}
        self._catalog = ItemList(item_ids=self._ids)
        counts = train.groupby("item").size().reindex(self._ids, fill_value=0)
        self._pop = counts.to_numpy(dtype=np.float64)
        hist = train.drop_duplicates(["user", "item"])
        self._history = {int(u): g.to_numpy(dtype=np.int64)
                         for u, g in hist.groupby("user", sort=False)["item"]}
        self._history_list: dict[int, ItemList] = {}
        self._base: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._seen: dict[int, np.ndarray] = {}
        self._seen_count: dict[int, int] = {}
        self._sessions: OrderedDict[tuple[int, tuple[int, ...]],
                                    tuple[np.ndarray, np.ndarray]] = OrderedDict()
        keep_torch_threads()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            self._train(data, TrainingOptions(rng=self.seed))
        self._fitted = True
        return self

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        raise NotImplementedError

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        """Scores for the whole catalogue (NaN where the model has none)."""
        raise NotImplementedError

    # ---- helpers ----------------------------------------------------------------------------
    def history(self, user: int) -> np.ndarray:
        """The user's distinct training items, oldest first."""
        return self._history.get(int(user), _EMPTY)

    def _history_items(self, user: int) -> ItemList:
        il = self._history_list.get(user)
        if il is None:
            il = self._history_list[user] = ItemList(item_ids=self.history(user))
        return il

    def _session_query(self, user: int, session: np.ndarray) -> RecQuery:
        """History plus this session, for scorers that read both (ItemKNN, ALS)."""
        return RecQuery(user_id=user, history_items=self._history_items(user),
                        session_items=ItemList(item_ids=session) if len(session) else None,
                        query_source={"history", "session"})

    def _session_items(self, user: int, session: Sequence[int]) -> np.ndarray:
        """Distinct, in-catalogue session items not already in the history (the ones that count)."""
        if not session or not self.reactive or not self.uses_session:
            return _EMPTY
        known = set(self.history(user).tolist())
        out: list[int] = []
        for i in session:
            i = int(i)
            if i in self._pos and i not in known:
                known.add(i)
                out.append(i)
        return np.asarray(out, dtype=np.int64)

    def _order(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Finite scores (NaN -> below the lowest) and the catalogue order they imply."""
        raw = np.asarray(raw, dtype=np.float64)
        finite = np.isfinite(raw)
        floor = float(raw[finite].min()) - 1.0 if finite.any() else 0.0
        filled = np.where(finite, raw, floor)
        key = np.where(finite, raw, -np.inf)
        order = np.lexsort((self._ids, -self._pop, -key))
        return filled, order

    def _scored(self, user: int, session: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        if not self._fitted:
            raise RuntimeError(f"recommender {self.name!r} is not fitted; call fit(train) first")
        user = int(user)
        sess = self._session_items(user, session)
        if len(sess) == 0:
            hit = self._base.get(user)
            if hit is None:
                hit = self._base[user] = self._order(self._raw_scores(user, _EMPTY))
            return hit
        key = (user, tuple(sess.tolist()))
        cached = self._sessions.get(key)
        if cached is None:
            cached = self._sessions[key] = self._order(self._raw_scores(user, sess))
            if len(self._sessions) > _SESSION_CACHE:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(key)
        return cached

    # ---- the interface ----------------------------------------------------------------------
    def rank(self, user: int, k: int, exclude: Collection[int] = (),
             session: Sequence[int] = ()) -> list[int]:
        """Top-k unseen item ids, best first (fewer only if the catalogue runs out)."""
        _, order = self._scored(user, session)
        seen = self._seen.get(int(user))
        if seen is None:
            seen = np.zeros(len(self._ids), dtype=bool)
            seen[[self._pos[i] for i in self.history(user).tolist()]] = True
            self._seen[int(user)] = seen
        # Only the head of the order can be needed: at most every seen, session and excluded
        # item ranks above the k-th pick (a full mask per page dominated trajectory building).
        excluded = {int(i) for i in session} | {int(i) for i in exclude}
        head = order[:k + len(excluded) + self._n_seen(user, seen)]
        ids = self._ids[head[~seen[head]]].tolist()
        return [i for i in ids if i not in excluded][:k]

    def _n_seen(self, user: int, seen: np.ndarray) -> int:
        n = self._seen_count.get(user)
        if n is None:
            n = self._seen_count[user] = int(seen.sum())
        return n

    def scores(self, user: int, items: Sequence[int], session: Sequence[int] = ()) -> np.ndarray:
        """Scores for given items (higher is better); unscorable or unknown items get the lowest."""
        filled, _ = self._scored(user, session)
        floor = float(filled.min()) if len(filled) else 0.0
        pos = np.fromiter((self._pos.get(int(i), -1) for i in items), dtype=np.int64,
                          count=len(items))
        out = np.full(len(pos), floor, dtype=np.float64)
        ok = pos >= 0
        out[ok] = filled[pos[ok]]
        return out


class RandomRecommender(LensKitRecommender):
    """A fixed random order per user (LensKit RandomSelector seeded by (seed, user))."""

    uses_session = False

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        self._selector = RandomSelector(n=-1, rng=(self.seed, "user"))

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        perm = self._selector(self._catalog, RecQuery(user_id=user)).ids()
        out = np.empty(len(self._ids), dtype=np.float64)
        out[[self._pos[int(i)] for i in perm]] = np.arange(len(perm), 0, -1, dtype=np.float64)
        return out


class PopRecommender(LensKitRecommender):
    """Most popular by training interaction count; the same list for everyone."""

    uses_session = False

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        self._scorer = PopScorer(score="count")
        self._scorer.train(data, options)
        self._all = self._scorer(self._catalog).scores()

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        return self._all


class _QueryRecommender(LensKitRecommender):
    """A LensKit scorer that reads history and session from one ``RecQuery``."""

    def _new_scorer(self) -> Any:
        raise NotImplementedError

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        self._scorer = self._new_scorer()
        self._scorer.train(data, options)

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        return self._scorer(self._session_query(user, session), self._catalog).scores()


class ItemKNNRecommender(_QueryRecommender):
    """Implicit item-item kNN; the session joins the history through ``RecQuery``."""

    def _new_scorer(self) -> Any:
        return ItemKNNScorer(k=KNN_NEIGHBOURS, feedback="implicit")


class UserKNNRecommender(LensKitRecommender):
    """Implicit user-user kNN; UserKNN reads only the history, so the session is appended to it."""

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        self._scorer = UserKNNScorer(k=KNN_NEIGHBOURS, feedback="implicit")
        self._scorer.train(data, options)

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        hist = self.history(user)
        items = ItemList(item_ids=np.concatenate([hist, session])) if len(session) else \
            self._history_items(user)
        return self._scorer(RecQuery(user_id=user, history_items=items), self._catalog).scores()


class ALSRecommender(_QueryRecommender):
    """Implicit-feedback ALS (Hu et al.) with the user embedding folded in from history+session."""

    def _new_scorer(self) -> Any:
        return ImplicitMFScorer(embedding_size=ALS_FACTORS)


class BPRRecommender(LensKitRecommender):
    """FlexMF BPR, standardised per user (a z-score keeps the order and gives the session blend
    a fixed scale); sessions act through an item-kNN blend because FlexMF has no fold-in."""

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        self._scorer = FlexMFImplicitScorer(preset="bpr")
        self._scorer.train(data, options)
        self._knn: ItemKNNScorer | None = None
        if self.reactive:
            self._knn = ItemKNNScorer(k=KNN_NEIGHBOURS, feedback="implicit")
            self._knn.train(data, options)

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # torch.from_numpy on LensKit's read-only id array
            warnings.simplefilter("ignore", UserWarning)
            raw = self._scorer(RecQuery(user_id=user), self._catalog).scores()
        base = np.asarray(raw, dtype=np.float64)
        finite = np.isfinite(base)
        if not finite.any():
            return base
        base = (base - float(base[finite].mean())) / (float(base[finite].std()) or 1.0)
        if len(session) == 0 or self._knn is None:
            return base
        near = self._knn(RecQuery(user_id=user, session_items=ItemList(item_ids=session)),
                         self._catalog).scores()
        return base + SESSION_WEIGHT * np.nan_to_num(np.asarray(near, dtype=np.float64))


class EASERecommender(_QueryRecommender):
    """EASE (Steck, 2019): closed-form item-item weights; history and session both count."""

    def _new_scorer(self) -> Any:
        return EASEScorer(regularization=EASE_REGULARIZATION)


_BUILTINS: dict[str, type[LensKitRecommender]] = {
    "random": RandomRecommender,
    "pop": PopRecommender,
    "itemknn": ItemKNNRecommender,
    "userknn": UserKNNRecommender,
    "als": ALSRecommender,
    "bpr": BPRRecommender,
    "ease": EASERecommender,
}


def make_recommender(name: str, reactive: bool = True, seed: int = 0) -> Recommender:
    """An unfitted built-in recommender by name; call ``fit(train)`` before ranking."""
    cls = _BUILTINS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown recommender {name!r}; known: {', '.join(RECOMMENDERS)}")
    return cls(name.lower(), reactive=reactive, seed=seed)
