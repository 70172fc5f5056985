"""Peak memory and wall time of scoring 1:1 test lists, by how many lists ``agents.browse``
decides per call (``--chunks``) and by the scorer's prefix-cache byte budget (``--cache-gb``).
Each setting runs in a fresh process, so its peak resident memory is its own; the scorer is the
evaluation's (``cache_size=2048``).

    python bench/bench_list_memory.py [--lists 100] [--chunks 256,64] [--cache-gb 4]
                                      [--adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench_population import table
from rich.console import Console

_ONE = """
import json, resource, sys, time
from agents.browse import browse, pages_of
from agents.llm import load_lm
from agents.scorer import Scorer
from agents.world import load_world
from evaluation.sections import pick

chunk, n, adapter, cache_gb = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
world = load_world()
users = pick([u for u, _, _ in world.lists("test", 1, None, 0)], n, 0)
rows = world.lists("test", 1, users, 0)
scorer = Scorer(load_lm(adapter=adapter, device="cpu"), cache_size=2048,
                cache_bytes=int(cache_gb * (1 << 30)))
t0 = time.perf_counter()
browse(scorer, world.perceiver, world.personas, world.histories,
       [(u, pages_of(items)) for u, items, _ in rows], world_model=False, exits=False,
       chunk=chunk)
print(json.dumps({"lists": len(rows), "seconds": time.perf_counter() - t0,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "tokens": scorer.stats.tokens}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lists", type=int, default=100, help="users of the evaluation's pick")
    ap.add_argument("--chunks", default="256,64", help="lists decided per call, comma-separated")
    ap.add_argument("--cache-gb", default="4", help="the scorer's prefix-cache budgets in GiB, "
                    "comma-separated (each run with every chunk size)")
    ap.add_argument("--adapter", default="checkpoints/sft-ml100k",
                    help="policy-only adapter (the world model is off)")
    args = ap.parse_args()
    rows = []
    for gb in args.cache_gb.split(","):
        for chunk in args.chunks.split(","):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _ONE, chunk, str(args.lists),
                                  args.adapter, gb], capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append([gb, chunk, str(got["lists"]), f"{got['seconds']:.0f}",
                         f"{got['tokens']:,}", f"{got['peak_gb']:.2f}",
                         f"{time.perf_counter() - t0:.0f}"])
    Console().print(table("1:1 test lists scored by the policy-only agent",
                          ["cache GiB", "lists per call", "lists", "scoring s", "tokens",
                           "peak RSS GB", "process s"], rows))


if __name__ == "__main__":
    main()
