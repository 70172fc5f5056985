"""The one decision step: page prefix -> world-model expectations -> watch/skip, next/exit,
ratings, for any number of pages at once.

Every caller (the graph's decide node, evaluation's lists and held-out pages, the
counterfactual stage) goes through :func:`decide`, so a decision is made in exactly one place.
Pages of many agents are scored together: one batched call for the world model's expectations,
one for every slot's watch/skip line, one for next/exit, one for the ratings after it.

Semantics (documented because they differ from sampling line after line): each slot's watch/skip
line is scored after the page and that slot's cue line (``DecisionInput.cue``: the item's personal
numbers and expected rating, restated so the answer sits next to its evidence), not after the
choices on earlier slots, so the slots of a page are decided independently given the page;
next/exit is scored after the chosen slots; each watched slot's rating after the chosen slots
and next/exit, independently of the other ratings (for an adapter trained so,
``Calibration.rating_cue``, after that slot's rating cue line: the item's mean rating and the
person's ratings of its closest items). Training renders one example per slot and one for
next/exit + ratings to match, or with the rating cue one for next/exit and one per rating
(``agents.transition.Transition.policy_examples``).
Calibrated log-odds offsets (``Calibration``) shift watch/skip and next/exit; they are fitted on
validation when a checkpoint is trained and stored in its manifest.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from agents import prompts, text
from agents.policy import (
    Decision,
    DecisionInput,
    OptionScorer,
    decision_rng,
    expected_value,
    score_many,
)
from agents.world_model import expected_ratings_many, wm_cues
from simulator.env import PageAction


class Calibration(BaseModel):
    """How a checkpoint's answers are read: log-odds offsets fitted on validation, and the
    rating format it was trained on; saved in its manifest."""

    watch_offset: float = Field(0.0, description="added to log P(watch) - log P(skip) when "
                                "browsing: the simulated watch ratio matches the humans'")
    then_offset: float = Field(0.0, description="added to log P(exit) - log P(next): simulated "
                               "exits match the humans'")
    list_offset: float | None = Field(None, description="watch/skip offset for 1:m lists, "
                                      "tuned like the baselines' threshold on validation 1:1 "
                                      "lists; None = watch_offset")
    sampled_watch_offset: float | None = Field(
        None, description="watch offset when choices are sampled (temperature > 0): a score "
        "near 0 is taken half the time, so matching the humans' ratio needs another offset than "
        "the greedy one; None = watch_offset")
    sampled_then_offset: float | None = Field(
        None, description="next/exit offset when sampled, before the page limit: fitted on "
        "validation users' sessions on recommenders' pages, so they last as long as validation "
        "visits (training.session_offsets.session_offsets), or on pages as then_offset is; None = "
        "then_offset")
    last_then_offset: float | None = Field(
        None, description="next/exit offset on a visit's last allowed page, where both end the "
        "visit and only say whether the session ends there (exit) or would go on (page limit); "
        "fitted on validation pages at the limit: None = then_offset")
    sampled_last_then_offset: float | None = Field(
        None, description="last_then_offset when sampled: fitted with sampled_then_offset on "
        "sessions, so as many of those reaching the last page exit there as validation visits "
        "do, or on pages; None = last_then_offset")
    sampled_temperature: float = Field(1.0, gt=0, description="temperature the sampled offsets "
                                       "were fitted at")
    watch_history_slope: float = Field(
        0.0, description="log-odds added to the rate-matching watch offsets (held-out pages, "
        "sessions; not the lists' accuracy cut) per unit of log(1 + ratings) above "
        "history_center: fitted so that short and long histories watch as much as their humans "
        "(training.history_offset.history_slope)")
    history_center: float = Field(0.0, description="the calibration pages' mean log(1 + "
                                  "ratings), where the watch offsets hold as fitted")
    rating_tilt: float = Field(0.0, description="added to each rating's log-probability "
                               "times (rating - 3): fitted so that the expected ratings of the "
                               "validation pages' watched items average the humans' "
                               "(training.calibrate); 0 = as the model rates")
    rating_sharpness: float = Field(1.0, gt=0, description="each rating's log-probability is "
                                    "multiplied by it before the tilt (> 1 sharpens): fitted "
                                    "with the tilt so that the expected ratings of the "
                                    "validation pages' watched items err least from the humans' "
                                    "(training.calibrate); 1 = as the model rates")
    rating_cue: bool = Field(False, description="the adapter was trained with each rating "
                             "line after its own cue line (agents.text.rating_cue) and is "
                             "scored so; adapters trained before rate after the choices alone")
    wm_format: Literal["titles", "genres"] = Field(
        "titles", description="the format its world model writes the next page in (the "
        "training config's wm_format, not fitted): its next states are decoded in it "
        "(agents.world_model.generate_next_states)")
    wm_rating_cue: bool = Field(False, description="its world model was trained to rate each "
                                "slot after the slot's rating cue line (the training config's "
                                "wm_rating_cue, not fitted): its expected ratings are scored so")

    def history_shift(self, history: int | None) -> float:
        """The watch offset's change for a person with ``history`` ratings."""
        if history is None or not self.watch_history_slope:
            return 0.0
        return self.watch_history_slope * (math.log1p(history) - self.history_center)

    def offsets(self, temperature: float, last: bool = False) -> tuple[float, float]:
        """(watch, exit) offsets for a decision rule: greedy (temperature 0) or sampled; ``last``:
        on a visit's last allowed page."""
        watch, then_open, then_last = self.rule(temperature)
        return watch, then_last if last else then_open

    def rule(self, temperature: float) -> tuple[float, float, float]:
        """(watch, exit on an open page, exit on a visit's last allowed page) offsets at
        ``temperature``: a page's every decision in one call, so one warning at most.

        The rate-matching offset moves continuously from the greedy one at T = 0 to the sampled
        one at ``sampled_temperature``; in between it is interpolated linearly in T (a first-
        order approximation: refit with ``training.calibrate`` for exact rates). Above the
        fitted temperature the sampled offsets are kept, with a warning that rates will drift.
        """
        sampled_then = (self.then_offset if self.sampled_then_offset is None
                        else self.sampled_then_offset)
        greedy = (self.watch_offset, self.then_offset, self.then_offset)
        sampled = (
            self.watch_offset if self.sampled_watch_offset is None else self.sampled_watch_offset,
            sampled_then, sampled_then)
        if self.last_then_offset is not None:
            greedy = (*greedy[:2], self.last_then_offset)
            sampled = (*sampled[:2], self.last_then_offset if self.sampled_last_then_offset
                       is None else self.sampled_last_then_offset)
        if temperature <= 0:
            return greedy
        if temperature > self.sampled_temperature:
            warnings.warn(f"offsets were calibrated at temperature {self.sampled_temperature:g}"
                          f"; at {temperature:g} watch and exit rates are not calibrated",
                          stacklevel=3)
            return sampled
        w = temperature / self.sampled_temperature
        g0, g1, g2 = ((1 - w) * g + w * s for g, s in zip(greedy, sampled, strict=True))
        return g0, g1, g2

    @classmethod
    def of_checkpoint(cls, path: str | Path | None) -> Calibration:
        """The calibration in ``path/manifest.json``; none (all zero) when absent. The world
        model's format comes from the training config beside it."""
        if path is None:
            return cls()
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file():
            return cls()
        data = json.loads(manifest.read_text())
        config = data.get("config") or {}
        return cls.model_validate({**(data.get("calibration") or {}),
                                   "wm_format": config.get("wm_format") or "titles",
                                   "wm_rating_cue": bool(config.get("wm_rating_cue"))})


