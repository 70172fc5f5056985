"""Typed users, items and the interaction log, with validation that names each problem once.

Interactions stay a pandas DataFrame (columns ``user, item, rating, timestamp``) because the
recommenders (LensKit) and the splits work on frames; users and items are small pydantic models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

RATING_MIN, RATING_MAX = 1, 5
COLUMNS = ["user", "item", "rating", "timestamp"]
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem with input data; its message is one line a user can act on."""


class User(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: int
    age: int | None = None
    gender: str | None = None
    occupation: str | None = None


class Item(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: int
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.title} ({self.year})" if self.year else self.title


@dataclass
class Dataset:
    name: str
    users: dict[int, User]
    items: dict[int, Item]
    ratings: pd.DataFrame = field(repr=False)

    def __post_init__(self) -> None:
        self.ratings = sort_log(self.ratings)

    @property
    def genres(self) -> list[str]:
        return sorted({g for it in self.items.values() for g in it.genres})


def sort_log(ratings: pd.DataFrame) -> pd.DataFrame:
    """Chronological order with ties broken by item id, so same-second bursts are deterministic."""
    out = ratings[COLUMNS].astype({"user": "int64", "item": "int64", "rating": "float64",
                                   "timestamp": "int64"})
    return out.sort_values(["user", "timestamp", "item"], kind="mergesort").reset_index(drop=True)


def _plain(value: float) -> int | float:
    """-874965758, not -8.74966e+08 or -874965758.0, in messages."""
    return int(value) if float(value).is_integer() else float(value)


def _first(source: str, ratings: pd.DataFrame, mask: pd.Series) -> tuple[str, pd.Series]:
    """Where the first flagged row is (``file line N`` when the reader kept line numbers as the
    index, else ``name row N``) and that row; positional, so a repeated index label is fine."""
    pos = int(np.argmax(mask.to_numpy()))
    return f"{source} {ratings.index.name or 'row'} {ratings.index[pos]}", ratings.iloc[pos]


def drop_duplicates(source: str, ratings: pd.DataFrame) -> pd.DataFrame:
    """Keep each (user, item) pair's latest rating by timestamp (a tie: the later row).

    A re-rating replaces the old one in MovieLens, and one rating per pair is what the splits and
    the recommenders assume; one warning line names the file and how many rows were dropped.
    """
    dup = ratings.duplicated(["user", "item"], keep=False)
    if not dup.any():
        return ratings
    order = ratings.assign(_pos=np.arange(len(ratings))).sort_values(
        ["timestamp", "_pos"], kind="mergesort")
    kept = order.drop_duplicates(["user", "item"], keep="last").sort_values("_pos")
    dropped = len(ratings) - len(kept)
    log.warning("%s: dropped %d duplicate (user, item) row(s), keeping each pair's latest "
                "rating by timestamp", source, dropped)
    return kept.drop(columns="_pos")


def validate(name: str, users: dict[int, User], items: dict[int, Item],
             ratings: pd.DataFrame, source: str | None = None) -> Dataset:
    """Check the log against the catalogue; raise DataError with the first problem found.

    Rules, checked in this order (``source`` names the file in messages, default ``name``;
    readers index ``ratings`` by line number so a message can point at the row to fix):

    - every column present, no empty field, a non-empty log and catalogue;
    - timestamps are unix seconds, so a negative one is rejected;
    - ratings are whole stars RATING_MIN..RATING_MAX (the scale every dataset is mapped onto;
      the ml-latest reader maps its half stars first): anything else is rejected, never clipped;
    - duplicate (user, item) rows are not an error: the latest by timestamp is kept and one
      warning names the file and the count (see ``drop_duplicates``);
    - every item is in the catalogue, and every user in the user table when there is one.
    """
    source = source or name
    missing = [c for c in COLUMNS if c not in ratings.columns]
    if missing:
        raise DataError(f"{source}: interactions lack column(s) {', '.join(missing)}")
    if ratings.empty:
        raise DataError(f"{source}: the interaction log is empty")
    if not items:
        raise DataError(f"{name}: the item catalogue is empty")
    empty = ratings[COLUMNS].isna().any(axis=1)
    if empty.any():
        where, _ = _first(source, ratings, empty)
        raise DataError(f"{where}: empty field")
    negative = ratings["timestamp"] < 0
    if negative.any():
        where, r = _first(source, ratings, negative)
        raise DataError(f"{where}: timestamp {_plain(r.timestamp)} is negative (timestamps "
                        f"are unix seconds, >= 0); {int(negative.sum())} such row(s)")
    rating = ratings["rating"]
    bad = (rating < RATING_MIN) | (rating > RATING_MAX) | (rating != rating.round())
    if bad.any():
        where, r = _first(source, ratings, bad)
        raise DataError(f"{where}: rating {float(r.rating)} out of range (whole stars "
                        f"{RATING_MIN}-{RATING_MAX}; user {int(r.user)}, item {int(r['item'])}); "
                        f"{int(bad.sum())} such row(s)")
    ratings = drop_duplicates(source, ratings)
    unknown = ~ratings["item"].isin(list(items))
    if unknown.any():
        raise DataError(f"{source}: interactions name {int(ratings.loc[unknown, 'item'].nunique())}"
                        f" unknown item(s), e.g. {int(ratings.loc[unknown, 'item'].iloc[0])}")
    if users:
        unknown_u = ~ratings["user"].isin(list(users))
        if unknown_u.any():
            raise DataError(f"{source}: interactions name unknown user "
                            f"{int(ratings.loc[unknown_u, 'user'].iloc[0])}")
    else:
        users = {int(u): User(id=int(u)) for u in ratings["user"].unique()}
    return Dataset(name=name, users=users, items=items, ratings=ratings)
