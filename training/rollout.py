"""D_rollout as training sees it: class balance of the rendered examples and a fingerprint of
the trajectories they came from. The rendering itself (``Transition``, ``Example``) is the
agent's own (``agents.transition``), so training and evaluation render a step alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import replace

from agents import text
from agents.transition import Example
from simulator.trajectories import Trajectory


def class_balance(examples: Sequence[Example]) -> tuple[list[Example], dict[str, float]]:
    """Weight watch and skip lines so each class carries half of the slot loss.

    Humans skip ~70% of slots, so an unweighted loss is lowest for "skip everything"; with the
    weights 0.5/p(class) the base rate no longer pays and the calibrated offset
    (``agents.decide.Calibration``) restores the humans' watch ratio when browsing."""
    lines = [ex.meta.get("line") for ex in examples]
    n = sum(1 for x in lines if x is not None)
    if not n:
        return list(examples), {}
    share = {c: sum(1 for x in lines if x == c) / n for c in (text.WATCH, text.SKIP)}
    weights = {c: (0.5 / p if p > 0 else 1.0) for c, p in share.items()}
    out = [replace(ex, weight=weights[ex.meta["line"]]) if ex.meta.get("line") else ex
           for ex in examples]
    return out, {f"{c}_weight": round(w, 4) for c, w in weights.items()}


def fingerprint(trajs: Iterable[Trajectory]) -> str:
    """A hash of the (user, page items, watched) content, to show which data trained a model."""
    h = hashlib.sha256()
    for t in sorted(trajs, key=lambda t: (t.user, t.session, t.visit)):
        for s in t.steps:
            h.update(f"{t.user}|{s.items}|{sorted(s.watched.items())}|{s.then};".encode())
    return h.hexdigest()[:16]
