"""Does showing a 1:m list twice (as given, then reversed) and averaging each item's two watch
log-odds rank it better than one showing? An item's score depends on its page context (its
neighbours, what the agent watched on the list's earlier pages); two contexts average some of
that out (``agents.browse.list_scores(views=2)``, ``alignuser evaluate --list-views 2``).

    python bench/bench_list_views.py [--part valid|test] [--start 0] [--lists 128]
        [--adapter DIR] [--no-world-model] [--save FILE | --load FILE [FILE ...]]

``--start`` and ``--lists`` pick lists [start, start + lists) of the 200, so a long scoring can be
done in parts (each ``--save``d); ``--load`` with several files reports their lists together.

Validation lists are those the discrimination section tunes the baselines' cuts on (the
choice is made there); test lists are the evaluated users' (as ``alignuser evaluate``), where
the feature regression (fit on validation lists, its cut tuned there as evaluation tunes it)
is scored beside. Per-user AUC, F1 (the agent's cut: calibrated log-odds >= 0) and accuracy,
as ``evaluation.micro.discrimination`` computes them, with paired bootstrap CIs.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from agents.browse import list_scores
from agents.decide import Calibration
from agents.llm import load_lm
from agents.scorer import Scorer
from agents.world import World, load_world
from evaluation.metrics import paired_diff_ci
from evaluation.micro import baseline_scorers, discrimination
from evaluation.sections import agent_scorer, pick, validation_lists

SHIPPED = "checkpoints/alignuser-ml100k"
VIEWS = ("as given", "reversed", "two views (mean)")


def lists_of(world: World, part: str, n: int, seed: int = 0, start: int = 0) -> list:
    """1:1 lists ``start`` to ``start + n`` of the 200 users an evaluation picks (validation:
    the lists the discrimination section fits cuts on; test: the evaluated users')."""
    if part == "valid":
        return validation_lists(world, 200, seed)[start:start + n]
    users = pick([u for u, _, _ in world.lists("test", 1, None, seed)], 200, seed)
    return world.lists("test", 1, users, seed)[start:start + n]


def merged(parts: list[dict]) -> dict:
    """Scores saved in parts (``--save``), as one: their lists in the order given."""
    return {k: [x for p in parts for x in p[k]] for k in ("rows", "fwd", "rev")}


def score_views(world: World, rows: list, adapter: str, world_model: bool) -> dict:
    """Each list's log-odds as given and reversed (back in the list's order), one pass each."""
    cal = Calibration.of_checkpoint(adapter)
    lm = load_lm(adapter=adapter)
    out: dict = {"rows": rows}
    for name, flip in (("fwd", False), ("rev", True)):
        t0 = time.perf_counter()
        scores = list_scores(Scorer(lm, cache_size=4096), world.perceiver, world.personas,
                             world.histories,
                             [(u, list(items)[::-1] if flip else items) for u, items, _ in rows],
                             world_model=world_model, offset=cal.list_offset, calibration=cal)
        out[name] = [s[::-1] for s in scores] if flip else scores
        print(f"{name}: {len(rows)} lists in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def per_user(rows: list, methods: dict, valid: list) -> dict[str, dict[str, np.ndarray]]:
    """Each method's per-user AUC, F1 and accuracy on ``rows``, as evaluation scores them: the
    agent's views cut at 0, other scorers at their accuracy cut on ``valid``."""
    agents = [k for k in methods if k in VIEWS]
    _, got = discrimination(methods, valid, {1: rows}, fixed=dict.fromkeys(agents, 0.0))
    users = [u for u, _, _ in rows]
    return {name: {k: np.asarray([by_m[1][u][k] for u in users]) for k in ("auc", "f1",
                                                                           "accuracy")}
            for name, by_m in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("valid", "test"), default="valid")
    ap.add_argument("--start", type=int, default=0, help="first list scored (of the 200)")
    ap.add_argument("--lists", type=int, default=128, help="lists scored from --start")
    ap.add_argument("--adapter", default=SHIPPED)
    ap.add_argument("--world-model", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--save", type=Path, help="write the scores here (pickle)")
    ap.add_argument("--load", type=Path, nargs="+",
                    help="read scores written by --save (several: their lists together); "
                    "score nothing")
    args = ap.parse_args()
    if args.start < 0 or args.lists < 1 or args.start + args.lists > 200:
        ap.error("--start and --lists must pick lists within the 200")
    world = load_world()
    if args.load:
        res = merged([pickle.loads(f.read_bytes()) for f in args.load])
    else:
        res = score_views(world, lists_of(world, args.part, args.lists, start=args.start),
                          args.adapter, args.world_model)
        if args.save:
            args.save.write_bytes(pickle.dumps(res))
    rows = res["rows"]
    scores = dict(zip(VIEWS, (res["fwd"], res["rev"], [(a + b) / 2 for a, b in zip(
        res["fwd"], res["rev"], strict=True)]), strict=True))
    methods = {name: agent_scorer({1: rows}, {1: v}) for name, v in scores.items()}
    valid = []
    if args.part == "test":
        valid = lists_of(world, "valid", 200)
        methods["feature regression"] = baseline_scorers(world, valid)["feature regression"]
    got = per_user(rows, methods, valid)
    table = Table(title=f"{len(rows)} {args.part} 1:1 lists, per user (paired 95% CI vs "
                  "as given)")
    for col in ("scores", "AUC", "F1", "accuracy", "AUC - as given", "F1 - as given"):
        table.add_column(col, justify="right")
    base = got["as given"]
    for name, r in got.items():
        diffs = ["", ""] if name == "as given" else [
            "{mean_diff:+.4f} [{lo:+.4f}, {hi:+.4f}]".format(**paired_diff_ci(r[k], base[k]))
            for k in ("auc", "f1")]
        table.add_row(name, f"{r['auc'].mean():.4f}", f"{r['f1'].mean():.4f}",
                      f"{r['accuracy'].mean():.4f}", *diffs)
    Console().print(table)
    if args.part == "test":
        d = paired_diff_ci(got["two views (mean)"]["auc"], got["feature regression"]["auc"])
        print("AUC, two views - feature regression: {mean_diff:+.4f} [{lo:+.4f}, {hi:+.4f}]"
              .format(**d))


if __name__ == "__main__":
    main()
