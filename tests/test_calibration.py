"""Calibrated offsets: stored in a checkpoint's manifest, applied in ``agents.decide``, and
fitted so that greedy and sampling agents take the humans' rates.

Worlds are the 40-user ml-100k ``small_world`` (conftest); models are tiny random Llamas.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from agents.browse import (
    accuracy_offset,
    fit_rating_scale,
    pages_of,
    rate_offset,
    rating_rmse,
    sampled_rate_offset,
    tilt_to_mean,
)
from agents.decide import Calibration, decide, rating_expectations, tilted
from agents.policy import LLMPolicy, expected_value
from agents.scorer import Scorer
from agents.transition import transitions
from agents.world import World
from tests.pages import page_inputs
from training.calibrate import calibrate, digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_calibration_round_trips_through_the_manifest(tmp_path: Path) -> None:
    cal = Calibration(watch_offset=1.25, then_offset=-0.5, list_offset=0.75, rating_cue=True)
    manifest = {"base_model": "tiny", "calibration": {**cal.model_dump(), "seconds": 3.1,
                                                      "fitted_on": {"pages": 12}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert Calibration.of_checkpoint(tmp_path) == cal
    assert Calibration.of_checkpoint(str(tmp_path)) == cal
    # No checkpoint, no manifest, or a manifest from before calibration: no offsets.
    assert Calibration.of_checkpoint(None) == Calibration()
    assert Calibration.of_checkpoint(tmp_path / "missing") == Calibration()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"base_model": "tiny"}))
    assert Calibration.of_checkpoint(tmp_path / "old") == Calibration()
    assert Calibration().list_offset is None
    assert Calibration.of_checkpoint(tmp_path).rating_cue  # the adapter's rating format
    assert not Calibration().rating_cue  # adapters from before it rate without cues
    # The world model's format is the training config's, not a fitted number.
    assert Calibration.of_checkpoint(tmp_path).wm_format == "titles"
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest,
                                                        "config": {"wm_format": "genres"}}))
    assert Calibration.of_checkpoint(tmp_path) == cal.model_copy(update={"wm_format": "genres"})
    assert not Calibration.of_checkpoint(tmp_path).wm_rating_cue
    (tmp_path / "manifest.json").write_text(json.dumps(
        {**manifest, "config": {"wm_format": "genres", "wm_rating_cue": True}}))
    assert Calibration.of_checkpoint(tmp_path) == cal.model_copy(
        update={"wm_format": "genres", "wm_rating_cue": True})


def test_the_rating_tilt_changes_the_ratings_decided(small_world: World, scorer: Scorer
                                                     ) -> None:
    inputs = page_inputs(small_world)
    for tilt, rating in ((40.0, 5), (-40.0, 1)):
        cal = Calibration(watch_offset=100.0, rating_tilt=tilt)
        for d in decide(scorer, inputs, calibration=cal):
            assert set(d.action.watched.values()) == {rating}
            # The probabilities recorded are those the rating was taken from: tilted.
            assert all(p[rating - 1] > 0.99 for p in d.rating_probs.values())


def test_offsets_change_decisions(small_world: World, scorer: Scorer) -> None:
    inputs = page_inputs(small_world)
    plain = decide(scorer, inputs)
    eager = decide(scorer, inputs, calibration=Calibration(watch_offset=100.0))
    shy = decide(scorer, inputs, calibration=Calibration(watch_offset=-100.0))
    for inp, p, e, s in zip(inputs, plain, eager, shy, strict=True):
        assert list(e.action.watched) == inp.items and not s.action.watched
        assert set(e.action.watched.values()) <= {1, 2, 3, 4, 5}
        # The offset is added to the raw log-odds: slots are scored after the page alone.
        for slot, v in p.watch_scores.items():
            assert e.watch_scores[slot] == pytest.approx(v + 100.0, abs=1e-6)
            assert s.watch_scores[slot] == pytest.approx(v - 100.0, abs=1e-6)
    # An explicit watch_offset overrides the calibration's (1:m lists).
    over = decide(scorer, inputs, calibration=Calibration(watch_offset=100.0),
                  watch_offset=-100.0, then=False)
    assert all(not d.action.watched and not d.rating_probs for d in over)
    # then_offset decides next/exit.
    leave = decide(scorer, inputs, calibration=Calibration(then_offset=100.0))
    stay = decide(scorer, inputs, calibration=Calibration(then_offset=-100.0))
    assert {d.action.then for d in leave} == {"exit"} and {d.action.then for d in stay} == {"next"}
    for d, p in zip(leave, plain, strict=True):
        assert d.exit_score == pytest.approx(p.exit_score + 100.0, abs=1e-6)
        assert d.then_probs[1] == pytest.approx(1.0)
    # On a visit's last allowed page next/exit takes last_then_offset instead, elsewhere not.
    last = [i.model_copy(update={"last": True}) for i in inputs]
    cal = Calibration(then_offset=-100.0, last_then_offset=100.0)
    assert {d.action.then for d in decide(scorer, last, calibration=cal)} == {"exit"}
    assert {d.action.then for d in decide(scorer, inputs, calibration=cal)} == {"next"}
    assert {d.action.then for d in decide(scorer, last, calibration=Calibration(
        then_offset=-100.0))} == {"next"}  # none fitted: then_offset everywhere
    # Above the fitted temperature a page's decisions say so once, not once per offset.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decide(scorer, last[:1], calibration=cal, temperature=2.0)
    assert [str(w.message) for w in caught if "calibrated at" in str(w.message)] == [
        "offsets were calibrated at temperature 1; at 2 watch and exit rates are not calibrated"]
    # The policy object applies the calibration it holds.
    policy = LLMPolicy(scorer, temperature=0.0, calibration=Calibration(watch_offset=100.0))
    assert list(policy.decide(inputs[0]).action.watched) == inputs[0].items


def test_offset_helpers() -> None:
    scores = np.array([-2.0, -1.0, 0.5, 1.0, 3.0, 4.0, -3.0, 2.0])
    for rate in (0.25, 0.5, 0.75):
        assert np.mean(scores + rate_offset(scores, rate) > 0) == pytest.approx(rate, abs=0.13)
    assert rate_offset(np.array([]), 0.3) == 0.0
    assert np.all(scores + rate_offset(scores, 0.0) <= 0)
    assert np.all(scores + rate_offset(scores, 1.0) >= 0)
    labels = [[0, 0, 1, 1], [0, 1, 1, 1]]
    lists = [np.array([-3.0, -2.0, -1.0, 0.5]), np.array([-2.5, -0.5, 1.0, 2.0])]
    off = accuracy_offset(lists, labels)
    assert np.mean((np.concatenate(lists) + off > 0) == np.concatenate(labels).astype(bool)) == 1
    assert pages_of(list(range(10))) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_rating_tilt_moves_the_mean_rating_to_the_target() -> None:
    logps = np.log(np.random.default_rng(1).dirichlet(np.ones(5), 30))
    assert tilted([0.0] * 5, 0.5).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="5 rating"):
        tilted([0.0] * 4, 0.5)
    for mean in (2.2, 3.19, 4.4):
        t = tilt_to_mean(logps, mean)
        got = np.mean([expected_value(tilted(lp, t), range(1, 6)) for lp in logps])
        assert got == pytest.approx(mean, abs=1e-4)
    assert tilt_to_mean(logps, 2.0) < tilt_to_mean(logps, 4.0)
    assert tilt_to_mean([], 3.0) == 0.0


def test_rating_sharpness_spreads_a_timid_raters_expected_ratings() -> None:
    """Humans rate the mode of a sharp distribution; the model's log-probs are the same ones
    at a fifth of their size (timid): the fitted sharpness undoes most of it, matches the
    mean, and errs less than the tilt alone."""
    rng = np.random.default_rng(2)
    sharp = rng.normal(0.0, 3.0, (400, 5))
    humans = sharp.argmax(axis=1) + 1.0
    timid = sharp / 5
    assert tilted([0.0, -1.0, -2.0, -3.0, -4.0], 0.5, 2.0).tolist() == [-1.0, -2.5, -4.0,
                                                                          -5.5, -7.0]
    assert tilted(np.zeros((2, 5)), 1.0, 2.0).shape == (2, 5)  # rows of five at once
    tilt, sharpness = fit_rating_scale(timid, humans)
    assert sharpness > 2.5
    expected = [expected_value(tilted(lp, tilt, sharpness), range(1, 6)) for lp in timid]
    assert np.mean(expected) == pytest.approx(humans.mean(), abs=1e-3)
    alone = rating_rmse(timid, humans, tilt_to_mean(timid, humans.mean()))
    fitted = rating_rmse(timid, humans, tilt, sharpness)
    assert fitted == pytest.approx(np.sqrt(np.mean((np.array(expected) - humans) ** 2)),
                                   abs=1e-4)
    assert fitted < alone - 0.1
    assert np.std(expected) > 2 * np.std([expected_value(tilted(lp, tilt_to_mean(
        timid, humans.mean())), range(1, 6)) for lp in timid])
    assert fit_rating_scale([], []) == (0.0, 1.0)


def test_sharpness_keeps_the_greedy_rating_and_sharpens_its_probabilities(
        small_world: World, scorer: Scorer) -> None:
    inputs = page_inputs(small_world)
    plain = decide(scorer, inputs, calibration=Calibration(watch_offset=100.0))
    sharp = decide(scorer, inputs, calibration=Calibration(watch_offset=100.0,
                                                           rating_sharpness=60.0))
    for p, s in zip(plain, sharp, strict=True):
        assert p.action.watched == s.action.watched
        assert all(max(s.rating_probs[k]) > max(p.rating_probs[k]) for k in p.rating_probs)
        assert all(max(v) > 0.99 for v in s.rating_probs.values())


def test_sampled_offsets_match_the_expected_sampled_rate() -> None:
    """Sampling takes a slot with probability sigmoid(score / T): the greedy (quantile) offset
    would overshoot a low ratio when many scores sit near 0, the sampled offset does not."""
    scores = np.random.default_rng(0).normal(-0.5, 1.0, 400)
    for rate, temp in ((0.27, 1.0), (0.5, 0.5), (0.05, 2.0)):
        off = sampled_rate_offset(scores, rate, temp)
        assert np.mean(1 / (1 + np.exp(-(scores + off) / temp))) == pytest.approx(rate, abs=1e-4)
    greedy = rate_offset(scores, 0.27)
    assert np.mean(1 / (1 + np.exp(-(scores + greedy)))) > 0.27 + 0.05
    assert sampled_rate_offset(np.array([]), 0.3, 1.0) == 0.0
    cal = Calibration(watch_offset=1.0, then_offset=2.0, sampled_watch_offset=-1.0,
                      sampled_then_offset=-2.0)
    assert cal.offsets(0.0) == (1.0, 2.0) and cal.offsets(1.0) == (-1.0, -2.0)
    assert Calibration(watch_offset=1.0, then_offset=2.0).offsets(1.0) == (1.0, 2.0)
    # Between greedy and the fitted temperature the offsets are interpolated; above it they
    # stay at the sampled ones and a warning says the rates are no longer calibrated.
    assert cal.offsets(0.25) == pytest.approx((0.5, 1.0))
    with pytest.warns(UserWarning, match="calibrated at temperature 1"):
        assert cal.offsets(1.5) == (-1.0, -2.0)
    # The last allowed page has its own exit offsets; the watch offset is the same there.
    cal.last_then_offset, cal.sampled_last_then_offset = 5.0, 3.0
    assert cal.offsets(0.0, last=True) == (1.0, 5.0) and cal.offsets(1.0, last=True) == (-1.0, 3.0)
    assert cal.offsets(0.5, last=True) == pytest.approx((0.0, 4.0))
    assert cal.offsets(0.0) == (1.0, 2.0)
    cal.sampled_last_then_offset = None  # none fitted for sampling: the greedy one
    assert cal.offsets(1.0, last=True) == (-1.0, 5.0)


def test_calibrate_on_no_pages_fits_nothing(scorer: Scorer) -> None:
    """Trained with ``--calibration-pages 0``: the offsets stay at even odds and the manifest
    says they were fitted on no pages, in strict JSON (an empty mean would write NaN)."""
    fitted = calibrate(scorer, [], world_model=False)
    assert fitted["fitted_on"] == {"pages": 0, "world_model": False}
    assert Calibration.model_validate(fitted) == Calibration()
    json.dumps(fitted, allow_nan=False)


def test_calibrate_restores_the_humans_rates(small_world: World, scorer: Scorer) -> None:
    """Fitted on validation pages, the offsets make the greedy agent watch and exit at the
    humans' rates on those pages (up to one slot / one page of quantile rounding)."""
    trajs = small_world.trajectories("valid", users=sorted(small_world.histories)[:6],
                                     progress=False)
    trs = transitions(trajs, small_world, full_history=True)[:12]
    fitted = calibrate(scorer, trs, world_model=False)
    cal = Calibration.model_validate(fitted)
    assert fitted["fitted_on"]["pages"] == len(trs) and cal.list_offset is None
    # What the offsets were fitted on is fingerprinted: the same pages, the same digest.
    pages = [[t.user, t.page, list(t.items)] for t in trs]
    assert fitted["fitted_on"]["pages_digest"] == digest(pages) != digest(pages[1:])
    assert digest(pages) == digest([[np.int64(u), p, [np.int64(i) for i in it]]
                                    for u, p, it in pages])
    slots = sum(len(t.items) for t in trs)
    decisions = decide(scorer, [t.decision_input() for t in trs], calibration=cal)
    sim_watch = sum(len(d.action.watched) for d in decisions) / slots
    assert sim_watch == pytest.approx(fitted["fitted_on"]["human_watch_ratio"],
                                      abs=1 / slots + 1e-9)
    # then_offset is fitted on exit scores that follow the calibrated watch choices, as here,
    # on the pages before the page limit; last_then_offset on the last allowed pages, where
    # exit says the session ends there rather than being cut by the limit.
    open_pages = [d for d, t in zip(decisions, trs, strict=True) if t.page < t.max_pages]
    last_pages = [d for d, t in zip(decisions, trs, strict=True) if t.page == t.max_pages]
    assert 0 < fitted["fitted_on"]["exit_pages"] == len(open_pages) < len(trs)
    assert fitted["fitted_on"]["last_pages"] == len(last_pages) > 0
    sim_exit = np.mean([d.action.then == "exit" for d in open_pages])
    assert sim_exit == pytest.approx(fitted["fitted_on"]["human_exit_share"],
                                     abs=1 / len(open_pages) + 1e-9)
    human_last = np.mean([t.then == "exit" for t in trs if t.page == t.max_pages])
    assert fitted["fitted_on"]["human_last_exit_share"] == pytest.approx(human_last, abs=1e-4)
    assert np.mean([d.action.then == "exit" for d in last_pages]) == pytest.approx(
        human_last, abs=1 / len(last_pages) + 1e-9)
    # The rating tilt makes the expected ratings after the humans' choices average theirs,
    # at the sharpness that errs least from them.
    rated = [t for t in trs if t.ratings]
    expected = rating_expectations(scorer, [t.decision_input() for t in rated],
                                   [t.human_action() for t in rated], calibration=cal)
    rmse = fitted["fitted_on"]["rating_rmse"]
    assert rmse["tilt_and_sharpness"] <= rmse["tilt"]
    assert rmse["tilt_and_sharpness"] == pytest.approx(np.sqrt(np.mean(
        [(e[s] - t.ratings[s]) ** 2 for e, t in zip(expected, rated, strict=True)
         for s in t.ratings])), abs=2e-3)
    human_mean = np.mean([r for t in rated for r in t.ratings.values()])
    assert fitted["fitted_on"]["human_mean_rating"] == pytest.approx(human_mean, abs=1e-4)
    assert np.mean([v for e in expected for v in e.values()]) == pytest.approx(human_mean,
                                                                                abs=1e-3)
    assert cal.rating_tilt != 0.0  # a random model does not rate at the humans' mean by chance
    # A sampling agent uses the sampled offsets: its expected watch ratio is the humans'.
    sampled = decide(scorer, [t.decision_input() for t in trs], calibration=cal, temperature=1.0)
    p_watch = [1 / (1 + np.exp(-v)) for d in sampled for v in d.watch_scores.values()]
    assert np.mean(p_watch) == pytest.approx(fitted["fitted_on"]["human_watch_ratio"], abs=1e-3)
    for d, g in zip(sampled, decisions, strict=True):
        for slot, v in d.watch_scores.items():
            assert v - g.watch_scores[slot] == pytest.approx(
                cal.sampled_watch_offset - cal.watch_offset, abs=1e-5)


