"""What the agent's perceived numbers can tell about the ratings it gives, and how much of it an
adapter reads.

On the evaluated users' held-out test pages (evaluation's pick), the items the humans watched
there are rated by: a linear regression on numbers the agent perceives (the person's mean
rating from its persona, the item's mean rating, the person's mean rating of the item's 20
closest items and how many of them they watched), fitted on the same users' *validation*
pages, as the ranking bar is fitted on validation lists; the item-kNN rating the agent reads in
its rating cue, unfitted (``memory.evidence.ItemSimilarity.knn_rating``; ``--shrinks`` also
tries other shrinkages on both page sets, with the train ratings as history); the classical
predictors on the
train split (``simulator.offline.rating_predictions``); and, with ``--adapter``, the adapter's
expected rating after the human's action, as evaluation reads it (``agents.decide
.rating_expectations``, with the manifest's rating tilt), in the rating format it was trained
on and, with ``--formats``, in the other one too (an adapter trained without the rating cue,
shown it untrained; read without a tilt). With ``--world-model`` it also shows what the world
model's expectations put into the prompt carry, beside the item-kNN rating of the cues: their
error on the watched items, their spread within a page and how well they tell the watched
slots from the skipped (AUC); ``--expectations-only`` shows only that (a world model alone,
such as a stage-1 adapter), and ``--pages N`` reads the adapter on the first N pages only.

    python bench/bench_ratings.py [--adapter DIR [--world-model [--expectations-only]]
                                  [--formats trained,cue,plain] [--pages N]]
                                  [--shrinks 0,0.25,0.5,1,2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_population import table
from rich.console import Console
from sklearn.linear_model import LinearRegression
from sklearn.metrics import roc_auc_score

from agents.decide import Calibration, rating_expectations, with_predictions
from agents.transition import Transition
from agents.world import World, load_world
from evaluation.run import EvalConfig, held_out_pages
from simulator.offline import rating_predictions

GROUPS = {
    "the person's mean": ["person_mean"],
    "+ the item's mean": ["person_mean", "item_mean"],
    "+ the closest items' mean rating": ["person_mean", "item_mean", "close_rating",
                                         "has_close", "close_watched"],
}


def frame(world: World, trs: list[Transition]) -> pd.DataFrame:
    """One row per watched slot: the rating given and what the agent perceived of it."""
    rows = []
    for tr in trs:
        mean = world.profiles[tr.user].rating_mean or 3.5
        for s, r in tr.ratings.items():
            v = tr.views[s - 1]
            rows.append({"user": tr.user, "item": tr.items[s - 1], "rating": float(r),
                         "person_mean": mean, "item_mean": v.mean_rating or mean,
                         "close_rating": mean if v.close_rating is None else v.close_rating,
                         "has_close": float(v.close_rating is not None),
                         "close_watched": float(v.close_watched),
                         "likely": mean if v.likely_rating is None else v.likely_rating})
    return pd.DataFrame(rows)


def shrink_rows(world: World, frames: dict[str, pd.DataFrame], shrinks: list[float]
                ) -> list[dict]:
    """The kNN rating's RMSE on each page set at each shrinkage (history: the train ratings,
    without the items watched earlier in the same held-out session, which perception adds)."""
    hist, sim = world.histories, world.similarity
    rows = []
    for lam in shrinks:
        row = {"rater": f"item-kNN rating, shrink {lam:g}"}
        for part, df in frames.items():
            pred = [sim.knn_rating(i, hist.get(u, {}), lam)
                    for u, i in zip(df["user"], df["item"], strict=True)]
            row[part] = rmse(pred, df["rating"].to_numpy())
        rows.append(row)
    return rows


def rmse(pred, y) -> float:
    return float(np.sqrt(np.mean((np.clip(np.asarray(pred, float), 1, 5) - y) ** 2)))


def adapter_ratings(adapter: str, pages: list[Transition], world_model: bool,
                    cal: Calibration, rate: bool = True
                    ) -> tuple[list[float], list[dict[int, float]]]:
    """The adapter's expected rating of each watched slot after the human's action (none
    without ``rate``), and (with ``world_model``) the world model's expectations of every slot
    put into the prompt."""
    from agents.llm import load_lm
    from agents.scorer import Scorer

    scorer = Scorer(load_lm(adapter=adapter, device="cpu"), cache_size=256)
    plain = [tr.decision_input() for tr in pages]
    inputs = plain
    if world_model:  # 50 pages at a time, the scorer's cache emptied between them
        inputs = []
        for k in range(0, len(plain), 50):
            inputs += with_predictions(scorer, plain[k:k + 50], cal.wm_rating_cue)
            scorer.clear()
    if not rate:
        return [], [dict(i.predictions) for i in inputs]
    human = [tr.human_action() for tr in pages]
    out = rating_expectations(scorer, inputs, human, chunk=50, calibration=cal)
    return ([o[s] for tr, o in zip(pages, out, strict=True) for s in tr.ratings],
            [dict(i.predictions) for i in inputs] if world_model else [])


def expectation_rows(world: World, pages: list[Transition],
                     predictions: list[dict[int, float]]) -> list[list[str]]:
    """What the world model's expectations carry, beside the item-kNN rating the agent reads in
    its cues (the person's mean where it has none): a prompt line that is nearly the same for
    every slot of a page can tell the policy little about which item to watch."""
    raters = {"world model's expectation": [[p[s] for s in range(1, len(tr.items) + 1)]
                                            for tr, p in zip(pages, predictions, strict=True)]}
    means = [world.profiles[tr.user].rating_mean or 3.5 for tr in pages]
    raters["item-kNN rating as perceived"] = [
        [m if v.likely_rating is None else v.likely_rating for v in tr.views]
        for tr, m in zip(pages, means, strict=True)]
    watched = [int(s in tr.ratings) for tr in pages for s in range(1, len(tr.items) + 1)]
    y = np.asarray([r for tr in pages for r in tr.ratings.values()], float)
    rows = []
    for name, per_page in raters.items():
        flat = np.asarray([x for page in per_page for x in page], float)
        given = np.asarray([page[s - 1] for tr, page in zip(pages, per_page, strict=True)
                            for s in tr.ratings], float)
        rows.append([name, f"{rmse(given, y):.4f}", f"{np.corrcoef(given, y)[0, 1]:.4f}",
                     f"{np.mean([np.std(page) for page in per_page]):.4f}",
                     f"{roc_auc_score(watched, flat):.4f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="also rate with this adapter")
    ap.add_argument("--world-model", action="store_true",
                    help="the world model's expectations in the prompt (full agent)")
    ap.add_argument("--formats", default="trained",
                    help="comma list of trained (the format its calibration reads: the one "
                    "it was trained in unless refitted with --rating-format), cue, plain")
    ap.add_argument("--expectations-only", action="store_true",
                    help="with --world-model: only what its expectations carry, not the "
                    "adapter's own ratings")
    ap.add_argument("--pages", type=int, help="read the adapter on the first N test pages "
                    "with a watch only (default: all)")
    ap.add_argument("--shrinks", help="comma list: the kNN rating's RMSE at these shrinkages")
    args = ap.parse_args()
    formats = args.formats.split(",")
    if bad := sorted(set(formats) - {"trained", "cue", "plain"}):
        ap.error(f"--formats: unknown {', '.join(bad)} (from trained, cue, plain)")
    if args.adapter and not Path(args.adapter).is_dir():
        ap.error(f"--adapter {args.adapter}: no such folder")
    if args.expectations_only and not args.world_model:
        ap.error("--expectations-only needs --world-model")
    if args.pages is not None and args.pages < 1:
        ap.error(f"--pages {args.pages}: a number of pages >= 1")
    try:
        shrinks = [float(x) for x in args.shrinks.split(",")] if args.shrinks else []
    except ValueError:
        ap.error(f"--shrinks {args.shrinks}: a comma list of numbers >= 0")
    if any(x < 0 for x in shrinks):
        ap.error(f"--shrinks {args.shrinks}: a comma list of numbers >= 0")
    t0 = time.perf_counter()
    world = load_world()
    cfg = EvalConfig.of_preset("full")
    _, test = held_out_pages(world, cfg, "test")
    _, valid = held_out_pages(world, cfg, "valid")
    te, va = frame(world, test), frame(world, valid)
    y = te["rating"].to_numpy()
    rows, expectations = [], []
    for name, cols in GROUPS.items():
        fit = LinearRegression().fit(va[cols], va["rating"])
        rows.append({"rater": f"regression: {name}", "RMSE": rmse(fit.predict(te[cols]), y)})
    rows.append({"rater": "item-kNN rating as perceived (unfitted)",
                 "RMSE": rmse(te["likely"], y), "corr": float(np.corrcoef(te["likely"], y)[0, 1]),
                 "mean": float(te["likely"].mean()), "sd": float(te["likely"].std())})
    for name, pred in rating_predictions(world.split.train, te[["user", "item"]]).items():
        rows.append({"rater": name, "RMSE": rmse(pred, y)})
    rated = [t for t in test if t.ratings][:args.pages]
    y_rated = np.asarray([tr.ratings[s] for tr in rated for s in tr.ratings], float)
    on = f" (first {len(rated)} pages)" if args.pages else ""
    if args.adapter and args.expectations_only:
        _, expectations = adapter_ratings(args.adapter, rated, True,
                                          Calibration.of_checkpoint(args.adapter), rate=False)
    elif args.adapter:
        cal = Calibration.of_checkpoint(args.adapter)
        trained = cal.rating_cue
        for fmt in formats:
            cue = {"trained": trained, "cue": True, "plain": False}[fmt]
            # Tilt and sharpness were fitted in the calibrated format: another is read as it is.
            rates = (cal if cue == trained
                     else Calibration(rating_cue=cue, wm_rating_cue=cal.wm_rating_cue))
            tilt, sharp = rates.rating_tilt, rates.rating_sharpness
            pred, expectations = adapter_ratings(args.adapter, rated, args.world_model, rates)
            pred = np.asarray(pred)
            rows.append({"rater": f"adapter, {'cue' if cue else 'plain'}"
                                  f"{' (calibrated)' if cue == trained else ''}"
                                  f"{f', tilt {tilt:+.2f}' if tilt else ''}"
                                  f"{f', sharpness {sharp:.2f}' if sharp != 1 else ''}{on}",
                         "RMSE": rmse(pred, y_rated),
                         "corr": float(np.corrcoef(pred, y_rated)[0, 1]),
                         "mean": float(pred.mean()), "sd": float(pred.std())})
    cols = ["rater", "RMSE", "corr", "mean", "sd"]
    Console().print(table(
        f"{len(te)} held-out watched items of {len(test)} test pages, rated {y.mean():.2f} on "
        f"average (sd {y.std():.2f}; regressions fitted on the {len(va)} ratings of the same "
        f"users' validation pages, {va['rating'].mean():.2f} on average; train ratings "
        f"{world.split.train['rating'].mean():.2f})", cols,
        [[r["rater"], *(f"{r[c]:.4f}" if c in r else "" for c in cols[1:])] for r in rows]))
    if expectations:
        Console().print(table(
            f"The world model's expectations in the prompt, on the {len(rated)} test pages "
            "with a watch: error and correlation on the watched items, spread within a page, "
            "AUC of watched against skipped slots",
            ["rater", "RMSE", "corr", "sd within a page", "AUC watched"],
            expectation_rows(world, rated, expectations)))
    if shrinks:
        srows = shrink_rows(world, {"valid": va, "test": te}, shrinks)
        Console().print(table("The kNN rating's RMSE by shrinkage (choose on valid)",
                              ["rater", "valid", "test"],
                              [[r["rater"], f"{r['valid']:.4f}", f"{r['test']:.4f}"]
                               for r in srows]))
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
