"""An adapter's 1:1 list ranking on the 200 evaluated users, beside the classical scorers and
other adapters, paired per user: quicker than a whole `alignuser evaluate` when only the lists
of one or two adapters are in question (e.g. one trained with ``--list-pages``).

    python bench/bench_list_scores.py score ADAPTER SAVE [--world-model] [--lists 200]
        [--offset-lists 40]
    python bench/bench_list_scores.py report NAME=SAVE [NAME=SAVE ...]

``score`` fits the adapter's list offset (its accuracy cut, as training's calibration fits
it) on the first ``--offset-lists`` of the 200 validation 1:1 lists the discrimination section
tunes the baselines' cuts on, so adapters compared here share one calibration set, then scores
the first ``--lists`` test 1:1 lists of the users an evaluation picks (seed 0). ``report``
prints per-user accuracy, F1 and AUC as ``evaluation.micro.discrimination`` computes them
(an agent says watch at calibrated log-odds >= 0, the baselines at their validation cut), and
each adapter minus every other method with a paired bootstrap CI.
"""

from __future__ import annotations

import argparse
import pickle
import time

import numpy as np
from bench_list_views import lists_of
from rich.console import Console
from rich.table import Table

from agents.browse import accuracy_offset, list_scores
from agents.decide import Calibration
from agents.llm import load_lm
from agents.scorer import Scorer
from agents.world import load_world
from evaluation.metrics import paired_diff_ci
from evaluation.micro import baseline_scorers, discrimination
from evaluation.sections import agent_scorer, validation_lists

BASELINES = ("popularity", "itemknn", "bpr", "ease", "feature regression")


def score(args: argparse.Namespace) -> None:
    world = load_world()
    cal, lm = Calibration.of_checkpoint(args.adapter), load_lm(adapter=args.adapter)

    def raw_scores(rows: list) -> list[np.ndarray]:
        """Uncalibrated watch log-odds (offset 0) of every item of ``rows``."""
        return list_scores(Scorer(lm, cache_size=4096), world.perceiver, world.personas,
                           world.histories, [(u, items) for u, items, _ in rows],
                           world_model=args.world_model, offset=0.0, calibration=cal)

    valid = validation_lists(world, 200, 0)[:args.offset_lists]
    t0 = time.perf_counter()
    offset = accuracy_offset(raw_scores(valid), [y for _, _, y in valid])
    print(f"list offset {offset:+.3f} on {len(valid)} validation lists "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = lists_of(world, "test", args.lists)
    t0 = time.perf_counter()
    raw = raw_scores(rows)
    print(f"{len(rows)} test lists in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(args.save, "wb") as f:
        pickle.dump({"adapter": args.adapter, "rows": rows, "raw": raw, "offset": offset}, f)


def report(args: argparse.Namespace) -> None:
    world = load_world()
    saved = {}
    for arg in args.saved:
        name, _, path = arg.partition("=")
        with open(path, "rb") as f:
            saved[name] = pickle.load(f)
    rows = next(iter(saved.values()))["rows"]
    if any([(u, list(i)) for u, i, _ in s["rows"]] != [(u, list(i)) for u, i, _ in rows]
           for s in saved.values()):
        raise SystemExit("error: the saved scores are of different lists")
    valid = validation_lists(world, 200, 0)
    methods = {k: v for k, v in baseline_scorers(world, valid, 0).items() if k in BASELINES}
    for name, s in saved.items():
        methods[name] = agent_scorer({1: rows}, {1: [np.asarray(x) + s["offset"]
                                                     for x in s["raw"]]})
    table, per = discrimination(methods, valid, {1: rows}, fixed=dict.fromkeys(saved, 0.0))
    users = [u for u, _, _ in rows]
    out = Table(title=f"{len(rows)} test 1:1 lists")
    for col in ("method", "accuracy", "F1", "AUC"):
        out.add_column(col)
    for r in table:
        out.add_row(r["method"], f"{r['accuracy']:.4f}", f"{r['f1']:.4f}", f"{r['auc']:.4f}")
    pairs = Table(title="paired per user, row minus versus (bootstrap 95% CI)")
    for col in ("method", "versus", "AUC", "F1"):
        pairs.add_column(col)
    for name in saved:
        for base in (b for b in methods if b != name):
            cells = []
            for k in ("auc", "f1"):
                d = paired_diff_ci([per[name][1][u][k] for u in users],
                                   [per[base][1][u][k] for u in users], 2000, 0)
                cells.append(f"{d['mean_diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
            pairs.add_row(name, base, *cells)
    console = Console()
    console.print(out)
    console.print(pairs)
    for name, s in saved.items():
        console.print(f"{name}: {s['adapter']}, list offset {s['offset']:+.3f}")


def up_to_200(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 200:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and 200")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score one adapter's lists and save them")
    s.add_argument("adapter")
    s.add_argument("save")
    s.add_argument("--world-model", action="store_true",
                   help="decide with the world model's expected ratings (the full agent)")
    s.add_argument("--lists", type=up_to_200, default=200, help="test lists (1-200)")
    s.add_argument("--offset-lists", type=up_to_200, default=40,
                   help="validation lists the offset is fitted on (1-200)")
    r = sub.add_parser("report", help="the saved scores beside the classical scorers")
    r.add_argument("saved", nargs="+", metavar="NAME=SAVE")
    args = ap.parse_args()
    (score if args.cmd == "score" else report)(args)


if __name__ == "__main__":
    main()
