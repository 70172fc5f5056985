"""Human page-by-page trajectories built from a rating log.

MovieLens records when ratings were entered, not what a person was shown, so we rebuild the pages:
each logged session (split on a timestamp gap) is cut into visits of at most ``max_pages`` pages;
each slot of a page is, independently, one of the human's next items
(``TrajectoryConfig.slot_share``), at seeded positions, and its other slots are *exposure
fillers* drawn, slot by slot, from a configurable mixture (``TrajectoryConfig.exposure``):
never-rated items uniformly, never-rated items weighted by popularity, and the picks of several
recommenders. Fillers from one recommender alone teach the inverse of preference: its picks are
more popular and more like the person's history than what the person chose (``alignuser data
info --trajectories`` prints the check). Every item the user rated in any part of the log is
masked, so a skipped item is one this person never chose. The human watches exactly their logged
items with their logged ratings and exits after the last page of a session's last visit; a visit
cut at ``max_pages`` with more of the session to come ends by the page limit, its last page saying
``next`` (the person went on: labelling it ``exit`` called half the validation visits exits and
doubled the humans' exit share per page).

Schema (one JSON object per line): ``{user, part, session, visit, start, recommender, steps:
[{page, items, watched: {item: rating}, then}]}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, field_validator
from scipy.stats import binom
from tqdm import tqdm

from simulator.env import MAX_PAGES, PAGE_SIZE, PageAction, PageEnv, PageSource, recommender_pages

SLOT_SHARE = 0.2875


class TrajectoryConfig(BaseModel):
    gap_minutes: float = Field(30, description="a gap longer than this starts a new session")
    page_size: int = Field(PAGE_SIZE, description="items per page (Agent4Rec's 4)")
    max_pages: int = Field(MAX_PAGES, description="pages per visit before the human must leave")
    slot_share: float = Field(
        SLOT_SHARE, gt=0, lt=1,
        description="probability that a slot holds one of the human's items, each slot "
                    "independently (Binomial(page_size, share) items a page): 0.2875 is 1.15 "
                    "items a 4-item page (Agent4Rec measured a 0.32 watch ratio). Independent "
                    "slots make a slot's page-mates say nothing of whether it was chosen; pages "
                    "capped at 0-2 of the human's items made a well-matching page-mate a sign "
                    "of a filler (`python bench/bench_signal.py --page-counts`)")
    watch_probs: tuple[float, ...] | None = Field(
        None, description="probability that a page holds 0, 1, 2, ... of the human's items, "
                          "overriding slot_share (e.g. 0.2,0.45,0.35: at most 2 a page)")
    max_visits_per_user: int | None = Field(
        None, description="keep at most this many visits per user (the earliest); None = all")
    seed: int = Field(0, description="seeds page positions, items per page and fillers")
    exposure: dict[str, float] = Field(
        {"uniform": 0.9, "popular": 0.1},
        description="where filler slots come from, as shares: 'uniform' (a never-rated item, "
                    "uniformly), 'popular' (a never-rated item, weighted by train popularity) "
                    "or a recommender name (its next pick for the session). The default is "
                    "the mixture whose pages best teach validation lists "
                    "(`python bench/bench_signal.py --exposures`): a recommender's picks are "
                    "the items that best match the person, so as skipped fillers they made "
                    "the best-matching items look less chosen than the next-best")

    @field_validator("exposure")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(x < 0 for x in v.values()) or sum(v.values()) <= 0:
            raise ValueError("exposure shares must be >= 0 and sum to more than 0")
        return v

    def count_probs(self) -> np.ndarray:
        """Probability of 0, 1, ... of the human's items on a page."""
        if self.watch_probs is not None:
            probs = np.asarray(self.watch_probs, dtype=float)
        else:
            probs = binom.pmf(np.arange(self.page_size + 1), self.page_size, self.slot_share)
        return probs / probs.sum()

    def recommenders(self) -> list[str]:
        """The recommenders the exposure mixture draws from."""
        return sorted(k for k, w in self.exposure.items()
                      if w > 0 and k not in ("uniform", "popular"))


@dataclass
class Exposure:
    """The filler sources of a mixture: recommender rankings and the catalogue to sample."""

    ranks: Mapping[str, Callable[..., list[int]]]
    catalogue: np.ndarray  # item ids
    popularity: np.ndarray  # sampling weights aligned with ``catalogue``


