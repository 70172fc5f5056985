"""The world model: what happens if the agent takes an action.

Two ways to ask it, both in the ``agents.text`` format it was trained on:
``expected_ratings`` scores the enumerated rating lines (cheap, used by the agent on every page);
``predict_next_state`` generates the whole next state (ratings and next page), used to ground
counterfactual reflections and to measure next-state F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agents import prompts, text
from agents.policy import Scorer


class Generator(Protocol):
    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str: ...


def expected_ratings(scorer: Scorer, prefix: str, n_slots: int) -> dict[int, float]:
    """Per slot, the rating the model expects if only that slot is watched.

    The action and the shared "[s] rated" stem extend the cached page prefix once per slot, and
    only the five one-digit endings are scored: the stem's probability is the same for every
    rating, so this equals scoring the five whole lines, at a quarter of the tokens."""
    rows = []
    for slot in range(1, n_slots + 1):
        ctx = prompts.world_model_tail(text.render_wm_action(n_slots, [slot], "next"))
        rows.append(scorer.score(prefix + ctx + text.rating_stem(slot),
                                 [("", text.rating_value(r)) for r in text.RATINGS]))
    logps = np.asarray(rows, dtype=float)
    probs = np.exp(logps - logps.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return {s + 1: round(float(probs[s] @ np.arange(1, 6)), 2) for s in range(n_slots)}


def predict_next_state(gen: Generator, prefix: str, n_slots: int, watched_slots: Sequence[int],
                       then: str, max_new_tokens: int = 96) -> text.NextState:
    """Generate and read back the next state that follows an action."""
    prompt = prefix + prompts.world_model_tail(text.render_wm_action(n_slots, watched_slots, then))
    out = gen.generate(prompt, max_new_tokens=max_new_tokens)
    kept = []
    for line in out.splitlines():
        kept.append(line)
        if line.startswith("next page:"):
            break
    return text.parse_next_state("\n".join(kept))
