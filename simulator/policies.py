"""Policies that need no LLM: for tests, baselines and replaying the humans in the log."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from simulator.env import InvalidAction, Observation, PageAction
from simulator.trajectories import Trajectory


class PageActor(Protocol):
    def act(self, obs: Observation) -> PageAction: ...


@dataclass
class HumanReplay:
    """Repeats logged trajectories (one per user); refuses a page that differs from the log."""

    trajectories: Mapping[int, Trajectory]

    def act(self, obs: Observation) -> PageAction:
        traj = self.trajectories.get(obs.user)
        if traj is None or obs.page > len(traj.steps):
            raise InvalidAction(f"no logged page {obs.page} for user {obs.user}")
        step = traj.steps[obs.page - 1]
        if list(step.items) != list(obs.items):
            raise InvalidAction(f"page {obs.page} differs from the logged page")
        return PageAction(watched=dict(step.watched), then=step.then)


@dataclass
class RandomPolicy:
    """Watches each item with ``p_watch``, rates uniformly, exits with ``p_exit``.

    Seeded per (user, page), so replaying any page reproduces its action.
    """

    seed: int = 0
    p_watch: float = 0.3
    p_exit: float = 0.3

    def act(self, obs: Observation) -> PageAction:
        rng = np.random.default_rng([self.seed, obs.user, obs.page])
        watched = {i: int(rng.integers(1, 6)) for i in obs.items if rng.random() < self.p_watch}
        return PageAction(watched=watched, then="exit" if rng.random() < self.p_exit else "next")


@dataclass
class ScoreThreshold:
    """Watches items whose score clears a threshold (e.g. popularity); leaves after an empty page.

    Ratings are the item's mean rating in the train split, rounded: a popularity-minded user.
    """

    score: Callable[[int], float]
    threshold: float
    mean_rating: Mapping[int, float]

    def item_score(self, item: int) -> float:
        return self.score(item) - self.threshold

    def act(self, obs: Observation) -> PageAction:
        watched = {i: int(min(5, max(1, round(self.mean_rating.get(i, 3.0)))))
                   for i in obs.items if self.item_score(i) >= 0}
        return PageAction(watched=watched, then="next" if watched else "exit")
