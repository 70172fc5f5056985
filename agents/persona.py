"""Who the simulated user is, built from the train split only and rendered as a fixed text prefix.

Traits follow Agent4Rec's public protocol (METHOD.md): each is a raw per-user number cut into
three tiers at percentiles over users, a value below the lower cut being the lowest tier.
Nothing from validation or test may enter a persona: held-out favourites would hand the agent the
answers it is scored on. The rendered text is the cached prompt prefix of every decision, so it
depends on the persona alone and never on the page being shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from simulator.data import Dataset, Item, sort_log

Tier = Literal["low", "medium", "high"]
# Percentile cuts over users, per METHOD.md (Agent4Rec).
ACTIVITY_CUTS = (60.0, 90.0)
DIVERSITY_CUTS = (33.0, 66.0)
CONFORMITY_CUTS = (25.0, 80.0)
LIKED_MIN = 4.0
DISLIKED_MAX = 2.0
N_GENRES, N_DISLIKED_GENRES, N_FAVOURITES, N_DISLIKED_TITLES = 3, 2, 3, 2


class GenreStat(BaseModel):
    """A genre in one person's history: ``count`` ratings behind it, their mean rating."""

    model_config = ConfigDict(frozen=True)
    genre: str
    count: int
    mean: float


class Persona(BaseModel):
    """Demographics, three behavioural traits (tier and raw value) and taste, from train only.

    liked_genres: genres of items rated >= 4, most such items first (count = those items).
    disliked_genres: genres with >= 2 ratings whose mean is below the person's own mean rating and
    that are not among the liked genres shown, lowest mean first (count = all ratings in it).
    conformity is high when ratings stay close to items' mean ratings (low ``rating_deviation``),
    as Agent4Rec's "dedicated follower"; it is "medium" when there is nothing to compare.
    """

    model_config = ConfigDict(frozen=True)
    user_id: int
    age: int | None = None
    gender: str | None = None
    occupation: str | None = None
    activity: Tier
    diversity: Tier
    conformity: Tier
    n_ratings: int
    n_genres_80: int
    rating_deviation: float | None
    rating_mean: float | None
    rating_std: float | None
    liked_genres: tuple[GenreStat, ...] = ()
    disliked_genres: tuple[GenreStat, ...] = ()
    favourite_items: tuple[int, ...] = ()
    disliked_items: tuple[int, ...] = ()


def tier(value: float, cuts: tuple[float, float]) -> Tier:
    """Agent4Rec's rule: below the first cut is low, below the second is medium, else high."""
    return "low" if value < cuts[0] else "medium" if value < cuts[1] else "high"


def _genre_rows(items: Mapping[int, Item]) -> pd.DataFrame:
    rows = [(i, g) for i, it in items.items() for g in it.genres]
    return pd.DataFrame(rows, columns=["item", "genre"]).astype({"item": "int64"})


def trait_values(items: Mapping[int, Item], train: pd.DataFrame,
                 item_means: pd.Series | None = None) -> pd.DataFrame:
    """Raw trait values per user with train ratings: n_ratings, n_genres_80, rating_deviation.

    Genre mass counts each rated item once per genre; n_genres_80 is the smallest number of the
    person's most frequent genres whose share of that mass reaches 80%.
    """
    n = train.groupby("user").size().rename("n_ratings")
    ug = train[["user", "item"]].merge(_genre_rows(items), on="item")
    counts = ug.groupby(["user", "genre"]).size().rename("c").reset_index()
    counts = counts.sort_values(["user", "c"], ascending=[True, False], kind="mergesort")
    total = counts.groupby("user")["c"].transform("sum")
    before = counts.groupby("user")["c"].cumsum() - counts["c"]
    # Integer test (5*before < 4*total) avoids float error exactly at the 80% boundary.
    needed = (5 * before < 4 * total).groupby(counts["user"]).sum().rename("n_genres_80")
    item_mean = (train.groupby("item")["rating"].transform("mean") if item_means is None
                 else train["item"].map(item_means))
    dev = ((train["rating"] - item_mean) ** 2).groupby(train["user"]).mean()
    out = pd.concat([n, needed, dev.rename("rating_deviation")], axis=1)
    out["n_genres_80"] = out["n_genres_80"].fillna(0).astype("int64")
    return out


