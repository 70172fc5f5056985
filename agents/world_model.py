"""The world model: what happens if the agent takes an action.

Two ways to ask it, both in the ``agents.text`` format it was trained on:
``expected_ratings`` scores the enumerated rating lines (cheap, used by the agent on every page);
``predict_next_state`` generates the whole next state (ratings and next page), used to ground
counterfactual reflections and to measure next-state F1 (``generate_next_states``, batched).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from agents import prompts, text
from agents.policy import OptionScorer, expected_value, score_many


class Generator(Protocol):
    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str: ...


class HasRatingCues(Protocol):
    @property
    def rating_cues(self) -> list[str]: ...


def wm_cues(pages: Iterable[HasRatingCues], on: bool) -> list[list[str]] | None:
    """The pages' rating cues (a ``Transition``'s or a ``DecisionInput``'s) for the expected
    ratings when the world model was trained to rate after them (``wm_rating_cue``), else None."""
    return [p.rating_cues for p in pages] if on else None


def expected_ratings(scorer: OptionScorer, prefix: str, n_slots: int,
                     cues: Sequence[str] | None = None) -> dict[int, float]:
    """Per slot, the rating the model expects if only that slot is watched."""
    return expected_ratings_many(scorer, [(prefix, n_slots)],
                                 cues=None if cues is None else [cues])[0]


def expected_ratings_many(scorer: OptionScorer, pages: Sequence[tuple[str, int]],
                          requests: Sequence[tuple[str, list[tuple[str, str]]]] | None = None,
                          cues: Sequence[Sequence[str]] | None = None
                          ) -> list[dict[int, float]]:
    """``expected_ratings`` for many (prefix, n_slots) pages in one batched call; ``requests``
    are the pages' ``expectation_requests`` when the caller has built them already, ``cues``
    as there.

    Each slot's action and the "[s] rated" stem are the context after the page prefix, and only
    the five one-digit endings are the targets: the stem's probability is the same for every
    rating, so this equals scoring the five whole lines, at a fraction of the tokens."""
    return [{s + 1: round(expected_value(row[5 * s:5 * s + 5], range(1, 6)), 2)
             for s in range(n_slots)}
            for (_, n_slots), row in zip(pages, score_many(
                scorer, expectation_requests(pages, cues) if requests is None else requests),
                strict=True)]


def expectation_requests(pages: Sequence[tuple[str, int]],
                         cues: Sequence[Sequence[str]] | None = None
                         ) -> list[tuple[str, list[tuple[str, str]]]]:
    """The scorer requests behind ``expected_ratings_many``: per page, its prefix and the five
    rating endings of every slot (what a cache of the expectations must be keyed on).

    ``cues``: per page, each slot's rating cue (``agents.text.page_rating_cues``), restated on
    its own line above the slot's rating, for adapters trained so (``Calibration.wm_rating_cue``):
    without it a slot's numbers sit many lines above its rating, and a small world model
    expected nearly one rating for every slot of a page."""
    if cues is not None and len(cues) != len(pages):
        raise ValueError(f"{len(cues)} pages of cues for {len(pages)} pages")
    reqs = []
    for k, (prefix, n_slots) in enumerate(pages):
        opts = []
        for slot in range(1, n_slots + 1):
            ctx = (prompts.world_model_tail(text.render_wm_action(n_slots, [slot], "next"))
                   + (text.cue_line(slot, cues[k][slot - 1]) if cues is not None else "")
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
                       then: str, max_new_tokens: int = 96, last: bool = False,
                       page_format: str = "titles") -> text.NextState:
    """Generate and read back the next state that follows an action (``last``: on the visit's
    last allowed page), as ``generate_next_states`` decodes it."""
    prompt = prefix + prompts.world_model_tail(text.render_wm_action(n_slots, watched_slots, then))
    ends = then == "exit" or last
    generated = generate_next_states(
        lambda ps, n, stop: [gen.generate(p, max_new_tokens=n, stop=stop) for p in ps],
        [prompt], [ends], page_format, max_new_tokens)[0]
    return read_next_state(generated, ends=ends)


GenerateMany = Callable[[list[str], int, str | None], list[str]]


def generate_next_states(generate_many: GenerateMany, prompts_: Sequence[str],
                         ends: Sequence[bool], page_format: str = "titles",
                         max_new_tokens: int = 96) -> list[str]:
    """The next states that follow actions, decoded in the format's grammar: the model writes
    the ratings lines up to the page line, then the page line the action implies. Whether the
    session ends is the action's to say (an exit, or the visit's last allowed page): there the
    end line is written for the model; otherwise the page line's stem in ``page_format``
    (``agents.text.WM_FORMATS``) is, and the model goes on from it. Left free, greedy decoding
    of a genre-trained full agent wrote the session's end after a next on more than half of
    300 held-out transitions. ``generate_many(prompts, max_new_tokens, stop)`` is the batched
    greedy decoder (``Scorer.generate_many``); text from ``stop`` on is cut here as well."""
    stem = text.page_stem(page_format)
    ratings = [r.split(text.NEXT_PAGE)[0] for r in
               generate_many(list(prompts_), max_new_tokens, text.NEXT_PAGE)]
    go_on = [k for k, e in enumerate(ends) if not e]
    pages = generate_many([prompts_[k] + ratings[k] + stem for k in go_on], max_new_tokens, None)
    out = [r + text.render_next_state({}, None) for r in ratings]
    for k, page in zip(go_on, pages, strict=True):
        out[k] = ratings[k] + stem + page
    return out
