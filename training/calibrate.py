"""Fit a checkpoint's log-odds offsets on validation, so the agent browses at the humans' rates.

The class-balanced loss leaves watch/skip log-odds centred near even odds; one offset per
decision restores the base rates seen on held-out validation pages (watch ratio, exit share
before the page limit, exit share on the last allowed page), and one more tunes watch/skip on
validation 1:1 lists as the baselines' thresholds are. A sampling agent's exit offset is then
refitted on validation users' sessions on the built-in recommenders' pages, where it watches
more than on the humans' pages, so that its sessions end by exit as often as the validation
visits do. A rating tilt makes its expected ratings of the items the humans watched there,
after their own choices, average the humans' ratings, and a rating sharpness spreads them as
far as brings them closest to the humans' (least squared error).

``python -m training.calibrate PREPARED CHECKPOINT`` refits the offsets of an adapter that is
already trained (one trained before calibration existed, or before the decision step changed)
and writes them into its manifest (``--no-lists``, ``--no-pages``: refit fewer of them;
``--ratings-only [--rating-format F]``: how ratings are read, ``training.rating_refit``).
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

from agents.browse import (
    accuracy_offset,
    fit_rating_scale,
    list_scores,
    pages_of,
    rate_offset,
    rating_rmse,
    sampled_rate_offset,
    tilt_to_mean,
)
from agents.decide import Calibration, decide_chunked, rating_logps
from agents.perception import Perceiver
from agents.policy import DEFAULT_TEMPERATURE, DecisionInput
from agents.transition import Transition
from training.history_offset import HISTORY_BINS, by_history, history_slope
from training.rating_refit import FORMATS, NO_RATINGS, has_ratings, refit_ratings
from training.session_offsets import refit_on_sessions


def digest(rows: Any) -> str:
    """A short fingerprint of what a figure was measured on. Two adapters' list AUCs compare
    only when their lists' digests match: two draws of 40 validation lists differ by more
    (0.856 against 0.883 for one adapter) than most training changes move it."""
    return hashlib.sha256(json.dumps(rows, default=int).encode()).hexdigest()[:16]


def _decide(scorer, inputs: Sequence[DecisionInput], desc: str, **kw) -> list:
    with tqdm(total=len(inputs), desc=desc, unit="page") as bar:
        return decide_chunked(scorer, inputs, progress=bar.update, **kw)


def _exits_and_ratings(scorer, inputs: Sequence[DecisionInput], trs: Sequence[Transition],
                       cal: Calibration, world_model: bool, chunk: int = 100
                       ) -> tuple[list, list[list[float]], list[float]]:
    """The calibrated decisions of every page, the five ratings' log-probabilities of each
    item the human watched and the human's rating of it, read after the human's own choices
    and next/exit as held-out pages are rated (with the world model's expectations in the
    prompt when it decides with them).
    A chunk's ratings follow its decisions while its page prompts are still cached: read
    after all the pages, every prompt was pushed again (~4 s a page on this CPU)."""
    decisions: list = []
    logps: list[list[float]] = []
    humans: list[float] = []
    with tqdm(total=len(inputs), desc="calibrate exit and ratings", unit="page") as bar:
        for k in range(0, len(inputs), chunk):
            part = decide_chunked(scorer, inputs[k:k + chunk], chunk=chunk,
                                  world_model=world_model, calibration=cal)
            rated = [(i.model_copy(update={"predictions": d.predictions}), t)
                     for i, d, t in zip(inputs[k:k + chunk], part, trs[k:k + chunk], strict=True)
                     if t.ratings]
            pages = rating_logps(scorer, [i for i, _ in rated],
                                 [t.human_action() for _, t in rated], chunk=chunk,
                                 rating_cue=cal.rating_cue)
            for page, (_, t) in zip(pages, rated, strict=True):
                logps += page.values()
                humans += [t.ratings[s] for s in page]
            decisions += part
            bar.update(len(part))
    return decisions, logps, humans


def _page_offsets(scorer, valid_trs: Sequence[Transition], *, world_model: bool,
                  history_bins: int, rating_cue: bool, wm_rating_cue: bool
                  ) -> tuple[Calibration, dict]:
    """The watch, exit and rating offsets fitted on validation pages, and what they were
    fitted on."""
    inputs = [t.decision_input() for t in valid_trs]
    # Only the watch/skip scores are read here: next/exit and ratings wait for the offset.
    decisions = _decide(scorer, inputs, "calibrate watch", world_model=world_model,
                        then=False, calibration=Calibration(wm_rating_cue=wm_rating_cue))
    watch = np.asarray([d.watch_scores[s] for d in decisions for s in d.watch_scores])
    human_watch = np.asarray([int(s in t.ratings) for t in valid_trs
                              for s in range(1, len(t.items) + 1)])
    # Before the page limit next/exit says whether the visit goes on; on the last allowed page
    # only whether the session ends there or would go on: each gets its own offset.
    last = np.asarray([t.at_limit for t in valid_trs], dtype=bool)
    human_exit = np.asarray([t.then == "exit" for t in valid_trs], dtype=float)
    rate, temp = float(human_watch.mean()), DEFAULT_TEMPERATURE
    sizes = [t.history for t in valid_trs]
    known = history_bins > 1 and all(h is not None for h in sizes)
    history = np.repeat(np.asarray(sizes if known else [0] * len(sizes), dtype=float),
                        [len(t.items) for t in valid_trs])
    slope, center = history_slope(watch, human_watch, history, history_bins if known else 0)
    shifted = watch + slope * (np.log1p(history) - center)
    # Greedy replays take a slot when its score is positive; a browsing agent samples, so its
    # offset makes the mean probability the humans' ratio instead.
    cal = Calibration(watch_offset=rate_offset(shifted, rate),
                      sampled_watch_offset=sampled_rate_offset(shifted, rate, temp),
                      sampled_temperature=temp, watch_history_slope=slope,
                      history_center=center, rating_cue=rating_cue,
                      wm_rating_cue=wm_rating_cue)
    # next/exit is scored after the chosen slots, so fit its offset on the calibrated choices;
    # the humans' ratings are read page chunk by page chunk right after, their prompts cached.
    decisions, logps, ratings = _exits_and_ratings(scorer, inputs, valid_trs, cal, world_model)
    exits = np.asarray([d.exit_score for d in decisions], dtype=float)
    exit_rate = float(human_exit[~last].mean()) if (~last).any() else 0.0
    cal.then_offset = rate_offset(exits[~last], exit_rate)
    # Read after the greedy choices: the sampled exit offset is fitted on the same scores.
    cal.sampled_then_offset = sampled_rate_offset(exits[~last], exit_rate, temp)
    last_rate = float(human_exit[last].mean()) if last.any() else None
    if last_rate is not None:
        cal.last_then_offset = rate_offset(exits[last], last_rate)
        cal.sampled_last_then_offset = sampled_rate_offset(exits[last], last_rate, temp)
    human_mean = float(np.mean(ratings)) if ratings else None
    if human_mean is not None:
        cal.rating_tilt, cal.rating_sharpness = fit_rating_scale(logps, ratings)
        rmse = {"tilt": rating_rmse(logps, ratings, tilt_to_mean(logps, human_mean)),
                "tilt_and_sharpness": rating_rmse(logps, ratings, cal.rating_tilt,
                                                  cal.rating_sharpness)}
    report = {"pages": len(valid_trs), "human_watch_ratio": round(float(human_watch.mean()), 4),
              "human_mean_rating": None if human_mean is None else round(human_mean, 4),
              "rating_rmse": None if human_mean is None else rmse,
              "human_exit_share": round(exit_rate, 4),
              "exit_pages": int((~last).sum()),
              "last_pages": int(last.sum()),
              "human_last_exit_share": None if last_rate is None else round(last_rate, 4),
              "world_model": world_model,
              "pages_digest": digest([[t.user, t.page, list(t.items)] for t in valid_trs])}
    if known:
        report["by_history"] = by_history(watch, human_watch, history, cal, history_bins)
    return cal, report


def calibrate(scorer, valid_trs: Sequence[Transition], *, world_model: bool,
              perceiver: Perceiver | None = None, personas: Mapping[int, str] | None = None,
              histories: Mapping[int, Mapping[int, float]] | None = None,
              valid_lists: Sequence[tuple[int, list[int], list[int]]] = (),
              sessions: Sequence[tuple[int, list[list[int]]]] = (),
              visits: Sequence[tuple[int, bool]] = (), seed: int = 0,
              history_bins: int = HISTORY_BINS, rating_cue: bool = False,
              wm_rating_cue: bool = False) -> dict:
    """Offsets and what they were fitted on (for the manifest). With ``sessions`` (validation
    users' pages on the built-in recommenders) and the validation ``visits`` (pages, ended by
    exit), the sampled exit offsets are refitted on sessions (``session_offsets``). With
    ``history_bins`` > 1 the watch offsets get a slope in the person's number of ratings
    (``history_slope``; pages built before transitions recorded it get none). ``rating_cue``:
    the adapter's rating format, recorded with the offsets (sessions rate in it);
    ``wm_rating_cue``: its world model's (from its training config, not recorded). Without
    ``valid_trs`` the page offsets stay at even odds (0) and the report says it fitted on no
    pages: an adapter trained with ``--calibration-pages 0`` is not calibrated, and its
    manifest must not read as if it were (nor hold the NaN of an empty mean)."""
    if valid_trs:
        cal, report = _page_offsets(scorer, valid_trs, world_model=world_model,
                                    history_bins=history_bins, rating_cue=rating_cue,
                                    wm_rating_cue=wm_rating_cue)
    else:
        cal = Calibration(rating_cue=rating_cue, wm_rating_cue=wm_rating_cue)
        report = {"pages": 0, "world_model": world_model}
    if sessions and visits and perceiver is not None and personas and histories is not None:
        report["sessions"] = refit_on_sessions(
            scorer, cal, sessions, visits, perceiver=perceiver, personas=personas,
            histories=histories, world_model=world_model, seed=seed)
    if valid_lists and perceiver is not None and personas and histories is not None:
        pages = sum(len(pages_of(items)) for _, items, _ in valid_lists)
        with tqdm(total=pages, desc="calibrate lists", unit="page") as bar:
            scores = list_scores(scorer, perceiver, personas, histories,
                                 [(u, items) for u, items, _ in valid_lists],
                                 world_model=world_model, calibration=cal,
                                 progress=bar.update)
        labels = [y for _, _, y in valid_lists]
        cal.list_offset = accuracy_offset(scores, labels)
        report["lists"] = len(valid_lists)
        report["lists_digest"] = digest([[u, list(items), list(y)] for u, items, y in valid_lists])
        # A first look at discrimination before any evaluation run (pooled over the lists).
        y = np.concatenate([np.asarray(x) for x in labels])
        if 0 < y.sum() < len(y):
            report["list_auc"] = round(float(roc_auc_score(y, np.concatenate(scores))), 4)
    return {**cal.model_dump(exclude={"wm_format", "wm_rating_cue"}), "fitted_on": report}


NO_SESSIONS = ("the prepared file has no validation sessions: write it with alignuser train "
               "--prepare-only --calibration-sessions N")
NO_PAGES = ("the prepared file has no calibration pages: write it with alignuser train "
            "--prepare-only --calibration-pages N (N > 0), or refit only the sampled exit "
            "offsets with --no-pages")


def session_data(prep: Any) -> tuple[Sequence, Sequence]:
    """A prepared file's validation sessions and visits (empty in files written before them)."""
    return getattr(prep, "sessions", ()) or (), getattr(prep, "visits", ()) or ()