def trait_cuts(values: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Percentile thresholds over users (numpy's default linear interpolation)."""
    def cuts(col: str, q: tuple[float, float]) -> tuple[float, float]:
        lo, hi = np.percentile(values[col].to_numpy(dtype=float), q)
        return float(lo), float(hi)

    return {"activity": cuts("n_ratings", ACTIVITY_CUTS),
            "diversity": cuts("n_genres_80", DIVERSITY_CUTS),
            "conformity": cuts("rating_deviation", CONFORMITY_CUTS)}


def _ordered_titles(train: pd.DataFrame, mask: pd.Series, n: int) -> dict[int, tuple[int, ...]]:
    """Per user, up to n matching items, most recent first, ties by item id."""
    sel = train.loc[mask, ["user", "item", "timestamp"]]
    sel = sel.sort_values(["user", "timestamp", "item"], ascending=[True, False, True],
                          kind="mergesort")
    head = sel.groupby("user").head(n)
    return {int(u): tuple(int(i) for i in g) for u, g in head.groupby("user")["item"]}


def _genre_tastes(items: Mapping[int, Item], train: pd.DataFrame,
                  user_mean: pd.Series) -> tuple[dict[int, tuple[GenreStat, ...]],
                                                 dict[int, tuple[GenreStat, ...]]]:
    ug = train[["user", "item", "rating"]].merge(_genre_rows(items), on="item")
    stats = ug.groupby(["user", "genre"])["rating"].agg(["size", "mean"]).reset_index()
    liked_n = (ug[ug["rating"] >= LIKED_MIN].groupby(["user", "genre"]).size()
               .rename("liked").reset_index())
    liked = liked_n.merge(stats, on=["user", "genre"])
    liked = liked.sort_values(["user", "liked", "genre"], ascending=[True, False, True],
                              kind="mergesort").groupby("user").head(N_GENRES)
    liked_out: dict[int, tuple[GenreStat, ...]] = {}
    shown: set[tuple[int, str]] = set()
    for r in liked.itertuples(index=False):
        liked_out.setdefault(int(r.user), ())
        liked_out[int(r.user)] += (GenreStat(genre=r.genre, count=int(r.liked),
                                             mean=round(float(r.mean), 3)),)
        shown.add((int(r.user), r.genre))
    low = stats[(stats["size"] >= 2)
                & (stats["mean"] < stats["user"].map(user_mean))]
    fresh = [(int(u), g) not in shown for u, g in zip(low["user"], low["genre"], strict=True)]
    low = low[np.asarray(fresh, dtype=bool)]
    low = low.sort_values(["user", "mean", "size", "genre"], ascending=[True, True, False, True],
                          kind="mergesort").groupby("user").head(N_DISLIKED_GENRES)
    disliked_out: dict[int, tuple[GenreStat, ...]] = {}
    for r in low.itertuples(index=False):
        disliked_out.setdefault(int(r.user), ())
        disliked_out[int(r.user)] += (GenreStat(genre=r.genre, count=int(r.size),
                                                mean=round(float(r.mean), 3)),)
    return liked_out, disliked_out


def population_scale(ds: Dataset, train: pd.DataFrame
                     ) -> tuple[dict[str, tuple[float, float]], pd.Series]:
    """Trait cuts and item mean ratings of a whole train split, to tier partial histories."""
    item_means = train.groupby("item")["rating"].mean()
    return trait_cuts(trait_values(ds.items, train, item_means)), item_means


def build_personas(ds: Dataset, train: pd.DataFrame,
                   scale: tuple[dict[str, tuple[float, float]], pd.Series] | None = None,
                   users: Iterable[int] | None = None) -> dict[int, Persona]:
    """One persona per user of ``ds`` (and of ``train``), from ``train`` ratings only.

    ``scale`` (default: from ``train``, see ``population_scale``) fixes the trait percentiles and
    item mean ratings, so a persona built from part of a history (what a person had rated before
    a session) is tiered on the same scale as the full ones. ``users`` limits the output.
    A user with no train ratings gets demographics, low activity and diversity, and a neutral
    conformity, since there is no history to judge them by.
    """
    if train.empty and scale is None:
        raise ValueError("cannot build personas from an empty train frame")
    train = sort_log(train)  # canonical row order: same floats whatever order rows came in
    cuts, item_means = scale or population_scale(ds, train)
    values = trait_values(ds.items, train, item_means)
    user_mean = train.groupby("user")["rating"].mean()
    user_std = train.groupby("user")["rating"].std(ddof=0)
    liked, disliked = _genre_tastes(ds.items, train, user_mean)
    favourites = _ordered_titles(train, train["rating"] >= 5, N_FAVOURITES)
    worst = _ordered_titles(train, train["rating"] <= DISLIKED_MAX, N_DISLIKED_TITLES)
    flip = {"low": "high", "medium": "medium", "high": "low"}

    out: dict[int, Persona] = {}
    wanted = sorted(set(ds.users) | {int(u) for u in values.index}) if users is None \
        else sorted(int(u) for u in users)
    for uid in wanted:
        user = ds.users.get(uid)
        if uid in values.index:
            row = values.loc[uid]
            n, k, dev = int(row["n_ratings"]), int(row["n_genres_80"]), row["rating_deviation"]
            mean, std = float(user_mean.at[uid]), float(user_std.at[uid])
        else:
            n, k, dev, mean, std = 0, 0, float("nan"), None, None
        has_dev = bool(np.isfinite(dev))
        out[uid] = Persona(
            user_id=uid,
            age=user.age if user else None,
            gender=user.gender if user else None,
            occupation=user.occupation if user else None,
            activity=tier(n, cuts["activity"]),
            diversity=tier(k, cuts["diversity"]),
            conformity=flip[tier(dev, cuts["conformity"])] if has_dev else "medium",
            n_ratings=n,
            n_genres_80=k,
            rating_deviation=float(dev) if has_dev else None,
            rating_mean=mean,
            rating_std=std,
            liked_genres=liked.get(uid, ()),
            disliked_genres=disliked.get(uid, ()),
            favourite_items=favourites.get(uid, ()),
            disliked_items=worst.get(uid, ()),
        )
    return out


_GENDER = {"M": "male", "F": "female"}
_CONFORMITY = {"high": "close to", "medium": "sometimes apart from", "low": "often far from"}


def _titles(ids: tuple[int, ...], items: Mapping[int, Item]) -> str:
    return "; ".join(items[i].label() if i in items else f"item {i}" for i in ids)


def render_persona(p: Persona, items: Mapping[int, Item]) -> str:
    """Compact, deterministic description; the same persona always gives the same bytes."""
    who = ", ".join(x for x in (
        f"{p.age}-year-old" if p.age is not None else None,
        _GENDER.get(p.gender or "", p.gender),
        f"occupation {p.occupation}" if p.occupation else None) if x)
    lines = [f"You are user {p.user_id}" + (f": {who}." if who else ".")]
    lines.append(f"Activity {p.activity} ({p.n_ratings} movies rated); diversity {p.diversity} "
                 f"({p.n_genres_80} genres cover 80% of your viewing); conformity "
                 f"{p.conformity} (ratings {_CONFORMITY[p.conformity]} the average).")
    if p.rating_mean is not None:
        lines.append(f"Your mean rating {p.rating_mean:.1f}/5 (sd {p.rating_std or 0.0:.1f}).")
    if p.liked_genres:
        lines.append("Genres you like (movies rated 4+): " + ", ".join(
            f"{g.genre} {g.count}" for g in p.liked_genres) + ".")
    if p.disliked_genres:
        lines.append("Genres you rate low: " + ", ".join(
            f"{g.genre} (mean {g.mean:.1f}, {g.count} rated)" for g in p.disliked_genres) + ".")
    if p.favourite_items:
        lines.append(f"Favourites (rated 5): {_titles(p.favourite_items, items)}.")
    if p.disliked_items:
        lines.append(f"Disliked (rated 1-2): {_titles(p.disliked_items, items)}.")
    return "\n".join(lines)
