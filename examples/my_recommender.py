"""A recommender of one's own, in the shape ``--recommenders MODULE:FACTORY`` expects.

``factory()`` returns an unfitted object with ``name``, ``fit``, ``rank`` and ``scores`` (the
``simulator.recommenders.Recommender`` protocol). This one blends popularity with a damped mean
rating, so well-liked films beat merely frequent ones, and reacts to a session by favouring
films that people who rated the session's films also rated:

    alignuser recommenders eval --recommenders pop,examples.my_recommender:factory --k 10
    alignuser simulate --policy random --recommenders pop,examples.my_recommender:factory

``python -m examples.my_recommender ranks.csv`` writes its top-50 per ml-100k user as a ranking
file (``user,item,score``), the form a list exported by another system takes; evaluate it with
``--recommenders ranks.csv``.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

DAMPING = 10.0
"""Ratings of pseudo-votes at the global mean: a film needs about this many to stand on its own."""
SESSION_WEIGHT = 0.5


class PopularQuality:
    """z(log count) + z(damped mean rating) + SESSION_WEIGHT * co-rating with the session."""

    name = "pop-quality"

    def fit(self, train: pd.DataFrame) -> PopularQuality:
        stats = train.groupby("item")["rating"].agg(["count", "sum"])
        mean = float(train["rating"].mean())
        damped = (stats["sum"] + DAMPING * mean) / (stats["count"] + DAMPING)
        pop = np.log1p(stats["count"])
        self.items = stats.index.to_numpy(dtype=np.int64)
        self.pos = {int(i): p for p, i in enumerate(self.items)}
        self.base = (_z(pop.to_numpy()) + _z(damped.to_numpy())).astype(np.float64)
        self.raters = {int(i): set(g.tolist()) for i, g in train.groupby("item")["user"]}
        self.seen = {int(u): set(g.tolist()) for u, g in train.groupby("user")["item"]}
        return self

    def _all(self, session: Sequence[int]) -> np.ndarray:
        if not session:
            return self.base
        users = set().union(*(self.raters.get(int(i), set()) for i in session))
        co = np.zeros(len(self.items))
        for u in users:
            for i in self.seen.get(u, ()):
                co[self.pos[i]] += 1.0
        return self.base + SESSION_WEIGHT * _z(np.log1p(co))

    def rank(self, user: int, k: int, exclude: Collection[int] = (),
             session: Sequence[int] = ()) -> list[int]:
        banned = set(exclude) | set(session) | self.seen.get(int(user), set())
        order = np.lexsort((self.items, -self._all(session)))
        return [int(i) for i in self.items[order] if int(i) not in banned][:k]

    def scores(self, user: int, items: Sequence[int], session: Sequence[int] = ()) -> np.ndarray:
        all_ = self._all(session)
        low = float(all_.min()) - 1.0
        return np.asarray([all_[self.pos[int(i)]] if int(i) in self.pos else low for i in items])


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() or 1.0)


def factory() -> PopularQuality:
    return PopularQuality()


def write_ranking_file(rec: PopularQuality, users: Sequence[int], path: str, k: int = 50) -> None:
    """Each user's top-``k`` as ``user,item,score`` rows (``score`` from ``rec.scores``)."""
    rows = []
    for u in users:
        top = rec.rank(u, k)
        rows += [(u, i, s) for i, s in zip(top, rec.scores(u, top), strict=True)]
    pd.DataFrame(rows, columns=["user", "item", "score"]).to_csv(path, index=False)


if __name__ == "__main__":
    from alignuser.config import world_for

    world = world_for()
    out = sys.argv[1] if len(sys.argv) > 1 else "ranks.csv"
    write_ranking_file(factory().fit(world.split.train),
                       sorted(world.split.train["user"].unique().tolist()), out)
    print(f"wrote {out}")