def prepared_error(prep: Any, *, pages: bool, ratings_only: bool) -> str | None:
    """Why ``prep`` holds nothing to refit what was asked (None: it does); checked before
    the model loads, by the command line and ``calibrate_checkpoint`` alike."""
    if ratings_only:
        return None if has_ratings(prep.calib) else NO_RATINGS
    if not pages:
        return None if all(session_data(prep)) else NO_SESSIONS
    # a refit on no pages would reset the offsets to even odds
    return None if prep.calib else NO_PAGES


def calibrate_checkpoint(prep: Any, checkpoint: str | Path, *, world_model: bool,
                         device: str = "auto", lm: Any = None, lists: bool = True,
                         pages: bool = True, history_bins: int = HISTORY_BINS,
                         ratings_only: bool = False, rating_format: str = "trained") -> dict:
    """Fit ``checkpoint``'s offsets on ``prep``'s validation pages, lists and sessions (a
    ``Prepared`` from ``alignuser train --prepare-only``) with its merged weights, as training
    does, and store them in its manifest; ``lm`` replaces loading it (tests). Without
    ``lists`` the list offset, and what it was fitted on, stay as they were, so list answers
    scored with it stay valid; without ``pages`` only the sampled exit offset is refitted on
    the sessions, the other offsets kept. ``ratings_only``: only the rating format (one of
    ``training.rating_refit.FORMATS``), tilt and sharpness, on the validation pages."""
    from agents.llm import load_lm
    from agents.scorer import Scorer
    from simulator.runs import write_atomic

    checkpoint = Path(checkpoint)
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if error := prepared_error(prep, pages=pages, ratings_only=ratings_only):
        raise ValueError(error)
    sessions, visits = session_data(prep)
    lm = lm or load_lm(adapter=checkpoint, device=device)
    scorer = Scorer(lm, cache_size=128)
    old = manifest.get("calibration") or {}
    current = Calibration.of_checkpoint(checkpoint)
    trained_cue = bool((manifest.get("config") or {}).get("rating_cue"))
    t0 = time.perf_counter()
    if ratings_only:  # its report holds its own seconds; the offsets' stay
        fitted, report = refit_ratings(scorer, prep.calib, current, world_model=world_model,
                                       rating_format=rating_format, trained_cue=trained_cue)
        cal = {**old, **fitted.model_dump(include={"rating_cue", "rating_tilt",
                                                   "rating_sharpness"}),
               "fitted_on": {**(old.get("fitted_on") or {}), "ratings": report}}
    else:
        if pages:
            cal = calibrate(scorer, prep.calib, world_model=world_model,
                            perceiver=prep.perceiver, personas=prep.personas,
                            histories=prep.histories,
                            valid_lists=prep.valid_lists if lists else (), sessions=sessions,
                            visits=visits, history_bins=history_bins, rating_cue=trained_cue,
                            wm_rating_cue=current.wm_rating_cue)
        else:
            report = refit_on_sessions(scorer, current, sessions, visits,
                                       perceiver=prep.perceiver, personas=prep.personas,
                                       histories=prep.histories, world_model=world_model)
            cal = {**old, **current.model_dump(include={"sampled_then_offset",
                                                        "sampled_last_then_offset"}),
                   "fitted_on": {**(old.get("fitted_on") or {}), "sessions": report}}
        cal["seconds"] = round(time.perf_counter() - t0, 1)
        if pages and not lists:
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
    ap.add_argument("--pages", action=argparse.BooleanOptionalAction, default=True,
                    help="refit the page offsets (--no-pages: only the sampled exit offset, "
                    "on the prepared validation sessions; every other offset stays)")
    ap.add_argument("--history-bins", type=int, default=HISTORY_BINS,
                    help="quantile bins of the people's number of ratings the watch offsets' "
                    "slope is fitted on (0: one offset whatever the history)")
    ap.add_argument("--ratings-only", action="store_true",
                    help="refit only how ratings are read (format, tilt, sharpness) on the "
                    "validation pages' human ratings; every offset stays, and with it every "
                    "choice and list answer")
    ap.add_argument("--rating-format", choices=FORMATS, default="trained",
                    help="with --ratings-only: the format the adapter was trained in, each "
                    "rating after its cue line (cue) or without it (plain), or whichever errs "
                    "less on the validation ratings (best)")
    args = ap.parse_args(argv)
    if args.rating_format != "trained" and not args.ratings_only:
        ap.error("--rating-format needs --ratings-only")
    if args.ratings_only and not (args.pages and args.lists):
        ap.error("--ratings-only refits no offset: drop --no-pages / --no-lists")
    if args.history_bins < 0 or args.history_bins == 1:
        ap.error(f"--history-bins {args.history_bins}: 0 (one offset) or at least 2")
    if not (Path(args.checkpoint) / "adapter_config.json").is_file():
        ap.error(f"{args.checkpoint} is not an adapter folder (no adapter_config.json)")
    if not Path(args.prepared).is_file():
        ap.error(f"{args.prepared}: no such file")
    prep = read_pickle(args.prepared)
    if error := prepared_error(prep, pages=args.pages, ratings_only=args.ratings_only):
        ap.error(error)
    cal = calibrate_checkpoint(prep, args.checkpoint,
                               world_model=args.world_model, device=args.device,
                               lists=args.lists, pages=args.pages,
                               history_bins=args.history_bins, ratings_only=args.ratings_only,
                               rating_format=args.rating_format)
    print(json.dumps(cal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
