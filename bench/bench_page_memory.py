"""Resident memory of evaluation's held-out page answers, phase by phase: the agent's decisions
(``decide_chunked``, 100 pages a call) and the expected ratings of the items the humans watched
(``rating_expectations``) in 100-page calls, then in one call over every page (as before it
was chunked). Per phase: resident memory at its start, its peak (sampled every 20 ms) and
seconds; and what the prefix cache holds at the end against its byte budget.

    python bench/bench_page_memory.py [--users 200] [--pages 600] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import psutil
from bench_population import peak_rss, table
from rich.console import Console

from agents.decide import Calibration, decide_chunked, rating_expectations
from agents.llm import load_lm
from agents.scorer import Scorer
from agents.world import load_world
from evaluation.sections import held_out, pick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=200, help="held-out users (evaluation's pick)")
    ap.add_argument("--pages", type=int, default=600, help="held-out pages (evaluation's pick)")
    ap.add_argument("--adapter", default="checkpoints/alignuser-ml100k",
                    help="full adapter; its world model's expected ratings are in the context")
    args = ap.parse_args()
    world = load_world()
    users = pick([u for u, _, _ in world.lists("test", 1, None, 0)], args.users, 0)
    _, trs = held_out(world, users)
    pages = [trs[i] for i in pick(range(len(trs)), args.pages, 0)]
    if not pages:
        ap.error("no held-out page: --users and --pages must be at least 1")
    scorer = Scorer(load_lm(adapter=args.adapter, device="cpu"), cache_size=2048)
    cal = Calibration.of_checkpoint(args.adapter)
    proc, rows = psutil.Process(), []

    def phase(name: str, run: Callable[[], Any]) -> Any:
        start, t0 = proc.memory_info().rss, time.perf_counter()
        with peak_rss() as peak_mib:
            out = run()
        rows.append([name, f"{start / 1e9:.2f}", f"{peak_mib[0] * 2**20 / 1e9:.2f}",
                     f"{time.perf_counter() - t0:.0f}", f"{scorer._cached_bytes / 1e9:.2f}"])
        return out

    inputs = [tr.decision_input(True) for tr in pages]
    decisions = phase("decide, 100 pages a call", lambda: decide_chunked(
        scorer, inputs, world_model=True, calibration=cal))
    inputs = [i.model_copy(update={"predictions": d.predictions})
              for i, d in zip(inputs, decisions, strict=True)]
    human = [tr.human_action() for tr in pages]
    phase("expected ratings, 100 pages a call",
          lambda: rating_expectations(scorer, inputs, human, chunk=100))
    phase("expected ratings, one call", lambda: rating_expectations(
        scorer, inputs, human, chunk=len(inputs)))
    Console().print(table(f"{len(pages)} held-out pages of {len(users)} users, the full agent, "
                          f"prefix cache budget {scorer.cache_bytes / 2**30:.0f} GiB",
                          ["phase", "RSS at start GB", "peak RSS GB", "s", "cache at end GB"],
                          rows))


if __name__ == "__main__":
    main()