def exposure_pages(exposure: Exposure, shares: Mapping[str, float],
                   masked: Callable[[int], Iterable[int]], rng: np.random.Generator) -> PageSource:
    """A page source whose slots come from the mixture; never a masked or seen item."""
    names = sorted(k for k, w in shares.items() if w > 0)
    probs = np.asarray([shares[k] for k in names], dtype=float)
    probs /= probs.sum()
    pop = exposure.popularity / exposure.popularity.sum()

    def draw(weights: np.ndarray | None, banned: set[int]) -> int | None:
        for _ in range(64):
            item = int(rng.choice(exposure.catalogue, p=weights))
            if item not in banned:
                return item
        left = [int(i) for i in exposure.catalogue if int(i) not in banned]
        return int(rng.choice(left)) if left else None

    def source(user, page, k, seen, session):
        banned = set(seen) | set(masked(user))
        picks: list[int] = []
        for name in rng.choice(names, size=k, p=probs):
            if name in ("uniform", "popular"):
                item = draw(None if name == "uniform" else pop, banned)
            else:
                ranked = exposure.ranks[name](user, 1, exclude=banned, session=list(session))
                item = int(ranked[0]) if ranked else draw(None, banned)
            if item is not None:
                picks.append(item)
                banned.add(item)
        return picks

    return source


class Step(BaseModel):
    page: int
    items: list[int]
    watched: dict[int, int]
    then: Literal["next", "exit"]


class Trajectory(BaseModel):
    user: int
    part: str = "train"
    session: int
    visit: int
    start: int = Field(0, description="timestamp of the session's first logged rating")
    recommender: str
    steps: list[Step]

    @property
    def end(self) -> Literal["exit", "max_pages"]:
        """How the visit ended: the person left, or the page limit cut a longer session."""
        return "exit" if self.steps and self.steps[-1].then == "exit" else "max_pages"


def sessions(ratings: pd.DataFrame, gap_minutes: float) -> Iterator[tuple[int, int, pd.DataFrame]]:
    """Yield (user, session index, rows) from a log in chronological order (ties by item id)."""
    gap = gap_minutes * 60
    ratings = ratings.sort_values(["user", "timestamp", "item"], kind="mergesort")
    for user, rows in ratings.groupby("user", sort=True):
        ts = rows["timestamp"].to_numpy()
        cuts = np.flatnonzero(np.diff(ts) > gap) + 1
        for idx, chunk in enumerate(np.split(np.arange(len(rows)), cuts)):
            yield int(user), idx, rows.iloc[chunk]


def plan_visits(n_items: int, cfg: TrajectoryConfig, rng: np.random.Generator) -> list[list[int]]:
    """How many of the human's items go on each page, visit by visit."""
    probs = cfg.count_probs()
    visits, left = [], n_items
    while left > 0:
        pages: list[int] = []
        while left > 0 and len(pages) < cfg.max_pages:
            n = min(int(rng.choice(len(probs), p=probs)), left, cfg.page_size)
            pages.append(n)
            left -= n
        visits.append(pages)
    return visits


def _human_pages(base: PageSource, plan: list[list[tuple[int, int]]],
                 rng: np.random.Generator) -> PageSource:
    def source(user, page, k, seen, session):
        human = [i for i, _ in plan[page - 1]]
        filler = base(user, page, k - len(human), set(seen) | set(human), session)
        items = human + list(filler)
        return [items[j] for j in rng.permutation(len(items))]

    return source


def play_visit(env: PageEnv, user: int, plan: list[list[tuple[int, int]]],
               leaves: bool = True) -> list[Step]:
    """Run the human's logged choices through the environment, recording each page. The last
    page exits when the person ``leaves`` (the session's last visit), else goes on into the
    page limit."""
    obs, steps = env.reset(user), []
    for p, chunk in enumerate(plan, 1):
        then = "exit" if p == len(plan) and leaves else "next"
        action = PageAction(watched=dict(chunk), then=then)
        steps.append(Step(page=p, items=obs.items, watched=action.watched, then=action.then))
        obs, done, info = env.step(action)
        if done:
            if p < len(plan):
                raise RuntimeError(
                    f"user {user}: page {p + 1} of a visit is empty ({info.get('end')}) with "
                    f"{sum(map(len, plan[p:]))} logged rating(s) left to place; the catalogue is "
                    "too small for this page_size/max_pages")
            break
    return steps


