"""What the training pages can teach, by how much history a visit needs
(``TrainConfig.min_history``): a logistic regression on the perceived cues, fit on train-page
slots, scored on validation 1:1 lists. ``python bench/bench_signal.py [--users 400]
[--min-history 0,1,3,5,10,20]``."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from agents.world import load_world
from evaluation.signal import page_regression


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=400, help="train users sampled")
    ap.add_argument("--min-history", default="0,1,3,5,10,20",
                    help="comma-separated thresholds to compare")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    world = load_world()
    table = page_regression(world, users=args.users, seed=args.seed,
                            min_histories=[int(x) for x in args.min_history.split(",")])
    out = Table(title=f"regression fit on train pages ({table.attrs['users']} users) -> "
                      f"{table.attrs['lists']} validation 1:1 lists; the match cue alone: "
                      f"{table.attrs['match_alone']:.3f}")
    for col in ("earlier ratings >=", "visits", "slots", "validation list AUC"):
        out.add_column(col, justify="right")
    for r in table.itertuples():
        out.add_row(str(r.min_history), f"{r.visits:,}", f"{r.slots:,}", f"{r.valid_list_auc:.3f}")
    Console().print(out)


if __name__ == "__main__":
    main()
