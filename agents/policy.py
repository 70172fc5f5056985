"""Policies: how an agent turns a perceived page into one valid action.

LLM policies score an enumerated action space by log-likelihood, one whole line at a time (each
slot's watch/skip, next/exit, the rating of each watched slot; ``agents.decide`` says in which
context each line is scored) and sample each line at a seeded temperature, so an invalid action
cannot be produced. Non-LLM policies (random, popularity, human replay) share the same
interface so a graph node can be swapped by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, Field

from agents import text
from simulator.env import Observation, PageAction
from simulator.policies import PageActor


class Decision(BaseModel):
    """The chosen action plus what it was chosen from, for traces and evaluation."""

    action: PageAction
    watch_scores: dict[int, float] = Field(
        default_factory=dict, description="slot -> log P(watch) - log P(skip)")
    rating_probs: dict[int, list[float]] = Field(default_factory=dict)
    then_probs: list[float] = Field(default_factory=list, description="P(next), P(exit)")
    exit_score: float | None = Field(None, description="log P(exit) - log P(next), calibrated")
    reflection: str | None = None
    predictions: dict[int, float] = Field(default_factory=dict,
                                          description="world-model expected rating per slot")
    fallback: str | None = Field(None, description="why the policy gave up on its model and "
                                 "took its default action (None: the model's own answer)")


class DecisionInput(BaseModel):
    """Everything a policy may look at for one page."""

    user: int
    page: int
    items: list[int]
    persona_text: str
    page_text: str
    predictions: dict[int, float] = Field(default_factory=dict)
    cues: list[str] = Field(default_factory=list, description="per slot, the item's personal "
                            "numbers restated above its watch/skip line (agents.text.page_cues)")
    rating_cues: list[str] = Field(default_factory=list, description="per slot, the item's "
                                   "rating evidence restated above its rating line, for "
                                   "adapters trained with it (agents.text.page_rating_cues)")
    seed: int = 0
    last: bool = Field(False, description="the visit's last allowed page: it ends there "
                       "whatever next/exit says (next/exit gets its own calibrated offset)")
    history: int | None = Field(None, description="how many ratings the persona and evidence "
                                "draw on: the calibration's history term reads it (None: none)")

    def cue(self, slot: int) -> str:
        """The line a slot's watch/skip answer follows; an input without cues gets a bare one."""
        return text.cue_line(slot, self.cues[slot - 1] if self.cues else "",
                             self.predictions.get(slot))

    def rating_cue(self, slot: int) -> str:
        """The line a slot's rating follows in the rating-cue format; bare without cues."""
        return text.cue_line(slot, self.rating_cues[slot - 1] if self.rating_cues else "")


class Policy(Protocol):
    name: str

    def decide(self, inp: DecisionInput) -> Decision: ...


def decide_many(policy: Policy, inputs: Sequence[DecisionInput]) -> list[Decision]:
    """Many pages in the policy's batched path when it has one (LLM scoring, chat batches).

    The graph decides one page per super-step and calls ``decide``; callers holding many pages
    at once (offline page evaluation, counterfactual sampling) call this."""
    many = getattr(policy, "decide_many", None)
    return many(list(inputs)) if many else [policy.decide(i) for i in inputs]


class OptionScorer(Protocol):
    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]: ...


def score_many(scorer: OptionScorer, requests: Sequence[tuple[str, Sequence[tuple[str, str]]]]
               ) -> list[list[float]]:
    """Many (prefix, options) requests in the scorer's batched path when it has one."""
    many = getattr(scorer, "score_many", None)
    return many(requests) if many else [scorer.score(p, o) for p, o in requests]


def expected_value(logps: Sequence[float], values: Sequence[float]) -> float:
    """The expectation of ``values`` under the normalised distribution ``logps`` scores them:
    how an enumerated numeric answer (a rating, a satisfaction score) is read off the model."""
    lp = np.asarray(logps, dtype=float)
    p = np.exp(lp - lp.max())
    return float((p / p.sum()) @ np.asarray(values, dtype=float))


DEFAULT_TEMPERATURE = 1.0
"""Sampling temperature of a browsing LLM policy (evaluation's page replays are greedy, 0)."""


def decision_rng(seed: int, user: int, page: int) -> np.random.Generator:
    """One generator per (seed, user, page): replaying a page reproduces its choice."""
    return np.random.default_rng([seed, user, page])


@dataclass
class LLMPolicy:
    """Scores candidate lines under a (possibly fine-tuned) causal LM."""

    scorer: OptionScorer
    name: str = "aligned"
    temperature: float = DEFAULT_TEMPERATURE
    calibration: Any = None  # agents.decide.Calibration; None = no offsets

    def decide(self, inp: DecisionInput) -> Decision:
        return self.decide_many([inp])[0]

    def decide_many(self, inputs: Sequence[DecisionInput]) -> list[Decision]:
        from agents.decide import decide

        return decide(self.scorer, list(inputs), temperature=self.temperature,
                      calibration=self.calibration)


@dataclass
class FixedPolicy:
    """Adapts a no-LLM simulator policy (random, popularity, human replay) to the agent."""

    policy: PageActor
    name: str

    def decide(self, inp: DecisionInput) -> Decision:
        obs = Observation(user=inp.user, page=inp.page, items=inp.items)
        act = self.policy.act(obs)
        score = getattr(self.policy, "item_score", None)
        scores = {s: float(score(i)) if score else float(i in act.watched)
                  for s, i in enumerate(inp.items, 1)}
        return Decision(action=act, watch_scores=scores)
