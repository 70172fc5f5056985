"""Batched scoring equals one-by-one scoring, decisions score each line after the text it
was trained on, and lockstep browsing stops at an exit and carries a session on.

Worlds are the 40-user ml-100k ``small_world`` (conftest); models are tiny random Llamas.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from agents import prompts, text
from agents.browse import (
    browse,
    list_scores,
    pages_of,
)
from agents.decide import Calibration, decide
from agents.llm import tiny_lm
from agents.scorer import Scorer
from agents.transition import Transition
from agents.world import World
from tests.pages import VIEWS, page_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- batched scoring equals one-by-one scoring --------------------------------------------------

def test_score_many_equals_score(small_world: World) -> None:
    lm = tiny_lm(seed=5)
    assert lm.dtype == torch.float32
    inputs = page_inputs(small_world, n=2)
    long_prefix = prompts.persona_block(inputs[0].persona_text) + inputs[0].page_text
    other = prompts.persona_block(inputs[1].persona_text) + inputs[1].page_text
    opts = [(prompts.policy_tail(), text.slot_line(1, text.WATCH)),
            (prompts.policy_tail(), text.slot_line(3, text.SKIP)),
            (prompts.policy_tail() + text.render_choices(4, [1, 2]) + text.then_line("next"),
             text.rating_line(2, 5)),
            ("", "then: exit\n"),
            ("", "A much longer target of several words\n")]
    requests = [("Short prefix.\n", opts[:2]), (long_prefix, opts), (other, opts[1:4]),
                (long_prefix, opts[2:]), ("Short prefix.\n", [])]
    batched = Scorer(lm, cache_size=2, batch_tokens=64).score_many(requests)  # many chunks
    one = Scorer(lm)
    assert [len(r) for r in batched] == [len(o) for _, o in requests]
    for (prefix, options), got in zip(requests, batched, strict=True):
        np.testing.assert_allclose(got, one.score(prefix, options), atol=2e-4)
        np.testing.assert_allclose(got, one.score_naive(prefix, options), atol=2e-4)
    with pytest.raises(ValueError, match="empty"):
        one.score_many([("", opts[:1])])


def test_decide_on_a_batch_equals_decide_alone(small_world: World) -> None:
    lm = tiny_lm(seed=6)
    inputs = page_inputs(small_world, n=3, pages=2)
    cal = Calibration(watch_offset=0.4, then_offset=-0.2)
    for world_model in (False, True):
        together = decide(Scorer(lm, cache_size=64), inputs, world_model=world_model,
                          calibration=cal, temperature=0.7)
        assert any(d.action.watched for d in together)  # ratings are compared too
        for inp, d in zip(inputs, together, strict=True):
            alone = decide(Scorer(lm), [inp], world_model=world_model, calibration=cal,
                           temperature=0.7)[0]
            assert d.action == alone.action
            assert d.predictions == pytest.approx(alone.predictions, abs=0.011)
            assert bool(d.predictions) is world_model
            for s, v in alone.watch_scores.items():
                assert d.watch_scores[s] == pytest.approx(v, abs=1e-3)
            assert d.exit_score == pytest.approx(alone.exit_score, abs=1e-3)
            assert sorted(d.rating_probs) == sorted(inp.items.index(i) + 1
                                                    for i in d.action.watched)
            for s, probs in alone.rating_probs.items():
                assert d.rating_probs[s] == pytest.approx(probs, abs=1e-3)


def test_rating_expectations_in_chunks_equal_one_call(small_world: World) -> None:
    """Held-out pages' expected ratings go ``chunk`` pages per scorer call (one call held
    every page's prompt at once); the chunks must not change an answer."""
    from agents.decide import rating_expectations
    from simulator.env import PageAction

    lm = tiny_lm(seed=6)
    inputs = page_inputs(small_world, n=3, pages=2)
    actions = [PageAction(watched={i.items[0]: 4, i.items[k % 4]: 2} if k % 3 else {},
                          then="exit" if k % 2 else "next") for k, i in enumerate(inputs)]
    whole = rating_expectations(Scorer(lm), inputs, actions, chunk=len(inputs))
    parts = rating_expectations(Scorer(lm), inputs, actions, chunk=2)
    assert [sorted(r) for r in whole] == [sorted(inputs[k].items.index(i) + 1 for i in a.watched)
                                          for k, a in enumerate(actions)]
    assert any(whole) and not all(whole)
    for a, b in zip(whole, parts, strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    assert all(1 <= v <= 5 for r in whole for v in r.values())
    with pytest.raises(ValueError, match="6 pages but 5 actions"):
        rating_expectations(Scorer(lm), inputs, actions[:5])


def test_decide_scores_next_exit_and_ratings_as_the_full_texts_do(small_world: World) -> None:
    """Ratings are scored over a prefix that extends the page by the choices and next/exit; the
    probabilities must be those of the plain texts, scored with no cache at all."""
    lm = tiny_lm(seed=3)
    inputs = page_inputs(small_world, n=2, pages=1)
    cal = Calibration(watch_offset=100.0)  # every slot watched: every rating line is scored
    for d, inp in zip(decide(Scorer(lm), inputs, calibration=cal), inputs, strict=True):
        slots = sorted(d.watch_scores)
        prefix = prompts.prefix(inp.persona_text, inp.page_text)
        ctx = prompts.policy_tail() + text.render_choices(len(slots), slots)
        ref = Scorer(lm)
        then = ref.score_naive(prefix, [(ctx, text.then_line(t)) for t in text.THEN])
        assert d.then_probs[1] == pytest.approx(1 / (1 + math.exp(then[0] - then[1])),
                                                abs=2e-4)
        ctx += text.then_line(d.action.then)
        for s in slots:
            lp = np.asarray(ref.score_naive(prefix, [(ctx, text.rating_line(s, r))
                                                     for r in text.RATINGS]))
            want = np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum()
            np.testing.assert_allclose(d.rating_probs[s], want, atol=2e-4)


class Options:
    """A scorer that keeps every (prefix, options) request and scores by length."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []

    def score_many(self, requests):
        self.requests += [(p, list(o)) for p, o in requests]
        return [[-float(len(c + line)) for c, line in o] for _, o in requests]


def test_decide_scores_each_slot_after_the_text_it_was_trained_on() -> None:
    views = tuple(v.model_copy(update={"match": 10 * s, "close_watched": s})
                  for s, v in enumerate(VIEWS, 1))
    tr = Transition(user=1, persona="You are user 1.\n", views=views, session=(), page=2,
                    max_pages=5, ratings={2: 5}, then="next", next_views=None,
                    items=tuple(v.id for v in views))
    preds = {1: 3.5, 2: 4.25, 3: 2.0, 4: 1.0}
    rec = Options()
    decide(rec, [tr.decision_input().model_copy(update={"predictions": preds})])
    scored = {line: prefix + ctx for prefix, opts in rec.requests for ctx, line in opts
              if line.endswith((" watch\n", " skip\n"))}
    trained = {e.target: "".join(e.segments) for e in tr.policy_examples(preds)[:4]}
    assert len(trained) == 4 and all(scored[line] == ctx for line, ctx in trained.items())
    assert "[3] Film 3 (1993): match 30/100, you watched 3 of its 20 closest; you expect to " \
           "rate 2.0\n" in trained[text.slot_line(3, text.SKIP)]


# --- lockstep browsing --------------------------------------------------------------------------

class Recording:
    """A scorer wrapper that keeps every prefix scored."""

    def __init__(self, inner: Scorer) -> None:
        self.inner, self.prefixes = inner, []

    def score_many(self, requests):
        self.prefixes += [p for p, _ in requests]
        return self.inner.score_many(requests)


def _sessions(world: World, n_pages: int = 3) -> list[tuple[int, list[list[int]]]]:
    out = []
    for k, u in enumerate(sorted(world.histories)[:2]):
        unseen = [i for i in sorted(world.ds.items) if i not in world.histories[u]]
        out.append((u, pages_of(unseen[10 * k: 10 * k + 4 * n_pages])))
    return out


def test_browse_stops_a_session_at_exit(small_world: World, scorer: Scorer) -> None:
    w = small_world
    sessions = _sessions(w)
    kw = dict(world_model=False, temperature=0.0)
    leave = browse(scorer, w.perceiver, w.personas, w.histories, sessions,
                   calibration=Calibration(then_offset=100.0), **kw)
    assert [len(run) for run in leave] == [1, 1]
    assert all(run[0].action.then == "exit" for run in leave)
    stay = browse(scorer, w.perceiver, w.personas, w.histories, sessions,
                  calibration=Calibration(then_offset=-100.0), **kw)
    assert [len(run) for run in stay] == [3, 3]
    # exits=False browses every page whatever the agent would say (1:m lists): next/exit is
    # not asked, and the session goes on to the next page.
    scorer.stats.reset()
    listed = browse(scorer, w.perceiver, w.personas, w.histories, sessions,
                    calibration=Calibration(then_offset=100.0), exits=False, **kw)
    assert [len(run) for run in listed] == [3, 3]
    assert all(d.action.then == "next" and d.exit_score is None and not d.then_probs
               for run in listed for d in run)
    # Per page: watch/skip lines, then ratings where something was watched; nothing else
    # (the last page: watch/skip only).
    watched = sum(1 for run in listed for d in run[:-1] if d.action.watched)
    assert scorer.stats.calls == 3 * 2 + watched
    for run, (_, pages) in zip(listed, sessions, strict=True):
        for d, page in zip(run, pages, strict=True):
            assert set(d.action.watched) <= set(page) and sorted(d.watch_scores) == [1, 2, 3, 4]


def test_browse_carries_the_session_into_later_pages(small_world: World,
                                                     scorer: Scorer) -> None:
    w = small_world
    sessions = _sessions(w, n_pages=2)
    rec = Recording(scorer)
    runs = browse(rec, w.perceiver, w.personas, w.histories, sessions, world_model=False,
                  calibration=Calibration(watch_offset=100.0, then_offset=-100.0))
    assert all(list(run[0].action.watched) == pages[0]
               for run, (_, pages) in zip(runs, sessions, strict=True))
    page2 = [p for p in rec.prefixes if "Page 2 of at most 2." in p]
    assert page2
    for (u, pages), run in zip(sessions, runs, strict=True):
        first = [w.ds.items[i].title for i in pages[0]]
        mine = [p for p in page2 if p.startswith(prompts.persona_block(w.personas[u]))]
        line = "Watched this session: " + "; ".join(
            f"{t} {run[0].action.watched[i]}/5" for t, i in zip(first, pages[0], strict=True))
        assert mine and all(line + ".\n" in p for p in mine)
        # What was watched on page 1 is evidence on page 2 (history plus this session).
        assert run[1].watch_scores and len(run) == 2


def test_list_scores_browse_every_page_with_the_offset(small_world: World,
                                                       scorer: Scorer) -> None:
    w = small_world
    lists = [(u, [i for p in pages for i in p][:4]) for u, pages in _sessions(w, n_pages=1)]
    base = list_scores(scorer, w.perceiver, w.personas, w.histories, lists, world_model=False)
    shifted = list_scores(scorer, w.perceiver, w.personas, w.histories, lists,
                          world_model=False, offset=1.5)
    assert [len(s) for s in base] == [4, 4]
    for b, s in zip(base, shifted, strict=True):
        np.testing.assert_allclose(s - b, 1.5, atol=1e-9)
    assert all(math.isfinite(x) for s in base for x in s)


def test_two_list_views_average_the_list_and_its_reverse(small_world: World,
                                                        scorer: Scorer) -> None:
    w = small_world
    lists = [(u, [i for p in pages for i in p][:8]) for u, pages in _sessions(w, n_pages=2)]
    args = (scorer, w.perceiver, w.personas, w.histories)
    ahead = list_scores(*args, lists, world_model=False, offset=0.5)
    back = list_scores(*args, [(u, items[::-1]) for u, items in lists], world_model=False,
                       offset=0.5)
    both = list_scores(*args, lists, world_model=False, offset=0.5, views=2)
    assert [len(s) for s in both] == [8, 8]
    for a, b, m in zip(ahead, back, both, strict=True):
        assert not np.allclose(a, b[::-1])  # the second view is another context
        np.testing.assert_allclose(m, (a + b[::-1]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="views must be one of"):
        list_scores(*args, lists, world_model=False, views=3)


class Lines(Recording):
    """A scorer wrapper that keeps every (context, line) option scored."""

    def __init__(self, inner: Scorer) -> None:
        super().__init__(inner)
        self.options: list[tuple[str, str]] = []
        self.prefixes: list[str] = []

    def score_many(self, requests):
        requests = [(p, list(o)) for p, o in requests]
        self.options += [opt for _, o in requests for opt in o]
        self.prefixes += [p for p, _ in requests]
        return super().score_many(requests)


def test_list_scores_rate_earlier_pages_in_the_adapters_format(small_world: World,
                                                               scorer: Scorer) -> None:
    """A list's later pages show the ratings given on its earlier ones, so the lists rate in
    the format the adapter was trained on, as sessions and held-out pages do."""
    w = small_world
    lists = [(u, [i for p in pages for i in p][:8]) for u, pages in _sessions(w, n_pages=2)]
    for cue in (True, False):
        rec = Lines(scorer)
        list_scores(rec, w.perceiver, w.personas, w.histories, lists, world_model=False,
                    offset=100.0, calibration=Calibration(rating_cue=cue))  # all watched
        rated = [ctx for ctx, line in rec.options if " rated " in line]
        assert rated and all(ctx.endswith("then: next\n") is not cue for ctx in rated)
        cues = [ctx.rsplit("then: next\n", 1)[1] for ctx in rated]
        assert all(bool(re.fullmatch(r"\[\d\] \S.*\n", c)) is cue for c in cues)
        assert any(": avg " in c for c in cues) is cue
        assert all(("you would likely rate it" in c) is cue for c in cues)
    # The adapter's rating tilt too: a list's second page shows its first page rated as tilted.
    for tilt, shown in ((40.0, " 5/5"), (-40.0, " 1/5")):
        rec = Lines(scorer)
        list_scores(rec, w.perceiver, w.personas, w.histories, lists, world_model=False,
                    offset=100.0, calibration=Calibration(rating_tilt=tilt, watch_offset=-100.0))
        seen = [line for p in rec.prefixes for line in p.splitlines()
                if line.startswith("Watched this session: ")]
        assert seen and all(r == shown for line in seen for r in re.findall(r" \d/5", line))


def test_perception_reads_the_item_knn_rating_and_the_ablation_drops_it(small_world: World
                                                                        ) -> None:
    w = small_world
    user = next(iter(w.histories))
    history = w.histories[user]
    items = [i for i in list(w.perceiver.items)[:40] if i not in history][:8]
    views = w.perceiver.page(items, history)
    assert [v.likely_rating for v in views] == [
        round(w.similarity.knn_rating(i, history), 1) for i in items]
    assert len({v.likely_rating for v in views}) > 1  # it depends on the item
    assert all(v.likely_rating is None for v in text.public(views))


def _all_watched() -> Transition:
    views = tuple(v.model_copy(update={"match": 10 * s, "close_watched": s, "close_rating": 3.5,
                                       "mean_rating": 3.0 + s / 10})
                  for s, v in enumerate(VIEWS, 1))
    return Transition(user=1, persona="You are user 1.\n", views=views, session=(), page=2,
                      max_pages=5, ratings={1: 4, 2: 5, 3: 2, 4: 3}, then="next",
                      next_views=None, items=tuple(v.id for v in views))


def test_decide_rates_each_slot_after_its_rating_cue_as_trained() -> None:
    """An adapter trained with rating cues (``Calibration.rating_cue``) rates each watched slot
    after the very text its rating example was trained on; one trained before rates after the
    choices alone, as it was trained."""
    tr = _all_watched()
    preds = {1: 3.5, 2: 4.25, 3: 2.0, 4: 1.0}
    inp = tr.decision_input().model_copy(update={"predictions": preds})
    for cue in (True, False):
        rec = Options()
        (d,) = decide(rec, [inp], calibration=Calibration(watch_offset=100.0, rating_cue=cue))
        assert d.action.then == tr.then and sorted(d.action.watched) == sorted(tr.items)
        scored = {line: prefix + ctx for prefix, opts in rec.requests for ctx, line in opts
                  if " rated " in line}
        assert len(scored) == 4 * 5
        examples = tr.policy_examples(preds, rating_cue=cue)
        if cue:
            trained = {e.target: "".join(e.segments) for e in examples if "rating" in e.meta}
            assert len(trained) == 4 and all(scored[line] == ctx for line, ctx in trained.items())
            assert trained[text.rating_line(3, 2)].endswith(
                "then: next\n[3] Film 3 (1993): avg 3.3; you watched 3 of its 20 closest, "
                "rated 3.5\n")
            assert examples[4].target == text.then_line("next")
        else:
            assert examples[4].target == text.then_line("next") + text.ratings_lines(tr.ratings)
            assert all(ctx.endswith("then: next\n") for ctx in scored.values())


def test_rating_expectations_read_the_rating_cue_when_trained_with_it() -> None:
    from agents.decide import rating_expectations

    tr = _all_watched()
    inp = tr.decision_input()
    human = tr.human_action()
    for cue in (True, False):
        rec = Options()
        out = rating_expectations(rec, [inp], [human], calibration=Calibration(rating_cue=cue))
        assert sorted(out[0]) == [1, 2, 3, 4]
        contexts = {ctx for _, opts in rec.requests for ctx, _ in opts}
        trained = {e.segments[-1] for e in tr.policy_examples(rating_cue=True)
                   if "rating" in e.meta}
        assert (contexts == trained) is cue
        assert all(("avg 3." in c) is cue for c in contexts)


def test_the_world_models_expectations_read_the_rating_cue_it_was_trained_with() -> None:
    """``Calibration.wm_rating_cue``: the full agent asks its world model for each slot's
    rating right after that slot's rating cue, as ``Transition.wm_examples`` trains it (up to
    the action, which there names the human's slots); otherwise right after the action."""
    from agents import prompts

    tr = _all_watched()
    inp = tr.decision_input()
    trained = [e.segments[-1] for e in tr.wm_examples(rating_cue=True)[1:]]
    for cue in (True, False):
        rec = Options()
        decide(rec, [inp], world_model=True, calibration=Calibration(wm_rating_cue=cue))
        asked = [ctx for _, opts in rec.requests for ctx, _ in opts if prompts.NEXT_STATE in ctx]
        assert len(asked) == 4 * 5
        for slot in range(1, 5):
            cue_line = text.cue_line(slot, inp.rating_cues[slot - 1])
            ctxs = set(asked[5 * slot - 5:5 * slot])
            assert ctxs == {prompts.world_model_tail(text.render_wm_action(4, [slot], "next"))
                            + (cue_line if cue else "") + text.rating_stem(slot)}
            assert trained[slot - 1].endswith(cue_line)