def _prefix(inp: DecisionInput) -> str:
    return prompts.prefix(inp.persona_text, inp.page_text)


def with_predictions(scorer: OptionScorer, inputs: Sequence[DecisionInput],
                     wm_rating_cue: bool = False) -> list[DecisionInput]:
    """``inputs`` with the world model's expected rating per slot in their context, as the
    full agent decides (and as training's rating refit and the rating bench read them);
    ``wm_rating_cue``: each slot rated after its rating cue (``Calibration.wm_rating_cue``)."""
    preds = expected_ratings_many(scorer, [(_prefix(i), len(i.items)) for i in inputs],
                                  cues=wm_cues(inputs, wm_rating_cue))
    return [i.model_copy(update={"predictions": p}) for i, p in zip(inputs, preds, strict=True)]


def _pick(logps: Sequence[float], temperature: float, rng: np.random.Generator) -> tuple[int,
                                                                                         list]:
    lp = np.asarray(logps, dtype=float)
    probs = np.exp(lp - lp.max())
    probs /= probs.sum()
    if temperature <= 0:
        return int(np.argmax(lp)), probs.round(4).tolist()
    tempered = np.exp((lp - lp.max()) / temperature)
    return int(rng.choice(len(lp), p=tempered / tempered.sum())), probs.round(4).tolist()


