"""Refit how an adapter's ratings are read, and nothing else: the rating format, tilt and
sharpness (``agents.decide.Calibration``).

A page's rating lines are scored after its choices and next/exit, so what the agent watches
and when it exits do not depend on them: a ratings-only refit leaves every list answer and
every page's choices as they were. An adapter may also be read in the other rating format
than it was trained in (with or without each slot's rating cue line, whose last number is the
item-kNN rating it perceives); ``best`` keeps whichever format errs less from the validation
humans' ratings, each with its own fitted tilt and sharpness.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from agents.browse import fit_rating_scale, rating_rmse, tilt_to_mean
from agents.decide import Calibration, rating_logps, with_predictions
from agents.transition import Transition

FORMATS = ("trained", "cue", "plain", "best")
NO_RATINGS = ("the prepared file's validation pages hold no rated item to fit ratings on: write "
              "it with alignuser train --prepare-only --calibration-pages N (N > 0)")


def has_ratings(trs: Sequence[Transition]) -> bool:
    """Whether any page holds a human rating to fit on."""
    return any(t.ratings for t in trs)


def rating_data(scorer, trs: Sequence[Transition], cues: Sequence[bool], world_model: bool,
                chunk: int = 100, wm_rating_cue: bool = False
                ) -> dict[bool, tuple[list[list[float]], list[float]]]:
    """Per rating format (``True``: after the cue line), the five ratings' log-probabilities
    of every item the human watched on ``trs`` and the human's rating of it, read after the
    human's own choices and next/exit, with the world model's expected ratings in the prompt
    when the agent decides with them (as held-out pages are rated in evaluation)."""
    out: dict[bool, tuple[list[list[float]], list[float]]] = {c: ([], []) for c in cues}
    rated = [t for t in trs if t.ratings]
    bar = tqdm(total=len(rated), desc="rating formats", unit="page")
    for k in range(0, len(rated), chunk):
        part = rated[k:k + chunk]
        inputs = [t.decision_input() for t in part]
        if world_model:
            inputs = with_predictions(scorer, inputs, wm_rating_cue)
        for cue, (logps, humans) in out.items():
            pages = rating_logps(scorer, inputs, [t.human_action() for t in part], chunk=chunk,
                                 rating_cue=cue)
            for page, t in zip(pages, part, strict=True):
                logps += page.values()
                humans += [t.ratings[s] for s in page]
        bar.update(len(part))
    bar.close()
    return out


def refit_ratings(scorer, trs: Sequence[Transition], cal: Calibration, *, world_model: bool,
                  trained_cue: bool, rating_format: str = "trained"
                  ) -> tuple[Calibration, dict]:
    """``cal`` with its rating format, tilt and sharpness fitted on ``trs``' human ratings
    (``agents.browse.fit_rating_scale``), every offset kept; and a report of each format
    tried. ``trained_cue``: the format the adapter was trained in (its manifest's config)."""
    if rating_format not in FORMATS:
        raise ValueError(f"rating format {rating_format!r}: one of {', '.join(FORMATS)}")
    if not has_ratings(trs):
        raise ValueError(NO_RATINGS)
    t0 = time.perf_counter()
    cues = {"trained": [trained_cue], "cue": [True], "plain": [False],
            "best": [trained_cue, not trained_cue]}[rating_format]
    fits: dict[bool, tuple[float, float, float]] = {}
    report: dict = {"formats": {}}
    for cue, (logps, humans) in rating_data(scorer, trs, cues, world_model,
                                                 wm_rating_cue=cal.wm_rating_cue).items():
        tilt, sharpness = fit_rating_scale(logps, humans)
        fits[cue] = (rating_rmse(logps, humans, tilt, sharpness), tilt, sharpness)
        report["formats"]["cue" if cue else "plain"] = {
            "tilt": round(tilt, 4), "sharpness": round(sharpness, 4), "rmse": fits[cue][0],
            "rmse_tilt_only": rating_rmse(logps, humans,
                                          tilt_to_mean(logps, float(np.mean(humans))))}
        report.update(ratings=len(humans), human_mean_rating=round(float(np.mean(humans)), 4))
    cue = min(fits, key=lambda c: fits[c][0])  # a tie keeps the first: the trained format
    _, tilt, sharpness = fits[cue]
    report.update(pages=len(trs), world_model=world_model,
                  format="cue" if cue else "plain", trained_format="cue" if trained_cue
                  else "plain", seconds=round(time.perf_counter() - t0, 1))
    return cal.model_copy(update={"rating_cue": cue, "rating_tilt": tilt,
                                  "rating_sharpness": sharpness}), report
