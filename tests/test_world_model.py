"""The world model's expected ratings: the cheap stem-sharing form equals whole-line scoring."""

from __future__ import annotations

import numpy as np
import pytest

from agents import prompts, text
from agents.llm import tiny_lm
from agents.scorer import Scorer
from agents.world_model import (
    expectation_requests,
    expected_ratings,
    expected_ratings_many,
    generate_next_states,
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


def test_rating_cues_sit_between_the_action_and_each_slots_rating() -> None:
    """With cues each slot is rated right after its own cue line, the context stage 1 trains
    with ``wm_rating_cue`` (``Transition.wm_examples``); without them, as before."""
    pages = [("You are user 7.\nPage 1 of at most 5.\n", 2)]
    cues = [["A (1995): avg 3.1", "B (1990): avg 4.4; you would likely rate it 4.2"]]
    plain, cued = expectation_requests(pages), expectation_requests(pages, cues)
    assert [len(r[1]) for r in plain] == [len(r[1]) for r in cued] == [10]
    for slot in (1, 2):
        action = prompts.world_model_tail(text.render_wm_action(2, [slot], "next"))
        for (ctx, value), (ctx_cued, value_cued), r in zip(
                plain[0][1][5 * slot - 5:5 * slot], cued[0][1][5 * slot - 5:5 * slot],
                text.RATINGS, strict=True):
            assert ctx == action + text.rating_stem(slot) and value == value_cued
            assert ctx_cued == action + text.cue_line(slot, cues[0][slot - 1]) + \
                text.rating_stem(slot)
            assert value == text.rating_value(r)
    scorer = Scorer(tiny_lm(seed=3))
    assert expected_ratings_many(scorer, pages, cues=cues) == [expected_ratings(
        Scorer(tiny_lm(seed=3)), pages[0][0], 2, cues[0])]
    assert expected_ratings(scorer, pages[0][0], 2, cues[0]) != expected_ratings(
        scorer, pages[0][0], 2)
    with pytest.raises(ValueError, match="1 pages of cues for 2 pages"):
        expectation_requests(pages * 2, cues)


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


class _Model:
    """A generator that writes ``first`` after the action and ``page`` after a page line's
    stem, cut at ``stop`` as greedy decoding is."""

    def __init__(self, first: str, page: str) -> None:
        self.first, self.page, self.prompts = first, page, []

    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str:
        self.prompts.append(prompt)
        out = self.page if prompt.endswith((text.NEXT_GENRES, "next page: ")) else self.first
        return out.split(stop)[0] if stop else out


def test_the_action_and_the_page_limit_say_when_a_session_ends() -> None:
    """After an exit, or on a visit's last allowed page, there is no next page: its ratings are
    read and the end is written for the model. After next, the page line's stem is written
    in the adapter's format and the model goes on from it, so a model that would write the
    session's end there (as greedy decoding did) still names the next page."""
    gen = _Model("[2] rated 5\nnext page: none, the session ends\n", "Action, Drama\n[1] rated 1\n")
    went_on = predict_next_state(gen, "P\n", 3, [2], "next", page_format="genres")
    assert went_on == text.NextState(ratings={2: 5}, genres=["Action", "Drama"])
    tail = prompts.world_model_tail(text.render_wm_action(3, [2], "next"))
    assert gen.prompts == ["P\n" + tail, "P\n" + tail + "[2] rated 5\n" + text.NEXT_GENRES]
    titles = predict_next_state(gen, "P\n", 3, [2], "next")  # the shipped adapters' format
    assert gen.prompts[-1].endswith("[2] rated 5\nnext page: ") and not titles.ends
    for then, last in (("exit", False), ("next", True)):
        asked = len(gen.prompts)
        ended = predict_next_state(gen, "P\n", 3, [2], then, last=last, page_format="genres")
        assert ended == text.NextState(ratings={2: 5}, ends=True)
        assert len(gen.prompts) == asked + 1  # the ratings only: no page is asked for
    wrote = "[2] rated 5\nnext page genres: Action, Drama\n[1] rated 1\n"
    assert read_next_state(wrote, ends=True) == text.NextState(ratings={2: 5}, ends=True)
    with pytest.raises(ValueError, match="posters"):
        generate_next_states(lambda ps, n, stop: ps, ["P\n"], [False], "posters")


def test_next_states_decode_in_batches_as_one_by_one() -> None:
    """The batched decoder (two calls for any number of transitions) writes what each
    transition's own decoding writes."""
    scorer = Scorer(tiny_lm(), cache_size=0)
    tails = [prompts.world_model_tail(text.render_wm_action(3, w, then))
             for w, then in (([1], "next"), ([2, 3], "exit"), ([], "next"))]
    prompts_ = ["Persona.\nPage 1.\n" + t for t in tails]
    ends = [False, True, False]
    calls: list[int] = []

    def many(ps: list[str], n: int, stop: str | None) -> list[str]:
        calls.append(len(ps))
        return scorer.generate_many(ps, max_new_tokens=n, stop=stop)

    batched = generate_next_states(many, prompts_, ends, "genres", max_new_tokens=12)
    assert calls == [3, 2]
    for p, e, b in zip(prompts_, ends, batched, strict=True):
        assert generate_next_states(many, [p], [e], "genres", max_new_tokens=12) == [b]
        assert (text.NEXT_GENRES in b) != e
