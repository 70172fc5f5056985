"""Browsing fixed pages in lockstep: Agent4Rec's 1:m lists and sessions on static rankings.

A list or a static recommender's ranking is shown in pages of 4 as one session. All sessions
advance page by page together, so page p of every session is decided in one batched call
(``agents.decide``); what the agent watched on earlier pages is its session and evidence on
later ones, exactly as when browsing. With ``exits`` a session ends when the agent exits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from agents.decide import Calibration, decide, tilted
from agents.perception import Perceiver
from agents.policy import Decision, DecisionInput
from agents.text import page_cues, page_prompt, page_rating_cues
from simulator.env import PAGE_SIZE


def pages_of(items: Sequence[int], size: int = PAGE_SIZE) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def browse(scorer, perceiver: Perceiver, personas: Mapping[int, str],
           histories: Mapping[int, Mapping[int, float]],
           sessions: Sequence[tuple[int, Sequence[Sequence[int]]]], *, world_model: bool = True,
           evidence: bool = True, calibration: Calibration | None = None,
           watch_offset: float | None = None, exits: bool = True, temperature: float = 0.0,
           seed: int = 0, chunk: int = 64,
           progress: Callable[[int], None] | None = None) -> list[list[Decision]]:
    """Every (user, pages) session's decisions, page by page, until exit or its last page.

    ``chunk`` sessions are decided per call. Each call keeps its pages' prompts cached until it
    returns, and a batched forward takes at most 64 rows anyway: 100 test lists by the
    policy-only agent took 217 s and peaked at 9.9 GB with 64, 243 s and 12.2 GB with 256
    (``bench/bench_list_memory.py``)."""
    out: list[list[Decision]] = []
    for start in range(0, len(sessions), chunk):
        part = sessions[start:start + chunk]
        done: list[list[Decision]] = [[] for _ in part]
        watched: list[list[tuple[int, int]]] = [[] for _ in part]
        live = [True] * len(part)
        for p in range(1, max(len(pages) for _, pages in part) + 1):
            inputs, idx = [], []
            for k, (user, pages) in enumerate(part):
                if not live[k] or p > len(pages):
                    continue
                views = perceiver.page(pages[p - 1], {**histories.get(user, {}),
                                                      **dict(watched[k])})
                titles = [(perceiver.items[i].title, r) for i, r in watched[k]]
                inputs.append(DecisionInput(
                    user=user, page=p, items=list(pages[p - 1]), persona_text=personas[user],
                    page_text=page_prompt(p, len(pages), views, titles, evidence=evidence),
                    cues=page_cues(views, evidence),
                    rating_cues=page_rating_cues(views, evidence), seed=seed,
                    last=p == len(pages),
                    history=len(histories.get(user, {}))))
                idx.append(k)
            if not inputs:
                break
            # Without exits, a page no session goes on from needs only its watch/skip lines.
            last = all(p == len(part[k][1]) for k in idx)
            decisions = decide(scorer, inputs, world_model=world_model, temperature=temperature,
                               calibration=calibration, watch_offset=watch_offset,
                               then=exits or not last, exits=exits)
            for k, d in zip(idx, decisions, strict=True):
                done[k].append(d)
                watched[k] += list(d.action.watched.items())
                if exits and d.action.then == "exit":
                    live[k] = False
            if progress is not None:
                progress(len(inputs))
        out += done
    return out


# How many times a list is shown to an agent (``list_scores``): once, or also reversed.
LIST_VIEWS = (1, 2)


def list_scores(scorer, perceiver: Perceiver, personas: Mapping[int, str],
                histories: Mapping[int, Mapping[int, float]],
                lists: Sequence[tuple[int, Sequence[int]]], *, world_model: bool = True,
                evidence: bool = True, offset: float = 0.0,
                calibration: Calibration | None = None, views: int = 1,
                progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Calibrated watch log-odds of every item of every (user, items) list. A list's later
    pages show what was watched and rated on its earlier ones, rated as the adapter rates
    (``calibration``'s rating format, tilt and sharpness). Only those of its fields are read:
    ``offset`` replaces the watch offsets and their history term, and a list never exits.

    ``views`` 2 shows each list a second time in reverse order and averages each item's two
    log-odds: an item's score then rests on two page contexts (other neighbours, another
    history of the list's earlier pages) instead of one, at twice the cost."""
    if views not in LIST_VIEWS:
        raise ValueError(f"views must be one of {LIST_VIEWS}, not {views!r}")
    # a list's two views side by side, so one scorer call holds the person's prompt for both
    shown = [(u, pages_of(list(items)[::-1] if view else items))
             for u, items in lists for view in range(views)]
    runs = browse(scorer, perceiver, personas, histories, shown, world_model=world_model,
                  evidence=evidence, calibration=calibration, watch_offset=offset,
                  exits=False, progress=progress)
    scores = [np.asarray([d.watch_scores[s] for d in run for s in sorted(d.watch_scores)])
              for run in runs]
    if views == 1:
        return scores
    return [(a + b[::-1]) / 2 for a, b in zip(scores[::2], scores[1::2], strict=True)]


