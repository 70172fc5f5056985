"""The world model: what happens if the agent takes an action.

Two ways to ask it, both in the ``agents.text`` format it was trained on:
``expected_ratings`` scores the enumerated rating lines (cheap, used by the agent on every page);
``predict_next_state`` generates the whole next state (ratings and next page), used to ground
counterfactual reflections and to measure next-state F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agents import prompts, text
from agents.policy import OptionScorer, expected_value, score_many


class Generator(Protocol):
    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str: ...


def expected_ratings(scorer: OptionScorer, prefix: str, n_slots: int) -> dict[int, float]:
    """Per slot, the rating the model expects if only that slot is watched."""
    return expected_ratings_many(scorer, [(prefix, n_slots)])[0]


def expected_ratings_many(scorer: OptionScorer, pages: Sequence[tuple[str, int]],
                          requests: Sequence[tuple[str, list[tuple[str, str]]]] | None = None
                          ) -> list[dict[int, float]]:
    """``expected_ratings`` for many (prefix, n_slots) pages in one batched call; ``requests``
    are the pages' ``expectation_requests`` when the caller has built them already.

    Each slot's action and the "[s] rated" stem are the context after the page prefix, and only
    the five one-digit endings are the targets: the stem's probability is the same for every
    rating, so this equals scoring the five whole lines, at a fraction of the tokens."""
    return [{s + 1: round(expected_value(row[5 * s:5 * s + 5], range(1, 6)), 2)
             for s in range(n_slots)}
            for (_, n_slots), row in zip(pages, score_many(
                scorer, expectation_requests(pages) if requests is None else requests),
                strict=True)]


def expectation_requests(pages: Sequence[tuple[str, int]]
                         ) -> list[tuple[str, list[tuple[str, str]]]]:
    """The scorer requests behind ``expected_ratings_many``: per page, its prefix and the five
    rating endings of every slot (what a cache of the expectations must be keyed on)."""
    reqs = []
    for prefix, n_slots in pages:
        opts = []
        for slot in range(1, n_slots + 1):
            ctx = (prompts.world_model_tail(text.render_wm_action(n_slots, [slot], "next"))
                   + text.rating_stem(slot))
            opts += [(ctx, text.rating_value(r)) for r in text.RATINGS]
        reqs.append((prefix, opts))
    return reqs


def read_next_state(generated: str, ends: bool) -> text.NextState:
    """A generated next state as the simulation uses it. Whether the session ends is not the
    model's to say: an exit or the visit's last allowed page ends it (``ends``), and a page the
    model writes after it is not read; otherwise the model's ratings and next page."""
    ns = text.parse_generated_state(generated)
    return text.NextState(ratings=ns.ratings, ends=True) if ends else ns


def predict_next_state(gen: Generator, prefix: str, n_slots: int, watched_slots: Sequence[int],
                       then: str, max_new_tokens: int = 96, last: bool = False
                       ) -> text.NextState:
    """Generate and read back the next state that follows an action (``last``: on the visit's
    last allowed page)."""
    prompt = prefix + prompts.world_model_tail(text.render_wm_action(n_slots, watched_slots, then))
    return read_next_state(gen.generate(prompt, max_new_tokens=max_new_tokens),
                           ends=then == "exit" or last)
