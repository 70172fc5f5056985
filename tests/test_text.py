"""The state/action text format: renderers, the next-state parser, and the tokenisation contract
that lets the policy score line by line exactly what training saw as one target."""

from __future__ import annotations

from typing import Any

import pytest

from agents import prompts, text
from agents.llm import default_tokenizer, encode
from agents.persona import build_personas, render_persona
from agents.text import Evidence, ItemView, PageView
from simulator.data import Dataset

VIEWS = [
    ItemView(id=1, title="Toy Story", year=1995, genres=("Animation", "Children's", "Comedy"),
             popularity=452, mean_rating=3.9,
             evidence=[Evidence(title="Aladdin", rating=4, similarity=0.41)]),
    ItemView(id=50, title="Star Wars", year=1977, genres=("Action", "Sci-Fi"), popularity=583,
             mean_rating=4.4),
    ItemView(id=7, title="Twelve Monkeys", year=1995, genres=("Drama", "Sci-Fi"),
             popularity=392, mean_rating=3.8),
    ItemView(id=1300, title="'Til There Was You", genres=(), popularity=0),
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return default_tokenizer()


# --- rendering ----------------------------------------------------------------------------------

def test_render_action_layout() -> None:
    assert text.render_action(4, {3: 5, 1: 2}, "exit") == (
        "[1] watch\n[2] skip\n[3] watch\n[4] skip\nthen: exit\n[1] rated 2\n[3] rated 5\n")
    assert text.render_action(2, {}, "next") == "[1] skip\n[2] skip\nthen: next\n"
    assert text.render_wm_action(3, [2], "next") == "[1] skip\n[2] watch\n[3] skip\nthen: next\n"


def test_render_item_and_page() -> None:
    assert text.render_item(1, VIEWS[0]) == (
        "[1] Toy Story (1995) | Animation, Children's, Comedy | 452 ratings, avg 3.9\n"
        "    like what you rated: Aladdin 4/5")
    assert text.render_item(4, VIEWS[3]) == "[4] 'Til There Was You | unknown genre | 0 ratings"
    assert text.render_item(4, VIEWS[3].model_copy(update={"match": 0})) == (
        "[4] 'Til There Was You | unknown genre | 0 ratings\n"
        "    match 0/100; you watched 0 of its 20 closest\n"
        "    like what you rated: nothing you watched")
    page = text.render_page(PageView(page=2, max_pages=5, items=VIEWS[:2],
                                     session=[("Fargo", 5)], memories=["Page 1: skipped all"]))
    lines = page.splitlines()
    assert lines[:4] == ["Page 2 of at most 5.", "Watched this session: Fargo 5/5.",
                         "You remember: Page 1: skipped all", "On this page:"]
    assert page.endswith("\n") and lines[4].startswith("[1] Toy Story")
    assert text.render_predictions({2: 3.456, 1: 4.0}) == "You expect to rate: [1] 4.0, [2] 3.5\n"
    assert text.render_predictions({}) == ""


def test_match_line_and_the_no_evidence_ablation() -> None:
    matched = VIEWS[1].model_copy(update={"match": 87, "close_watched": 3, "close_rating": 4.25})
    assert text.render_item(2, matched) == (
        "[2] Star Wars (1977) | Action, Sci-Fi | 583 ratings, avg 4.4\n"
        "    match 87/100; you watched 3 of its 20 closest, rated 4.2\n"
        "    like what you rated: nothing you watched")
    unseen = VIEWS[2].model_copy(update={"match": 5})
    assert text.render_item(3, unseen).splitlines()[1] == (
        "    match 5/100; you watched 0 of its 20 closest")
    both = VIEWS[0].model_copy(update={"match": 60, "close_watched": 1, "close_rating": 4.0})
    assert both.personal() and matched.personal() and not VIEWS[2].personal()
    assert text.render_item(1, both).splitlines()[1:] == [
        "    match 60/100; you watched 1 of its 20 closest, rated 4.0",
        "    like what you rated: Aladdin 4/5"]
    full = text.page_prompt(1, 5, [both, matched, unseen])
    bare = text.page_prompt(1, 5, [both, matched, unseen], evidence=False)
    assert "match 60/100" in full and "Aladdin" in full
    assert "match" not in bare and "like what you rated" not in bare and "closest" not in bare
    assert bare == text.page_prompt(1, 5, [VIEWS[0].model_copy(update={"evidence": []}),
                                           VIEWS[1], VIEWS[2]])


def test_item_cue_restates_the_numbers_and_drops_them_for_the_ablation() -> None:
    matched = VIEWS[1].model_copy(update={"match": 87, "close_watched": 3, "close_rating": 4.25})
    unseen = VIEWS[2].model_copy(update={"match": 5})
    assert text.page_cues([matched, unseen, VIEWS[3]]) == [
        "Star Wars (1977): match 87/100, you watched 3 of its 20 closest, rated 4.2",
        "Twelve Monkeys (1995): match 5/100, you watched 0 of its 20 closest",
        "'Til There Was You"]
    assert text.page_cues([matched, unseen], evidence=False) == ["Star Wars (1977)",
                                                                 "Twelve Monkeys (1995)"]
    assert text.cue_line(2, "Star Wars (1977)") == "[2] Star Wars (1977)\n"
    assert text.cue_line(2, "Star Wars (1977)", 3.96) == (
        "[2] Star Wars (1977); you expect to rate 4.0\n")


def test_rating_cue_restates_the_rating_evidence_and_drops_it_for_the_ablation() -> None:
    matched = VIEWS[1].model_copy(update={"match": 87, "close_watched": 3, "close_rating": 4.25,
                                          "likely_rating": 4.61})
    unseen = VIEWS[2].model_copy(update={"match": 5, "likely_rating": 3.9})
    assert text.page_rating_cues([matched, unseen, VIEWS[3]]) == [
        "Star Wars (1977): avg 4.4; you watched 3 of its 20 closest, rated 4.2; from your "
        "ratings you would likely rate it 4.6",
        "Twelve Monkeys (1995): avg 3.8; from your ratings you would likely rate it 3.9",
        "'Til There Was You"]
    assert text.page_rating_cues([matched, unseen], evidence=False) == [
        "Star Wars (1977): avg 4.4", "Twelve Monkeys (1995): avg 3.8"]
    # The page itself does not show the kNN rating: it is the rating's cue, not the choice's.
    assert "likely" not in text.page_prompt(1, 5, [matched, unseen])


@pytest.mark.parametrize("ratings, next_items", [
    ({1: 4, 3: 2}, VIEWS[1:3]),
    ({}, VIEWS),
    ({2: 5}, None),
    ({}, None),
    ({1: 1, 2: 2, 3: 3, 4: 5}, VIEWS[3:]),
])
def test_next_state_round_trip(ratings: dict[int, int], next_items: list[ItemView] | None
                               ) -> None:
    rendered = text.render_next_state(ratings, next_items)
    ns = text.parse_next_state(rendered)
    assert ns.ratings == ratings
    assert ns.ends is (next_items is None)
    assert ns.titles == ([] if next_items is None else [v.label() for v in next_items])
    assert ns.genres == sorted({g for v in next_items or [] for g in v.genres})
    fields = ns.fields()
    assert ("end", next_items is None) in fields
    assert {("rating", s, r) for s, r in ratings.items()} <= fields


def test_next_state_text() -> None:
    assert text.render_next_state({2: 4}, VIEWS[1:2]) == (
        "[2] rated 4\nnext page: Star Wars (1977) [Action, Sci-Fi]\n")
    assert text.render_next_state({}, None) == "next page: none, the session ends\n"


def test_a_genre_mix_next_state_round_trips() -> None:
    """``--wm-format genres``: the next page is its sorted genre mix, no title; the end of a
    session reads as in the titles format, and an unknown format is refused."""
    rendered = text.render_next_state({2: 4}, VIEWS[:2], "genres")
    assert rendered == ("[2] rated 4\nnext page genres: Action, Animation, Children's, Comedy, "
                        "Sci-Fi\n")
    ns = text.parse_next_state(rendered)
    assert ns.ratings == {2: 4} and ns.titles == [] and not ns.ends
    assert ns.genres == sorted({g for v in VIEWS[:2] for g in v.genres})
    assert text.render_next_state({}, None, "genres") == text.render_next_state({}, None)
    with pytest.raises(ValueError, match="one of titles, genres"):
        text.render_next_state({}, VIEWS[:1], "posters")


def test_a_generated_state_is_read_up_to_its_next_page() -> None:
    """A model that goes on after the next page writes another state: not this one's."""
    more = "[1] rated 2\nnext page: Fargo (1996) [Drama]\n"
    for page in ("next page: Heat (1995) [Action]\n", "next page genres: Action, Drama\n",
                 "next page: none, the session ends\n"):
        ns = text.parse_generated_state("[2] rated 5\n" + page + more)
        assert ns == text.parse_next_state("[2] rated 5\n" + page) and ns.ratings == {2: 5}


def test_parse_next_state_tolerates_generated_noise() -> None:
    ns = text.parse_next_state("[1] rated 9\n[2] rated 3  \nblah\n[x] rated 4\n"
                               "next page: Heat (1995) [Action, Crime]; garbage; Fargo [Drama]\n")
    assert ns.ratings == {2: 3}
    assert ns.titles == ["Heat (1995)", "Fargo"]
    assert ns.genres == ["Action", "Crime", "Drama"]
    assert not ns.ends
    assert text.parse_next_state("") == text.NextState()


# --- choice lines -------------------------------------------------------------------------------

def _choice_lines(n_slots: int = 4) -> list[str]:
    lines = [text.slot_line(s, c) for s in range(1, n_slots + 1) for c in (text.WATCH, text.SKIP)]
    lines += [text.rating_line(s, r) for s in range(1, n_slots + 1) for r in text.RATINGS]
    lines += [text.rating_line(s, int(r)) for s in range(1, n_slots + 1) for r in text.RATINGS]
    lines += [text.then_line(t) for t in text.THEN]
    return lines


def test_every_choice_line_is_one_newline_terminated_line() -> None:
    lines = _choice_lines(10)
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert len(set(lines)) == 2 * 10 + 5 * 10 + 2  # int and str ratings render alike
    assert text.rating_line(3, 4) == text.rating_line(3, "4") == "[3] rated 4\n"


def test_rendered_targets_are_concatenations_of_choice_lines() -> None:
    ratings = {2: 5, 4: 1}
    expected = (text.slot_line(1, text.SKIP) + text.slot_line(2, text.WATCH)
                + text.slot_line(3, text.SKIP) + text.slot_line(4, text.WATCH)
                + text.then_line("next") + text.rating_line(2, 5) + text.rating_line(4, 1))
    assert text.render_action(4, ratings, "next") == expected


# --- tokenisation contract ----------------------------------------------------------------------

@pytest.fixture
def persona(tiny_dataset: Dataset) -> str:
    text_ = render_persona(build_personas(tiny_dataset, tiny_dataset.ratings)[1],
                           tiny_dataset.items)
    assert "Movie" in text_
    return text_


def _contexts(persona: str) -> list[str]:
    """Every kind of newline-terminated text a candidate line is scored after."""
    page = text.render_page(PageView(page=1, max_pages=5, items=VIEWS,
                                     session=[("Heat", 4)], memories=["Page 1: watched Heat."]))
    preds = text.render_predictions({1: 4.2, 2: 3.0, 3: 2.5, 4: 1.0})
    tails = [prompts.policy_tail(), prompts.policy_tail(preds),
             prompts.policy_tail(preds, "It fits my taste for sci-fi. "),
             prompts.world_model_tail(text.render_wm_action(4, [1, 3], "next")),
             prompts.reflection_tail(preds)]
    partial = (prompts.policy_tail(preds) + text.render_choices(4, [2]) + text.then_line("next")
               + text.rating_line(2, 5))
    cued = prompts.policy_tail(preds) + text.cue_line(3, text.item_cue(VIEWS[2]), 2.5)
    return [prompts.persona_block(persona), page, prompts.persona_block(persona) + page,
            *tails, partial, cued, prompts.CHOICES, prompts.NEXT_STATE, prompts.THINK]


def test_contexts_end_in_newline(persona: str) -> None:
    assert all(c.endswith("\n") for c in _contexts(persona))


def test_segment_boundary_after_newline_matches_joint_encoding(tok: Any, persona: str) -> None:
    lines = _choice_lines(4)
    for a in _contexts(persona):
        for b in lines:
            assert encode(tok, [a, b]) == encode(tok, [a + b]), (a[-30:], b)
    # ...and chains of lines, as the policy accumulates its context.
    ctx = prompts.policy_tail()
    for b in lines:
        assert encode(tok, [ctx, b]) == encode(tok, [ctx + b])
        ctx += b


def test_segment_boundary_is_not_free_without_the_newline(tok: Any) -> None:
    """The contract depends on the newline: without it BPE may merge across the boundary."""
    assert encode(tok, ["[1] rat", "ed 4\n"]) != encode(tok, ["[1] rated 4\n"])


def test_line_by_line_scoring_sees_the_training_tokens(tok: Any, persona: str) -> None:
    """The ids the policy scores (prefix, context so far, one candidate line) add up to the ids
    the trainer builds from the prompt segments and the whole action target."""
    page = text.render_page(PageView(page=3, max_pages=5, items=VIEWS))
    preds = text.render_predictions({1: 4.2, 2: 3.0, 3: 2.5, 4: 1.0})
    ratings, then = {1: 4, 4: 2}, "exit"
    train_ids = encode(tok, [prompts.persona_block(persona), page, prompts.policy_tail(preds)]
                       ) + encode(tok, [text.render_action(4, ratings, then)])

    prefix = prompts.persona_block(persona) + page
    ctx = prompts.policy_tail(preds)
    lines = [text.slot_line(s, text.WATCH if s in ratings else text.SKIP) for s in range(1, 5)]
    lines.append(text.then_line(then))
    lines += [text.rating_line(s, r) for s, r in sorted(ratings.items())]
    for line in lines:
        scored = encode(tok, [prefix]) + encode(tok, [ctx]) + encode(tok, [line])
        assert train_ids[:len(scored)] == scored
        ctx += line
    assert len(scored) == len(train_ids)


def test_no_satisfaction_answer_is_a_prefix_of_another(tok: Any) -> None:
    """An enumerated answer is scored by the probability of its tokens; were "1" a token
    prefix of "10" (as bare digits are), its score would hold every answer starting with 1."""
    answers = [encode(tok, [prompts.SATISFACTION_TAIL + prompts.satisfaction_option(k)])
               for k in range(1, 11)]
    for a in answers:
        for b in answers:
            assert a == b or b[:len(a)] != a
    bare = [encode(tok, [prompts.SATISFACTION_TAIL + str(k)]) for k in (1, 10)]
    assert bare[1][:len(bare[0])] == bare[0]  # the bare digits' trap this avoids
    question = prompts.SATISFACTION.format(persona="P", session="S")
    assert question.startswith("P\n") and "S\n" in question and "1 to 10" in question


def test_the_interview_reads_counts_not_every_rating() -> None:
    assert text.session_summary(3, [5, 2, 4]) == (
        "You saw 3 page(s) of recommendations, watched 3 movie(s) and liked 2 of them "
        "(rated 4 or 5); your average rating was 3.7 out of 5.")
    assert "watched none" in text.session_summary(2, [])
