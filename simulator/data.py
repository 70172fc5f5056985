"""Typed users, items and the interaction log, with validation that names each problem once.

Interactions stay a pandas DataFrame (columns ``user, item, rating, timestamp``) because the
recommenders (LensKit) and the splits work on frames; users and items are small pydantic models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from pydantic import BaseModel, ConfigDict

RATING_MIN, RATING_MAX = 1, 5
COLUMNS = ["user", "item", "rating", "timestamp"]


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


class Interaction(BaseModel):
    """One logged rating; used where single rows cross an API boundary."""

    model_config = ConfigDict(frozen=True)
    user: int
    item: int
    rating: float
    timestamp: int


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


def validate(name: str, users: dict[int, User], items: dict[int, Item],
             ratings: pd.DataFrame) -> Dataset:
    """Check the log against the catalogue; raise DataError with the first problem found."""
    missing = [c for c in COLUMNS if c not in ratings.columns]
    if missing:
        raise DataError(f"{name}: interactions lack column(s) {', '.join(missing)}")
    if ratings.empty:
        raise DataError(f"{name}: the interaction log is empty")
    if not items:
        raise DataError(f"{name}: the item catalogue is empty")
    if ratings[COLUMNS].isna().any().any():
        row = int(ratings[COLUMNS].isna().any(axis=1).idxmax())
        raise DataError(f"{name}: interaction row {row} has an empty field")
    bad = ratings[(ratings.rating < RATING_MIN) | (ratings.rating > RATING_MAX)]
    if len(bad):
        r = bad.iloc[0]
        raise DataError(f"{name}: rating {r.rating} out of range {RATING_MIN}-{RATING_MAX} "
                        f"(user {r.user}, item {r['item']}); {len(bad)} such row(s)")
    unknown = ~ratings["item"].isin(list(items))
    if unknown.any():
        raise DataError(f"{name}: interactions name {int(ratings.loc[unknown, 'item'].nunique())} "
                        f"unknown item(s), e.g. {int(ratings.loc[unknown, 'item'].iloc[0])}")
    if users:
        unknown_u = ~ratings["user"].isin(list(users))
        if unknown_u.any():
            raise DataError(f"{name}: interactions name unknown user "
                            f"{int(ratings.loc[unknown_u, 'user'].iloc[0])}")
    else:
        users = {int(u): User(id=int(u)) for u in ratings["user"].unique()}
    return Dataset(name=name, users=users, items=items, ratings=ratings)