def test_last_allowed_pages_take_the_last_page_offset(small_world: World, scorer: Scorer) -> None:
    """Held-out pages, browsing sessions and the graph (tests/test_graph.py) mark a visit's last
    allowed page, so next/exit there takes ``last_then_offset``."""
    from agents.browse import browse

    trajs = small_world.trajectories("valid", users=sorted(small_world.histories)[:6],
                                     progress=False)
    trs = transitions(trajs, small_world, full_history=True)
    assert {t.decision_input().last for t in trs} == {True, False}
    assert all(t.decision_input().last == t.at_limit for t in trs)
    users = sorted(small_world.histories)[:3]
    items = [i for i in small_world.perceiver.items if i not in small_world.histories[users[0]]]
    sessions = [(u, pages_of(items[4 * k: 4 * k + 12])) for k, u in enumerate(users)]
    cal = Calibration(then_offset=-100.0, last_then_offset=100.0)
    runs = browse(scorer, small_world.perceiver, small_world.personas, small_world.histories,
                  sessions, world_model=False, calibration=cal)
    assert [[d.action.then for d in run] for run in runs] == [["next", "next", "exit"]] * 3


def test_session_offsets_fit_the_visits_lengths(small_world: World, scorer: Scorer) -> None:
    """Simulated sessions on recommenders' pages last as long as validation visits and end by
    exit on the last page as often. The closed form rests on a session's pages up to its exit
    not depending on the exit answers: a real browse with the fitted offsets is, page by page,
    the no-exit browse, and its exit scores are the no-exit ones shifted by the offsets."""
    from agents.browse import browse
    from simulator.recommenders import SELECTION
    from training.pipeline import validation_sessions
    from training.session_offsets import session_offsets

    valid = small_world.trajectories("valid", users=sorted(small_world.histories)[:8],
                                     progress=False)
    sessions = validation_sessions(small_world, valid, users=3, seed=0)
    assert len(sessions) == 3 * len(SELECTION) and len({u for u, _ in sessions}) == 3
    for user, pages in sessions:  # first 5 pages of 4, the person's train items masked
        assert [len(p) for p in pages] == [4] * 5
        assert not {i for p in pages for i in p} & set(small_world.histories[user])
    cal = Calibration(sampled_watch_offset=0.5, last_then_offset=0.0,
                      sampled_last_then_offset=-1.0)
    kw = {"perceiver": small_world.perceiver, "personas": small_world.personas,
          "histories": small_world.histories}
    visits = [(1, True), (2, True), (2, True), (3, True), (5, False), (5, True), (5, False)]
    open_offset, last_offset, report = session_offsets(scorer, cal, sessions, visits,
                                                       world_model=False, seed=3, **kw)
    assert report["humans"] == {"pages": 3.286, "exit_share": round(5 / 7, 4),
                                "last_page_exit_share": round(1 / 3, 4)}
    fitted = report["session_fitted"]
    assert fitted["length_w1"] <= report["page_fitted"]["length_w1"] + 1e-3
    assert abs(fitted["pages"] - 3.286) < abs(report["page_fitted"]["pages"] - 3.286) + 0.05
    never = cal.model_copy(update={"sampled_then_offset": -60.0,
                                   "sampled_last_then_offset": -60.0})
    full = browse(scorer, sessions=sessions, world_model=False, calibration=never,
                  temperature=1.0, seed=3, **kw)
    # the last page's offset: of the sessions that reach it, the humans' share exits there
    raw = np.asarray([[d.exit_score + 60.0 for d in run] for run in full])
    reach = np.prod(1 / (1 + np.exp(raw[:, :-1] + open_offset)), axis=1)
    assert np.sum(reach / (1 + np.exp(-(raw[:, -1] + last_offset)))) / reach.sum() == \
        pytest.approx(1 / 3, abs=1e-6)
    fitted_cal = cal.model_copy(update={"sampled_then_offset": open_offset,
                                        "sampled_last_then_offset": last_offset})
    real = browse(scorer, sessions=sessions, world_model=False, calibration=fitted_cal,
                  temperature=1.0, seed=3, **kw)
    # each page draws from its (seed, user, page) generator: a user's sessions share draws
    assert {len(r) for r in real} - {5}  # some exited before the page limit
    for f, r in zip(full, real, strict=True):
        assert [d.action for d in r[:-1]] == [d.action for d in f[:len(r) - 1]]
        assert r[-1].action.watched.keys() == f[len(r) - 1].action.watched.keys()
        for k, (a, b) in enumerate(zip(r, f, strict=False)):
            assert a.watch_scores == pytest.approx(b.watch_scores, abs=1e-4)
            shift = last_offset if k == 4 else open_offset
            assert a.exit_score - b.exit_score == pytest.approx(shift + 60.0, abs=1e-4)
