"""The sampled exit offsets refitted on validation users' sessions on recommenders' pages.

Fitted on the humans' own pages, the exit offsets carry those pages' exit shares; on a
recommender's top-20 the agent watches more, and its exit log-odds rise with what it has
watched, so nearly every session would end by exit. ``training.calibrate`` refits them here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.browse import browse, sampled_rate_offset
from agents.decide import Calibration
from agents.perception import Perceiver
from simulator.env import MAX_PAGES


def _length_cdf(lengths: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """P(pages <= k) for k = 1 .. MAX_PAGES - 1 of a distribution over session lengths, given as
    lengths (humans) or as each session's probability of each length (rows, agents)."""
    if weights is None:
        return np.asarray([np.mean(lengths <= k) for k in range(1, MAX_PAGES)])
    return np.cumsum(weights.mean(axis=0))[:MAX_PAGES - 1]


def session_offsets(scorer, cal: Calibration, sessions: Sequence[tuple[int, list[list[int]]]],
                    visits: Sequence[tuple[int, bool]], *, perceiver: Perceiver,
                    personas: Mapping[int, str], histories: Mapping[int, Mapping[int, float]],
                    world_model: bool, seed: int = 0) -> tuple[float, float | None, dict]:
    """Sampled exit offsets (before the page limit, on the last allowed page) that make the
    agent's sessions on recommenders' pages as long as the humans' validation ``visits``
    (pages, ended by exit), and end by exit on the last page as often.

    Fitted on the humans' own pages, the offsets carry those pages' exit shares; on a
    recommender's top-20 the agent watches about twice as much, and its exit log-odds rise with
    what it has watched, so nearly every session ended by exit. Each session is browsed once,
    sampling as ``simulate`` does and never taking exit: a session's pages, watches and ratings
    up to a page do not depend on the exit answers before it (each page draws from its own
    (seed, user, page) generator), so every page's exit score is read once and any offset's
    session lengths follow in closed form. The open-page offset minimises the Wasserstein
    distance between the agents' and the humans' session lengths; the last page's offset then
    makes the share of sessions reaching it that exit there the humans'. Without a last-page
    offset in ``cal`` one offset serves every page."""
    temp = cal.sampled_temperature
    never = -60.0  # sigmoid(-60) ~ 1e-26: the draw is taken, the answer is next
    browsing = cal.model_copy(update={"sampled_then_offset": never,
                                      "sampled_last_then_offset": never})
    with tqdm(total=sum(len(p) for _, p in sessions), desc="calibrate sessions",
              unit="page") as bar:
        runs = browse(scorer, perceiver, personas, histories, sessions,
                      world_model=world_model, calibration=browsing, exits=True,
                      temperature=temp, seed=seed, progress=bar.update)
    raw = [np.asarray([d.exit_score - never for d in run], dtype=float) for run in runs if run]
    full = [r for r in raw if len(r) == MAX_PAGES]  # sessions that can reach the page limit
    lengths = np.asarray([n for n, _ in visits])
    human_cdf = _length_cdf(lengths)
    at_limit = [ended for n, ended in visits if n == MAX_PAGES]
    _, open_before, last_before = cal.rule(temp)
    shared = cal.last_then_offset is None

    def go_on(r: np.ndarray, offset: float, last: float) -> np.ndarray:
        """P(next) after each page of one session."""
        return 1 / (1 + np.exp(np.append(r[:-1] + offset, r[-1] + last) / temp))

    def length_probs(offset: float, last: float) -> np.ndarray:
        rows = np.zeros((len(raw), MAX_PAGES))
        for k, r in enumerate(raw):
            reach = np.concatenate([[1.0], np.cumprod(go_on(r, offset, last)[:-1])])
            rows[k, :len(r)] = reach - np.append(reach[1:], 0.0)
        return rows

    def w1(probs: np.ndarray) -> float:
        return float(np.abs(_length_cdf(lengths, probs) - human_cdf).sum())

    def exit_share(offset: float, last: float) -> float:
        ends = [np.prod(go_on(r, offset, last)) for r in raw]  # P(the limit ends it)
        return 1 - float(np.mean(ends))

    grid = np.arange(-15.0, 15.0, 0.01)
    fits = [w1(length_probs(g, g if shared else last_before)) for g in grid]
    offset = round(float(grid[int(np.argmin(fits))]), 2)
    last = None
    reach = np.asarray([np.prod(go_on(r, offset, 0.0)[:-1]) for r in full])
    if not shared and at_limit and reach.sum() > 0:
        # of the sessions reaching the last page, the humans' share exits there
        last = sampled_rate_offset(np.asarray([r[-1] for r in full]), float(np.mean(at_limit)),
                                   temp, weights=reach)
    after_last = offset if shared else last if last is not None else last_before

    def summary(o: float, lo_: float) -> dict:
        probs = length_probs(o, lo_)
        return {"pages": round(float((probs * np.arange(1, MAX_PAGES + 1)).sum(1).mean()), 3),
                "length_w1": round(w1(probs), 4), "exit_share": round(exit_share(o, lo_), 4)}

    return offset, last, {
        "sessions": len(raw), "visits": len(visits),
        "humans": {"pages": round(float(lengths.mean()), 3) if len(lengths) else None,
                   "exit_share": round(float(np.mean([e for _, e in visits])), 4)
                   if visits else None,
                   "last_page_exit_share": round(float(np.mean(at_limit)), 4)
                   if at_limit else None},
        "page_fitted": {"sampled_then_offset": open_before,
                        "sampled_last_then_offset": last_before,
                        **summary(open_before, last_before)},
        "session_fitted": summary(offset, after_last)}


def refit_on_sessions(scorer, cal: Calibration, sessions: Sequence[tuple[int, list[list[int]]]],
                      visits: Sequence[tuple[int, bool]], **kw: Any) -> dict:
    """``cal``'s sampled exit offsets refitted on sessions (``session_offsets``, whose keyword
    arguments ``kw`` are); the last page's is kept where none could be fitted. Returns what
    they were fitted on."""
    open_offset, last_offset, report = session_offsets(scorer, cal, sessions, visits, **kw)
    cal.sampled_then_offset = open_offset
    if last_offset is not None:
        cal.sampled_last_then_offset = last_offset
    return report
