"""The watch offsets' term in the person's number of ratings (``Calibration
.watch_history_slope``): fitted per history bin of the calibration slots, so short and long
histories watch as much as their humans."""

from __future__ import annotations

import numpy as np

from agents.browse import rate_offset
from agents.decide import Calibration

# Quantiles of the calibration slots' history sizes the watch offsets' slope is fitted on.
HISTORY_BINS = 4


def _bins(x: np.ndarray, bins: int) -> np.ndarray:
    """Each value's bin among ``bins`` of equal size in the order of ``x`` (ties split by
    position, so few distinct values still fill every bin)."""
    idx = np.empty(len(x), dtype=int)
    for b, part in enumerate(np.array_split(np.argsort(x, kind="stable"), bins)):
        idx[part] = b
    return idx


def history_slope(scores: np.ndarray, labels: np.ndarray, history: np.ndarray, bins: int
                  ) -> tuple[float, float]:
    """(slope, center) of the watch offset in log(1 + ratings). The agent's log-odds fall as a
    history grows while the humans' watch ratio does not (on the shipped agent's 400
    calibration pages: 0.36 of slots watched by people with fewer than 50 ratings, 0.23 with
    100-200, the humans 0.26-0.28), so one offset fitted on a sample of short histories leaves
    an evaluation of long ones short of watches. Per quantile bin of the slots' log(1 +
    ratings), the offset that makes the bin watch as much as its humans; the slope of those
    offsets on the bins' mean, weighted by slots; the center is the slots' mean."""
    x = np.log1p(np.asarray(history, dtype=float))
    center = float(x.mean()) if len(x) else 0.0
    if bins < 2 or np.unique(x).size < 2:
        return 0.0, center
    idx = _bins(x, bins)
    keep = np.unique(idx)  # at least 2: x holds two distinct values, so two slots
    means = [x[idx == b].mean() for b in keep]
    offsets = [rate_offset(scores[idx == b], labels[idx == b].mean()) for b in keep]
    weights = [np.sqrt((idx == b).sum()) for b in keep]
    return float(np.polyfit(means, offsets, 1, w=weights)[0]), center


def by_history(scores: np.ndarray, labels: np.ndarray, history: np.ndarray, cal: Calibration,
               bins: int) -> list[dict]:
    """Per history bin: the humans' watch ratio, the agent's greedy one with the one offset
    fitted alone and with the history slope (for the manifest)."""
    x = np.log1p(history)
    idx = _bins(x, bins)
    alone = rate_offset(scores, float(labels.mean()))
    shifted = scores + cal.watch_offset + cal.watch_history_slope * (x - cal.history_center)
    return [{"ratings": [int(history[idx == b].min()), int(history[idx == b].max())],
             "slots": int((idx == b).sum()), "humans": round(float(labels[idx == b].mean()), 4),
             "one_offset": round(float((scores[idx == b] + alone > 0).mean()), 4),
             "with_slope": round(float((shifted[idx == b] > 0).mean()), 4)}
            for b in np.unique(idx)]
