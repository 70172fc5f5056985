"""The data side of a run, built once and shared by every command.

``World`` holds the dataset, its split, the evidence index, personas, fitted recommenders, the
human page trajectories and the held-out 1:m lists; simulation (``graph``), training data
(``training``) and evaluation all read from one instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from agents.perception import Perceiver
from agents.persona import Persona, build_personas, population_scale, render_persona
from memory.evidence import ItemSimilarity
from simulator.custom import load_recommender
from simulator.data import Dataset
from simulator.lists import ListRow, discrimination_lists
from simulator.readers import load_dataset
from simulator.recommenders import RECOMMENDERS, Recommender
from simulator.split import PARTS, Split, SplitConfig, make_split
from simulator.trajectories import Exposure, Trajectory, TrajectoryConfig, build_trajectories


@dataclass
class World:
    """The data side of a run, built once: dataset, split, evidence, personas, recommenders."""

    ds: Dataset
    split: Split
    trajectory_config: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    _recs: dict[tuple[str, bool, int], Recommender] = field(default_factory=dict)

    @cached_property
    def similarity(self) -> ItemSimilarity:
        return ItemSimilarity.fit(self.split.train)

    @cached_property
    def popularity(self) -> tuple[dict[int, int], float]:
        """Train ratings per item, and the 90th percentile of them: the popularity baselines
        (policy and next action) call an item popular at or above it."""
        counts = self.split.train["item"].value_counts()
        return ({int(i): int(n) for i, n in counts.items()},
                float(np.quantile(counts.to_numpy(), 0.9)))

    @cached_property
    def perceiver(self) -> Perceiver:
        return Perceiver(self.ds.items, self.similarity)

    @cached_property
    def profiles(self) -> dict[int, Persona]:
        return build_personas(self.ds, self.split.train)

    @cached_property
    def personas(self) -> dict[int, str]:
        """The rendered persona text of every user: the cached prefix of their prompts."""
        return {u: render_persona(p, self.ds.items) for u, p in self.profiles.items()}

    @cached_property
    def scale(self):
        return population_scale(self.ds, self.split.train)

    def persona_at(self, user: int, before: int | None = None) -> str:
        """Persona text from train ratings entered before ``before`` (None: the whole split).

        Training examples use the history before their session, so the persona never names an
        item the person is about to watch (a shortcut that held-out users never offer)."""
        if before is None:
            return self.personas[user]
        train = self.split.train
        rows = train[(train["user"] == user) & (train["timestamp"] < before)]
        return render_persona(build_personas(self.ds, rows, self.scale, [user])[user],
                              self.ds.items)

    def liked_genres(self) -> dict[int, list[str]]:
        return {u: [g.genre for g in p.liked_genres] for u, p in self.profiles.items()}

    @cached_property
    def histories(self) -> dict[int, dict[int, float]]:
        return _by_user(self.split.train)

    def rated_through(self, part: str) -> dict[int, set[int]]:
        """Items each user rated up to and including ``part`` (masked from filler slots)."""
        parts = {"train": ["train"], "valid": ["train", "valid"],
                 "test": ["train", "valid", "test"]}[part]
        out: dict[int, set[int]] = {}
        for p in parts:
            for u, items in self.split.part(p).groupby("user")["item"]:
                out.setdefault(int(u), set()).update(int(i) for i in items)
        return out

    def recommender(self, name: str, reactive: bool = True, seed: int = 0) -> Recommender:
        """A fitted recommender for a built-in name or any spec of ``simulator.custom``
        (``module:attribute``, a ranking file), fitted once per (spec, mode, seed)."""
        key = (name.strip().lower() if name.strip().lower() in RECOMMENDERS else name.strip(),
               reactive, seed)
        if key not in self._recs:
            self._recs[key] = load_recommender(name, reactive=reactive, seed=seed).fit(
                self.split.train)
        return self._recs[key]

    def exposure(self, cfg: TrajectoryConfig) -> Exposure:
        """The filler sources of ``cfg``'s mixture, fitted on train."""
        counts = self.split.train["item"].value_counts()
        catalogue = np.asarray(sorted(self.ds.items), dtype=np.int64)
        return Exposure(ranks={n: self.recommender(n).rank for n in cfg.recommenders()},
                        catalogue=catalogue,
                        popularity=np.asarray([counts.get(i, 0) + 1.0 for i in catalogue]))

    def trajectories(self, part: str, recommender: str = "exposure",
                     cfg: TrajectoryConfig | None = None, users: list[int] | None = None,
                     progress: bool = True) -> list[Trajectory]:
        """Human page trajectories of one split part. Fillers come from the exposure mixture
        (``recommender='exposure'``, the default) or from one named recommender; every item
        the user rated in any part is masked, so a skipped item is never one they chose."""
        cfg = cfg or self.trajectory_config
        log = self.split.part(part)
        if users is not None:
            log = log[log["user"].isin(users)]
        masked = self.rated_through("test")
        if recommender == "exposure":
            return build_trajectories(log, lambda *a, **k: [], masked, cfg, "exposure", part,
                                      progress, exposure=self.exposure(cfg))
        return build_trajectories(log, self.recommender(recommender).rank, masked, cfg,
                                  recommender, part, progress)

    def sample_users(self, n: int, seed: int, part: str = "test") -> list[int]:
        users = np.sort(self.split.part(part)["user"].unique())
        rng = np.random.default_rng(seed)
        return sorted(int(u) for u in rng.choice(users, size=min(n, len(users)), replace=False))


    def rated_in(self, parts: Iterable[str] = PARTS) -> dict[int, set[int]]:
        """Each person's items rated in ``parts``: what a list's negatives must avoid."""
        rated: dict[int, set[int]] = {}
        for p in parts:
            for u, items in self.split.part(p).groupby("user")["item"]:
                rated.setdefault(int(u), set()).update(int(i) for i in items)
        return rated

    def lists(self, part: str, m: int, users: Sequence[int] | None = None,
              seed: int = 0) -> list[ListRow]:
        """Agent4Rec lists: positives held out in ``part``, negatives never rated in any
        part (``simulator.lists``)."""
        rated = self.rated_in(p for p in PARTS if p != part)
        rows = discrimination_lists(self.split.part(part), rated, list(self.ds.items), m, seed)
        if users is not None:
            keep = set(users)
            rows = [row for row in rows if row[0] in keep]
        return rows


def _by_user(frame) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for u, i, r in zip(frame["user"], frame["item"], frame["rating"], strict=True):
        out.setdefault(int(u), {})[int(i)] = float(r)
    return out


def load_world(dataset: str = "ml-100k", split: SplitConfig | None = None,
               trajectories: TrajectoryConfig | None = None) -> World:
    ds = load_dataset(dataset)
    return World(ds=ds, split=make_split(ds.ratings, split or SplitConfig()),
                 trajectory_config=trajectories or TrajectoryConfig())