def tilted(logps: Sequence[float] | np.ndarray, tilt: float, sharpness: float = 1.0
           ) -> np.ndarray:
    """A rating's five log-probabilities with ``Calibration.rating_tilt`` and
    ``rating_sharpness``: an exponential tilt moves every item's rating the same way, so the
    mean can follow the humans' (a later period's items are rated lower than the train period
    taught: 3.34 on the evaluated users' validation pages, 3.60 in train); a sharpness above 1
    undoes a timid model's pull of every expected rating towards its mean. ``logps``: five
    values, or rows of five (the last axis)."""
    lp = np.asarray(logps, dtype=float)
    if lp.shape[-1] != len(text.RATINGS):
        raise ValueError(f"expected {len(text.RATINGS)} rating log-probabilities, got "
                         f"{lp.shape[-1]}")
    return sharpness * lp + tilt * (np.arange(1, len(text.RATINGS) + 1) - 3)


def _rating_requests(inp: DecisionInput, context: str, slots: Sequence[int], cue: bool
                     ) -> list[tuple[str, list]]:
    """Every rating line of the watched ``slots`` after ``inp``'s page and ``context``
    (choices and next/exit), each after its slot's rating cue line when ``cue``, as one
    request: packed as a token tree, the context is pushed once and each slot costs only its
    own lines."""
    if not slots:
        return []
    return [(_prefix(inp), [(context + (inp.rating_cue(s) if cue else ""), text.rating_line(s, r))
                            for s in slots for r in text.RATINGS])]


def _yes(score: float, temperature: float, rng: np.random.Generator) -> bool:
    """Take a binary choice whose calibrated log-odds are ``score``."""
    if temperature <= 0:
        return score > 0
    return bool(rng.random() < 1 / (1 + np.exp(-score / temperature)))


def decide(scorer, inputs: Sequence[DecisionInput], *, temperature: float = 0.0,
           world_model: bool = False, calibration: Calibration | None = None,
           watch_offset: float | None = None, then: bool = True,
           exits: bool = True) -> list[Decision]:
    """Decide every page of ``inputs`` in lockstep. ``world_model`` first asks the model for
    the rating it expects per slot and puts it in the context; ``watch_offset`` overrides the
    calibration's and its history term (1:m lists' accuracy cut); ``then=False`` stops after
    watch/skip (a list's last page needs no more). ``exits=False``: the session goes on
    whatever the agent would say (1:m lists), so next/exit is not asked and the ratings follow
    "then: next", the step actually taken (one forward and ~70 tokens a page fewer;
    ``then_probs`` and ``exit_score`` stay empty)."""
    cal = calibration or Calibration()
    rule_offset, then_open, then_last = cal.rule(temperature)
    offset = rule_offset if watch_offset is None else watch_offset
    inputs = with_predictions(scorer, inputs, cal.wm_rating_cue) if world_model else list(inputs)
    tails = [prompts.policy_tail(text.render_predictions(i.predictions)) for i in inputs]
    watch = score_many(scorer, [
        (_prefix(i), [(tail + i.cue(s), text.slot_line(s, c)) for s in range(1, len(i.items) + 1)
                      for c in (text.WATCH, text.SKIP)]) for i, tail in zip(inputs, tails,
                                                                            strict=True)])
    rngs = [decision_rng(i.seed, i.user, i.page) for i in inputs]
    chosen: list[tuple[dict[int, float], list[int]]] = []
    for inp, lp, rng in zip(inputs, watch, rngs, strict=True):
        shift = 0.0 if watch_offset is not None else cal.history_shift(inp.history)
        scores = {s: float(lp[2 * s - 2] - lp[2 * s - 1]) + offset + shift
                  for s in range(1, len(inp.items) + 1)}
        chosen.append((scores, [s for s, v in scores.items() if _yes(v, temperature, rng)]))
    if not then:
        return [Decision(action=PageAction(watched={i.items[s - 1]: 1 for s in w}),
                         watch_scores=sc) for i, (sc, w) in zip(inputs, chosen, strict=True)]
    ctxs = [tail + text.render_choices(len(i.items), w)
            for i, tail, (_, w) in zip(inputs, tails, chosen, strict=True)]
    if exits:
        thens = score_many(scorer, [(_prefix(i), [(ctx, text.then_line(t)) for t in text.THEN])
                                    for i, ctx in zip(inputs, ctxs, strict=True)])
        exit_scores: list[float | None] = [float(lp[1] - lp[0]) + (then_last if i.last
                                                                    else then_open)
                                           for i, lp in zip(inputs, thens, strict=True)]
        goes = [text.THEN[1] if _yes(e, temperature, rng) else text.THEN[0]
                for e, rng in zip(exit_scores, rngs, strict=True)]
    else:
        exit_scores, goes = [None] * len(inputs), [text.THEN[0]] * len(inputs)
    # Ratings only after the next/exit actually taken: one more batched call, half the lines.
    rates = iter(score_many(scorer, [
        r for i, ctx, (_, w), go in zip(inputs, ctxs, chosen, goes, strict=True)
        for r in _rating_requests(i, ctx + text.then_line(go), w, cal.rating_cue)]))
    out = []
    for inp, rng, (scores, w), exit_score, go in zip(inputs, rngs, chosen, exit_scores, goes,
                                                     strict=True):
        lp = next(rates) if w else []
        p_exit = None if exit_score is None else float(1 / (1 + np.exp(-exit_score)))
        ratings, rating_probs = {}, {}
        for k, s in enumerate(w):
            pick, probs = _pick(tilted(lp[5 * k: 5 * k + 5], cal.rating_tilt,
                                       cal.rating_sharpness), temperature, rng)
            ratings[s], rating_probs[s] = pick + 1, probs
        out.append(Decision(
            action=PageAction(watched={inp.items[s - 1]: r for s, r in ratings.items()},
                              then=go),
            watch_scores=scores, rating_probs=rating_probs,
            then_probs=[] if p_exit is None else [round(1 - p_exit, 4), round(p_exit, 4)],
            exit_score=exit_score,
            predictions=inp.predictions))
    return out