def build_trajectories(ratings: pd.DataFrame, rank: Callable[..., list[int]],
                       masked: dict[int, set[int]], cfg: TrajectoryConfig,
                       recommender: str = "itemknn", part: str = "train",
                       progress: bool = True,
                       exposure: Exposure | None = None) -> list[Trajectory]:
    """Trajectories for every session of ``ratings`` (one split part). Fillers come from the
    ``exposure`` mixture when given, else from ``rank`` alone (one recommender's pages)."""
    base = recommender_pages(rank, lambda u: masked.get(u, ()))
    out: list[Trajectory] = []
    visits_of: dict[int, int] = {}
    groups = list(sessions(ratings, cfg.gap_minutes))
    for user, s_idx, rows in tqdm(groups, desc=f"trajectories ({part})", disable=not progress,
                                  unit="session"):
        cap = cfg.max_visits_per_user
        if cap is not None and visits_of.get(user, 0) >= cap:
            continue
        rng = np.random.default_rng([cfg.seed, user, s_idx])
        pairs = [(int(i), int(round(r))) for i, r in zip(rows["item"], rows["rating"], strict=True)]
        pos = 0
        for v_idx, counts in enumerate(plan_visits(len(pairs), cfg, rng)):
            if cap is not None and visits_of.get(user, 0) >= cap:
                break
            plan = []
            for n in counts:
                plan.append(pairs[pos:pos + n])
                pos += n
            fill = base if exposure is None else exposure_pages(
                exposure, cfg.exposure, lambda u: masked.get(u, ()), rng)
            env = PageEnv(_human_pages(fill, plan, rng), cfg.page_size, cfg.max_pages)
            steps = play_visit(env, user, plan, leaves=pos == len(pairs))
            out.append(Trajectory(user=user, part=part, session=s_idx, visit=v_idx,
                                  start=int(rows["timestamp"].iloc[0]),
                                  recommender=recommender, steps=steps))
            visits_of[user] = visits_of.get(user, 0) + 1
    return out


def trajectory_stats(trajs: Iterable[Trajectory]) -> dict[str, float]:
    """Watch ratio, pages per visit, how visits end and the ratings histogram, to judge the
    construction."""
    trajs = list(trajs)
    pages = [len(t.steps) for t in trajs]
    shown = sum(len(s.items) for t in trajs for s in t.steps)
    watched = [r for t in trajs for s in t.steps for r in s.watched.values()]
    hist = {str(k): int(sum(1 for r in watched if r == k)) for k in range(1, 6)}
    return {"visits": len(trajs), "pages": int(sum(pages)),
            "watch_ratio": len(watched) / shown if shown else 0.0,
            "watches_per_page": len(watched) / max(sum(pages), 1),
            "pages_per_visit": float(np.mean(pages)) if pages else 0.0,
            "empty_page_share": sum(1 for t in trajs for s in t.steps if not s.watched)
            / max(sum(pages), 1),
            "exit_share": sum(t.end == "exit" for t in trajs) / max(len(trajs), 1),
            "ratings_hist": hist}


def write_jsonl(trajs: Iterable[BaseModel], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for t in trajs:
            fh.write(t.model_dump_json() + "\n")
    return path


def read_jsonl(path: Path) -> list[Trajectory]:
    with Path(path).open() as fh:
        return [Trajectory.model_validate(json.loads(line)) for line in fh if line.strip()]


def logged_pages(trajs: Mapping[int, Trajectory]) -> PageSource:
    """Serve each user's logged pages, so a policy can act where the human acted."""

    def source(user, page, k, seen, session):
        traj = trajs.get(user)
        if traj is None or page > len(traj.steps):
            return []
        return list(traj.steps[page - 1].items)

    return source


def first_visits(trajs: Iterable[Trajectory]) -> dict[int, Trajectory]:
    """Each user's earliest visit (by session, then visit index)."""
    out: dict[int, Trajectory] = {}
    for t in sorted(trajs, key=lambda t: (t.user, t.session, t.visit)):
        out.setdefault(t.user, t)
    return out


def human_actions(trajs: Mapping[int, Trajectory]) -> dict[tuple[int, int], PageAction]:
    return {(u, s.page): PageAction(watched=s.watched, then=s.then)
            for u, t in trajs.items() for s in t.steps}


def experienced(trajs: Iterable[Trajectory], train: pd.DataFrame, n: int) -> list[Trajectory]:
    """The visits whose person had at least ``n`` ``train`` ratings before their session began:
    with fewer, every perceived match cue is near zero and a page teaches little of the person
    (``TrainConfig.min_history``)."""
    if n <= 0:
        return list(trajs)
    times = {int(u): np.sort(g.to_numpy()) for u, g in train.groupby("user")["timestamp"]}
    empty = np.empty(0)
    return [t for t in trajs if np.searchsorted(times.get(t.user, empty), t.start) >= n]
