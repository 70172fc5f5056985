"""Fit a checkpoint's log-odds offsets on validation, so the agent browses at the humans' rates.

The class-balanced loss leaves watch/skip log-odds centred near even odds; one offset per
decision restores the base rates seen on held-out validation pages (watch ratio, exit share
before the page limit, exit share on the last allowed page), and one more tunes watch/skip on
validation 1:1 lists as the baselines' thresholds are.

``python -m training.calibrate PREPARED CHECKPOINT`` refits the offsets of an adapter that is
already trained (one trained before calibration existed, or before the decision step changed)
and writes them into its manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from agents.browse import accuracy_offset, list_scores, pages_of, rate_offset, sampled_rate_offset
from agents.decide import Calibration, decide_chunked
from agents.perception import Perceiver
from agents.policy import DEFAULT_TEMPERATURE, DecisionInput
from agents.transition import Transition


def digest(rows: Any) -> str:
    """A short fingerprint of what a figure was measured on. Two adapters' list AUCs compare
    only when their lists' digests match: two draws of 40 validation lists differ by more
    (0.856 against 0.883 for one adapter) than most training changes move it."""
    return hashlib.sha256(json.dumps(rows, default=int).encode()).hexdigest()[:16]


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
    # Before the page limit next/exit says whether the visit goes on; on the last allowed page
    # only whether the session ends there or would go on: each gets its own offset.
    last = np.asarray([t.at_limit for t in valid_trs], dtype=bool)
    human_exit = np.asarray([t.then == "exit" for t in valid_trs], dtype=float)
    rate, temp = float(human_watch.mean()), DEFAULT_TEMPERATURE
    # Greedy replays take a slot when its score is positive; a browsing agent samples, so its
    # offset makes the mean probability the humans' ratio instead.
    cal = Calibration(watch_offset=rate_offset(watch, rate),
                      sampled_watch_offset=sampled_rate_offset(watch, rate, temp),
                      sampled_temperature=temp)
    # next/exit is scored after the chosen slots, so fit its offset on the calibrated choices.
    decisions = _decide(scorer, inputs, "calibrate exit", world_model=world_model,
                        calibration=cal)
    exits = np.asarray([d.exit_score for d in decisions], dtype=float)
    exit_rate = float(human_exit[~last].mean()) if (~last).any() else 0.0
    cal.then_offset = rate_offset(exits[~last], exit_rate)
    # Read after the greedy choices: the sampled exit offset is fitted on the same scores.
    cal.sampled_then_offset = sampled_rate_offset(exits[~last], exit_rate, temp)
    last_rate = float(human_exit[last].mean()) if last.any() else None
    if last_rate is not None:
        cal.last_then_offset = rate_offset(exits[last], last_rate)
        cal.sampled_last_then_offset = sampled_rate_offset(exits[last], last_rate, temp)
    report = {"pages": len(valid_trs), "human_watch_ratio": round(float(human_watch.mean()), 4),
              "human_exit_share": round(exit_rate, 4),
              "exit_pages": int((~last).sum()),
              "last_pages": int(last.sum()),
              "human_last_exit_share": None if last_rate is None else round(last_rate, 4),
              "world_model": world_model,
              "pages_digest": digest([[t.user, t.page, list(t.items)] for t in valid_trs])}
    if valid_lists and perceiver is not None and personas and histories is not None:
        pages = sum(len(pages_of(items)) for _, items, _ in valid_lists)
        with tqdm(total=pages, desc="calibrate lists", unit="page") as bar:
            scores = list_scores(scorer, perceiver, personas, histories,
                                 [(u, items) for u, items, _ in valid_lists],
                                 world_model=world_model, progress=bar.update)
        labels = [y for _, _, y in valid_lists]
        cal.list_offset = accuracy_offset(scores, labels)
        report["lists"] = len(valid_lists)
        report["lists_digest"] = digest([[u, list(items), list(y)] for u, items, y in valid_lists])
        # A first look at discrimination before any evaluation run (pooled over the lists).
        y = np.concatenate([np.asarray(x) for x in labels])
        if 0 < y.sum() < len(y):
            report["list_auc"] = round(float(roc_auc_score(y, np.concatenate(scores))), 4)
    return {**cal.model_dump(), "fitted_on": report}


def calibrate_checkpoint(prep: Any, checkpoint: str | Path, *, world_model: bool,
                         device: str = "auto", lm: Any = None, lists: bool = True) -> dict:
    """Fit ``checkpoint``'s offsets on ``prep``'s validation pages and lists (a ``Prepared``
    from ``alignuser train --prepare-only``) with its merged weights, as training does, and
    store them in its manifest; ``lm`` replaces loading it (tests). Without ``lists`` only the
    page offsets are refitted: the list offset, and what it was fitted on, stay as they were,
    so list answers scored with it stay valid."""
    from agents.llm import load_lm
    from agents.scorer import Scorer
    from simulator.runs import write_atomic

    checkpoint = Path(checkpoint)
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    lm = lm or load_lm(adapter=checkpoint, device=device)
    t0 = time.perf_counter()
    cal = calibrate(Scorer(lm, cache_size=128), prep.calib, world_model=world_model,
                    perceiver=prep.perceiver, personas=prep.personas, histories=prep.histories,
                    valid_lists=prep.valid_lists if lists else ())
    cal["seconds"] = round(time.perf_counter() - t0, 1)
    if not lists:
        old = manifest.get("calibration") or {}
        cal["list_offset"] = old.get("list_offset")  # None: lists use the watch offset
        cal["fitted_on"].update({k: v for k, v in (old.get("fitted_on") or {}).items()
                                 if k.startswith("list")})
    write_atomic(path, json.dumps({**manifest, "calibration": cal}, indent=2))
    return cal


def main(argv: list[str] | None = None) -> int:
    from simulator.runs import read_pickle

    ap = argparse.ArgumentParser(description="Refit a trained adapter's log-odds offsets on "
                                 "validation and write them into its manifest.")
    ap.add_argument("prepared", help="file written by alignuser train --prepare-only")
    ap.add_argument("checkpoint", help="adapter folder whose manifest.json gets the offsets")
    ap.add_argument("--world-model", action=argparse.BooleanOptionalAction, default=True,
                    help="decide with the world model's expected ratings, as the full and "
                    "world model + policy agents do (--no-world-model: policy-only adapters)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--lists", action=argparse.BooleanOptionalAction, default=True,
                    help="refit the 1:m list offset on the prepared validation lists too "
                    "(--no-lists: page offsets only; the list offset stays, so 1:m list "
                    "answers already scored with it stay valid)")
    args = ap.parse_args(argv)
    if not (Path(args.checkpoint) / "adapter_config.json").is_file():
        ap.error(f"{args.checkpoint} is not an adapter folder (no adapter_config.json)")
    if not Path(args.prepared).is_file():
        ap.error(f"{args.prepared}: no such file")
    cal = calibrate_checkpoint(read_pickle(args.prepared), args.checkpoint,
                               world_model=args.world_model, device=args.device,
                               lists=args.lists)
    print(json.dumps(cal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