def decide_chunked(scorer, inputs: Sequence[DecisionInput], *, chunk: int = 100,
                   progress: Callable[[int], None] | None = None, **kw) -> list[Decision]:
    """``decide`` ``chunk`` pages at a time: a call keeps its pages' prompts cached until it
    returns (~10 MB of KV per page prompt), so hundreds of pages at once would hold gigabytes."""
    out: list[Decision] = []
    for start in range(0, len(inputs), chunk):
        out += decide(scorer, inputs[start:start + chunk], **kw)
        if progress is not None:
            progress(len(out) - start)
    return out


def rating_expectations(scorer, inputs: Sequence[DecisionInput],
                        actions: Sequence[PageAction], chunk: int = 100,
                        calibration: Calibration | None = None) -> list[dict[int, float]]:
    """Expected rating of each watched slot, as the adapter rates: ``rating_logps`` in
    ``calibration``'s rating format, read under its rating tilt and sharpness."""
    cal = calibration or Calibration()
    return [{s: expected_value(tilted(lp, cal.rating_tilt, cal.rating_sharpness), range(1, 6))
             for s, lp in page.items()}
            for page in rating_logps(scorer, inputs, actions, chunk, cal.rating_cue)]


def rating_logps(scorer, inputs: Sequence[DecisionInput], actions: Sequence[PageAction],
                 chunk: int = 100, rating_cue: bool = False) -> list[dict[int, list[float]]]:
    """The five ratings' log-probabilities of each watched slot once the given choices and
    next/exit are in the context (held-out pages: the human's action), after the slot's rating
    cue line with ``rating_cue`` (``Calibration.rating_cue``); ``chunk`` pages per call, as
    ``decide_chunked`` does (600 pages in one call kept all their prompts: the prefix cache
    ended at 6.55 GB against its 2 GiB budget, ``bench/bench_page_memory.py``)."""
    if len(inputs) != len(actions):
        raise ValueError(f"{len(inputs)} pages but {len(actions)} actions")
    out: list[dict[int, list[float]]] = []
    for start in range(0, len(inputs), chunk):
        reqs, slots_of = [], []
        for inp, act in zip(inputs[start:start + chunk], actions[start:start + chunk],
                            strict=True):
            slots = [inp.items.index(i) + 1 for i in act.watched]
            ctx = (prompts.policy_tail(text.render_predictions(inp.predictions))
                   + text.render_choices(len(inp.items), slots) + text.then_line(act.then))
            reqs += _rating_requests(inp, ctx, slots, rating_cue)
            slots_of.append(slots)
        scored = iter(score_many(scorer, reqs))
        for slots in slots_of:
            lp = next(scored) if slots else []
            out.append({s: [float(x) for x in lp[5 * k:5 * k + 5]]
                        for k, s in enumerate(slots)})
    return out
