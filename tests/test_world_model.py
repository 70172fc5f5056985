"""The world model's expected ratings: the cheap stem-sharing form equals whole-line scoring."""

from __future__ import annotations

import numpy as np
import pytest

from agents import prompts, text
from agents.llm import tiny_lm
from agents.scorer import Scorer
from agents.world_model import (
    expected_ratings,
    expected_ratings_many,
    predict_next_state,
    read_next_state,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_expected_ratings_equal_whole_line_scoring() -> None:
    scorer = Scorer(tiny_lm(seed=3))
    prefix = "You are user 7.\nPage 1 of at most 5.\nOn this page:\n[1] A | Drama | 3 ratings\n"
    got = expected_ratings(scorer, prefix, 3)
    for slot in range(1, 4):
        ctx = prompts.world_model_tail(text.render_wm_action(3, [slot], "next"))
        lp = np.asarray(scorer.score_naive(prefix, [(ctx, text.rating_line(slot, r))
                                                    for r in text.RATINGS]))
        p = np.exp(lp - lp.max())
        assert got[slot] == pytest.approx(float(p / p.sum() @ np.arange(1, 6)), abs=0.01)
        assert 1.0 <= got[slot] <= 5.0


def test_rating_line_is_stem_plus_value() -> None:
    assert text.rating_line(2, 4) == text.rating_stem(2) + text.rating_value(4) == "[2] rated 4\n"


def test_expected_ratings_many_equals_one_page_at_a_time() -> None:
    scorer = Scorer(tiny_lm(seed=3))
    pages = [("You are user 7.\nPage 1 of at most 5.\nOn this page:\n[1] A | Drama | 3 ratings\n"
              "[2] B | Comedy | 9 ratings\n", 2),
             ("You are user 8.\nPage 2 of at most 5.\nOn this page:\n[1] C | War | 1 ratings\n",
              1),
             ("You are user 9.\nPage 1 of at most 5.\n", 4)]
    many = expected_ratings_many(scorer, pages)
    assert [sorted(m) for m in many] == [[1, 2], [1], [1, 2, 3, 4]]
    for (prefix, n), got in zip(pages, many, strict=True):
        assert got == pytest.approx(expected_ratings(Scorer(tiny_lm(seed=3)), prefix, n),
                                    abs=0.011)

    class ScoreOnly:  # a scorer without score_many is asked one page at a time
        def __init__(self) -> None:
            self.calls = 0

        def score(self, prefix: str, options: list[tuple[str, str]]) -> list[float]:
            self.calls += 1
            return scorer.score(prefix, options)

    plain = ScoreOnly()
    for got, want in zip(expected_ratings_many(plain, pages), many, strict=True):
        assert got == pytest.approx(want, abs=0.011)
    assert plain.calls == len(pages)


class _Says:
    """A generator that always writes the same next state, whatever the prompt."""

    def __init__(self, out: str) -> None:
        self.out, self.prompts = out, []

    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str:
        self.prompts.append(prompt)
        return self.out


def test_the_action_and_the_page_limit_say_when_a_session_ends() -> None:
    """After an exit, or on a visit's last allowed page, there is no next page whatever the
    model writes: its ratings are read, its page is not; after next, both are."""
    wrote = "[2] rated 5\nnext page genres: Action, Drama\n[1] rated 1\n"
    gen = _Says(wrote)
    went_on = predict_next_state(gen, "P\n", 3, [2], "next")
    assert went_on == text.NextState(ratings={2: 5}, genres=["Action", "Drama"])
    assert gen.prompts[0].endswith(prompts.world_model_tail(text.render_wm_action(3, [2], "next")))
    for then, last in (("exit", False), ("next", True)):
        ended = predict_next_state(gen, "P\n", 3, [2], then, last=last)
        assert ended == text.NextState(ratings={2: 5}, ends=True)
    assert read_next_state(wrote, ends=True) == text.NextState(ratings={2: 5}, ends=True)
