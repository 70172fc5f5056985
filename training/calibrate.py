"""Fit a checkpoint's log-odds offsets on validation, so the agent browses at the humans' rates.

The class-balanced loss leaves watch/skip log-odds centred near even odds; one offset per
decision restores the base rates seen on held-out validation pages (watch ratio, exit share),
and one more tunes watch/skip on validation 1:1 lists as the baselines' thresholds are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from agents.browse import accuracy_offset, list_scores, pages_of, rate_offset
from agents.decide import Calibration, decide_chunked
from agents.perception import Perceiver
from agents.policy import DecisionInput
from agents.transition import Transition


def _decide(scorer, inputs: Sequence[DecisionInput], desc: str, **kw) -> list:
    with tqdm(total=len(inputs), desc=desc, unit="page") as bar:
        return decide_chunked(scorer, inputs, progress=bar.update, **kw)


def calibrate(scorer, valid_trs: Sequence[Transition], *, world_model: bool,
              perceiver: Perceiver | None = None, personas: Mapping[int, str] | None = None,
              histories: Mapping[int, Mapping[int, float]] | None = None,
              valid_lists: Sequence[tuple[int, list[int], list[int]]] = ()) -> dict:
    """Offsets and what they were fitted on (for the manifest)."""
    inputs = [t.decision_input() for t in valid_trs]
    # Only the watch/skip scores are read here: next/exit and ratings wait for the offset.
    decisions = _decide(scorer, inputs, "calibrate watch", world_model=world_model,
                        then=False)
    watch = np.asarray([d.watch_scores[s] for d in decisions for s in d.watch_scores])
    human_watch = np.asarray([int(s in t.ratings) for t in valid_trs
                              for s in range(1, len(t.items) + 1)])
    human_exit = np.asarray([t.then == "exit" for t in valid_trs], dtype=float)
    cal = Calibration(watch_offset=rate_offset(watch, float(human_watch.mean())))
    # next/exit is scored after the chosen slots, so fit its offset on the calibrated choices.
    decisions = _decide(scorer, inputs, "calibrate exit", world_model=world_model,
                        calibration=cal)
    exits = np.asarray([d.exit_score for d in decisions])
    cal.then_offset = rate_offset(exits, float(human_exit.mean()))
    report = {"pages": len(valid_trs), "human_watch_ratio": round(float(human_watch.mean()), 4),
              "human_exit_share": round(float(human_exit.mean()), 4),
              "world_model": world_model}
    if valid_lists and perceiver is not None and personas and histories is not None:
        pages = sum(len(pages_of(items)) for _, items, _ in valid_lists)
        with tqdm(total=pages, desc="calibrate lists", unit="page") as bar:
            scores = list_scores(scorer, perceiver, personas, histories,
                                 [(u, items) for u, items, _ in valid_lists],
                                 world_model=world_model, progress=bar.update)
        labels = [y for _, _, y in valid_lists]
        cal.list_offset = accuracy_offset(scores, labels)
        report["lists"] = len(valid_lists)
        # A first look at discrimination before any evaluation run (pooled over the lists).
        y = np.concatenate([np.asarray(x) for x in labels])
        if 0 < y.sum() < len(y):
            report["list_auc"] = round(float(roc_auc_score(y, np.concatenate(scores))), 4)
    return {**cal.model_dump(), "fitted_on": report}
