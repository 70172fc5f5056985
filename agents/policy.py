"""Policies: how an agent turns a perceived page into one valid action.

LLM policies score an enumerated action space by log-likelihood, one whole line at a time (each
slot's watch/skip, the rating of each watched slot, then next/exit), and sample each line from
the normalised distribution at a seeded temperature. Sampling line by line in order is exact
sampling from the model's joint distribution over valid actions, and an invalid action cannot
be produced. Non-LLM policies (random, popularity, human replay) share the same interface so a
graph node can be swapped by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydantic import BaseModel, Field

from agents import prompts, text
from simulator.env import Observation, PageAction
from simulator.policies import Policy as SimPolicy


class Decision(BaseModel):
    """The chosen action plus what it was chosen from, for traces and evaluation."""

    action: PageAction
    watch_scores: dict[int, float] = Field(
        default_factory=dict, description="slot -> log P(watch) - log P(skip)")
    rating_probs: dict[int, list[float]] = Field(default_factory=dict)
    then_probs: list[float] = Field(default_factory=list, description="P(next), P(exit)")
    reflection: str | None = None


class DecisionInput(BaseModel):
    """Everything a policy may look at for one page."""

    user: int
    page: int
    items: list[int]
    persona_text: str
    page_text: str
    predictions: dict[int, float] = Field(default_factory=dict)
    seed: int = 0


class Policy(Protocol):
    name: str

    def decide(self, inp: DecisionInput) -> Decision: ...


class Scorer(Protocol):
    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]: ...


def _sample(logps: Sequence[float], temperature: float, rng: np.random.Generator
            ) -> tuple[int, np.ndarray]:
    lp = np.asarray(logps, dtype=float)
    probs = np.exp(lp - lp.max())
    probs /= probs.sum()
    if temperature <= 0:
        return int(np.argmax(lp)), probs
    tempered = np.exp((lp - lp.max()) / temperature)
    tempered /= tempered.sum()
    return int(rng.choice(len(lp), p=tempered)), probs


def decision_rng(seed: int, user: int, page: int) -> np.random.Generator:
    """One generator per (seed, user, page): replaying a page reproduces its choice."""
    return np.random.default_rng([seed, user, page])


@dataclass
class LLMPolicy:
    """Scores candidate lines under a (possibly fine-tuned) causal LM."""

    scorer: Scorer
    name: str = "aligned"
    temperature: float = 1.0

    def decide(self, inp: DecisionInput) -> Decision:
        rng = decision_rng(inp.seed, inp.user, inp.page)
        prefix = prompts.persona_block(inp.persona_text) + inp.page_text
        ctx = prompts.policy_tail(text.render_predictions(inp.predictions))
        n = len(inp.items)
        watched: list[int] = []
        scores: dict[int, float] = {}
        for slot in range(1, n + 1):
            lp = self.scorer.score(prefix, [(ctx, text.slot_line(slot, text.WATCH)),
                                            (ctx, text.slot_line(slot, text.SKIP))])
            scores[slot] = float(lp[0] - lp[1])
            pick, _ = _sample(lp, self.temperature, rng)
            if pick == 0:
                watched.append(slot)
            ctx += text.slot_line(slot, text.WATCH if pick == 0 else text.SKIP)
        ratings: dict[int, int] = {}
        rating_probs: dict[int, list[float]] = {}
        for slot in watched:
            lp = self.scorer.score(prefix, [(ctx, text.rating_line(slot, r))
                                            for r in text.RATINGS])
            pick, probs = _sample(lp, self.temperature, rng)
            ratings[slot] = pick + 1
            rating_probs[slot] = probs.round(4).tolist()
            ctx += text.rating_line(slot, ratings[slot])
        lp = self.scorer.score(prefix, [(ctx, text.then_line(t)) for t in text.THEN])
        pick, probs = _sample(lp, self.temperature, rng)
        action = PageAction(watched={inp.items[s - 1]: r for s, r in ratings.items()},
                            then=text.THEN[pick])
        return Decision(action=action, watch_scores=scores, rating_probs=rating_probs,
                        then_probs=probs.round(4).tolist())


@dataclass
class FixedPolicy:
    """Adapts a no-LLM simulator policy (random, popularity, human replay) to the agent."""

    policy: SimPolicy
    name: str

    def decide(self, inp: DecisionInput) -> Decision:
        obs = Observation(user=inp.user, page=inp.page, items=inp.items)
        act = self.policy.act(obs)
        score = getattr(self.policy, "item_score", None)
        scores = {s: float(score(i)) if score else float(i in act.watched)
                  for s, i in enumerate(inp.items, 1)}
        return Decision(action=act, watch_scores=scores)
