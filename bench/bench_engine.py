"""Cost of the decision engine on 1:m lists: forwards, token positions and seconds per 20-item
list, one list alone vs lists decided in lockstep: the full agent (world model on), or the
policy-only agent with ``--no-world-model``.

    python bench/bench_engine.py [--lists 1,8] [--adapter DIR] [--no-world-model]
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from agents.browse import list_scores
from agents.llm import load_lm
from agents.scorer import Scorer
from agents.world import load_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lists", default="1,8")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--world-model", action=argparse.BooleanOptionalAction, default=True,
                    help="ask the world model for each slot's expected rating first")
    args = ap.parse_args()
    world = load_world()
    pool = world.lists("test", 1, None, 0)
    lm = load_lm(adapter=args.adapter)
    agent = "full agent" if args.world_model else "policy only"
    table = Table(title=f"{agent}, 20-item 1:1 lists, {lm.device} {lm.dtype}")
    for col in ("lists in lockstep", "forwards/list", "tokens/list", "s/list"):
        table.add_column(col, justify="right")
    for n in (int(x) for x in args.lists.split(",")):
        scorer = Scorer(lm, cache_size=4096)
        rows = [(u, items) for u, items, _ in pool[:n]]
        t0 = time.perf_counter()
        list_scores(scorer, world.perceiver, world.personas, world.histories, rows,
                    world_model=args.world_model)
        dt = time.perf_counter() - t0
        st = scorer.stats
        table.add_row(str(n), f"{st.forwards / n:.1f}", f"{st.tokens / n:,.0f}", f"{dt / n:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