def accuracy_cut(scores: np.ndarray, labels: np.ndarray, strict: bool = False) -> float:
    """The cut maximising accuracy of ``score >= cut`` (``score > cut`` when ``strict``),
    searched over midpoints between sorted distinct scores and beyond both ends."""
    scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
    s = np.unique(scores)
    cuts = np.concatenate([[s[0] - 1], (s[:-1] + s[1:]) / 2, [s[-1] + 1]])
    acc = [np.mean(((scores > c) if strict else (scores >= c)) == labels) for c in cuts]
    return float(cuts[int(np.argmax(acc))])


def accuracy_offset(scores: Sequence[np.ndarray], labels: Sequence[Sequence[int]]) -> float:
    """The offset that makes ``score + offset > 0`` most accurate (as the baselines' cut)."""
    return -accuracy_cut(np.concatenate(scores),
                         np.concatenate([np.asarray(x) for x in labels]), strict=True)


def rate_offset(scores: np.ndarray, rate: float) -> float:
    """The offset that makes a share ``rate`` of ``scores + offset`` positive."""
    if len(scores) == 0:
        return 0.0
    return float(-np.quantile(np.asarray(scores), 1 - min(max(rate, 0.0), 1.0)))


def _expected_ratings(lp: np.ndarray, tilt: float, sharpness: float = 1.0) -> np.ndarray:
    """``expected_value`` of each row of five log-probabilities under ``tilted``, at once."""
    z = tilted(lp, tilt, sharpness)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ np.arange(1, 6, dtype=float)


def tilt_to_mean(logps: Sequence[Sequence[float]], mean: float, sharpness: float = 1.0
                 ) -> float:
    """The rating tilt (``agents.decide.tilted``) whose expected ratings of the rated items
    (five log-probabilities each) average ``mean``; the expectation rises with the tilt."""
    from scipy.optimize import brentq

    if not len(logps):
        return 0.0
    lp = np.asarray(logps, dtype=float)
    mean = min(max(mean, 1.01), 4.99)  # a tilt reaches any mean strictly between 1 and 5
    return float(brentq(lambda t: float(_expected_ratings(lp, t, sharpness).mean()) - mean,
                        -30.0, 30.0, xtol=1e-6))


def rating_rmse(logps: Sequence[Sequence[float]], ratings: Sequence[float], tilt: float,
                sharpness: float = 1.0) -> float:
    """RMSE of the expected ratings under ``tilt`` and ``sharpness`` against ``ratings``."""
    e = _expected_ratings(np.asarray(logps, dtype=float), tilt, sharpness)
    return round(float(np.sqrt(np.mean((e - np.asarray(ratings, dtype=float)) ** 2))), 4)


def fit_rating_scale(logps: Sequence[Sequence[float]], ratings: Sequence[float],
                     bounds: tuple[float, float] = (0.25, 8.0)) -> tuple[float, float]:
    """(tilt, sharpness) for the rated items' five log-probabilities each: at every sharpness
    the tilt meets the humans' mean (``tilt_to_mean``), and the sharpness is the one whose
    expected ratings have the least squared error from the humans' ``ratings`` (searched on a
    log scale within ``bounds``). A small model's expected ratings huddle round their mean
    (sd 0.3-0.4 where the humans' is 1.1); scaling its log-probabilities spreads them, each
    item's most likely rating staying where it was."""
    from scipy.optimize import minimize_scalar

    if not len(logps):
        return 0.0, 1.0
    lp, y = np.asarray(logps, dtype=float), np.asarray(ratings, dtype=float)
    mean = float(y.mean())

    def error(log_s: float) -> float:
        s = float(np.exp(log_s))
        return float(np.mean((_expected_ratings(lp, tilt_to_mean(lp, mean, s), s) - y) ** 2))
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    best = float(np.exp(minimize_scalar(error, bounds=(lo, hi), method="bounded",
                                        options={"xatol": 1e-3}).x))
    return tilt_to_mean(lp, mean, best), best


def sampled_rate_offset(scores: np.ndarray, rate: float, temperature: float,
                        weights: np.ndarray | None = None) -> float:
    """The offset whose sampled choices, taken with probability sigmoid((score + offset) / T),
    take a share ``rate`` on average, each score counted with its ``weights`` (default 1)
    (``rate_offset`` is its greedy counterpart)."""
    from scipy.optimize import brentq
    from scipy.special import expit

    s = np.asarray(scores, dtype=float)
    if len(s) == 0:
        return 0.0
    rate = min(max(rate, 1e-6), 1 - 1e-6)
    margin = 40.0 * temperature  # expit(+-40) is 1 or 0 to double precision
    return float(brentq(lambda o: np.average(expit((s + o) / temperature), weights=weights)
                        - rate, -s.max() - margin, -s.min() + margin, xtol=1e-6))
