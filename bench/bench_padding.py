"""Padded batches split where padding costs more than a forward, against batches as full as
the limits allow. A population of LLM agents (the shipped full agent, memory, the world
model, the interview; up to ``--concurrency`` agents in lockstep) runs once and its scorer
calls are recorded; the calls are then replayed on one fresh scorer per batching, call by
call, alternating which goes first, so every batching scores the same requests from the
same cache under the same machine load (whole runs of this shared machine differ by 15%).

    python bench/bench_padding.py [--agents 16] [--pages 5] [--rounds 3] [--concurrency 8]
        [--positions none,128] [--leaves]

``--positions``: what one more forward is taken to cost, in padded positions (``none``: the
fewest forwards; the CPU default is ``agents.scorer.CPU_FORWARD_POSITIONS``).
``--forward-cost`` only measures that cost: a forward's fixed work (one 4-token tree over a
500-token prefix) over the cost of a position (8 trees of 256 tokens against 8 of 128).
``--leaves`` replays the calls at the first ``--positions`` batching with the trees' leaves
pushed, as before commit 3b89790 (a leaf's row predicts nothing), and not pushed, as now.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from bench_population import console, population, table, timed

from agents.batching import BatchingScorer
from agents.llm import load_lm
from agents.packing import Trie
from agents.scorer import CPU_FORWARD_POSITIONS, Scorer
from alignuser.config import world_for

ADAPTER = "checkpoints/alignuser-ml100k"


def recorded(scorer: Scorer) -> list[list]:
    """Every ``score_many`` call ``scorer`` receives from now on, in order."""
    calls: list[list] = []
    inner = scorer.score_many

    def score_many(requests: Sequence) -> list[list[float]]:
        calls.append([(p, list(o)) for p, o in requests])
        return inner(requests)

    scorer.score_many = score_many  # type: ignore[method-assign]
    return calls


# How a replay scores: a forward's cost in positions (None: the fewest forwards), and whether
# the trees' leaves are pushed.
Mode = tuple[int | None, bool]


@contextmanager
def leaves_pushed(on: bool) -> Iterator[None]:
    """With ``on``, trees push every node, their leaves too (the rule before 3b89790)."""
    kept = Trie.__dict__["pushed"]
    if on:
        Trie.pushed = property(lambda trie: np.arange(len(trie.tokens)))  # type: ignore
    try:
        yield
    finally:
        Trie.pushed = kept  # type: ignore[method-assign]


def replay(lm, calls: list[list], modes: list[Mode], rounds: int) -> dict:
    """Seconds, positions, padding and forwards per mode over ``rounds`` replays."""
    out = {m: {"s": 0.0, "tokens": 0, "padding": 0, "forwards": 0} for m in modes}
    for r in range(rounds):
        scorers = {m: Scorer(lm, cache_size=32) for m in modes}
        for m, s in scorers.items():
            s.forward_positions = m[0]
        for k, call in enumerate(calls):
            for m in modes if (k + r) % 2 == 0 else modes[::-1]:
                with leaves_pushed(m[1]):
                    t0 = time.perf_counter()
                    scorers[m].score_many(call)
                    out[m]["s"] += time.perf_counter() - t0
        for m, s in scorers.items():
            for key in ("tokens", "padding", "forwards"):
                out[m][key] += getattr(s.stats, key)
    return {m: {k: v / rounds for k, v in row.items()} for m, row in out.items()}


def forward_cost(lm, reps: int = 5) -> tuple[float, float]:
    """Seconds of a forward's fixed work and of one more tree position (medians)."""
    scorer = Scorer(lm, cache_size=32)
    scorer.forward_positions = None
    letters = " ".join("abcdefghijklmnopqrstuvwxyz" * 20)

    def seconds(rows: int, width: int) -> float:
        reqs = [(f"{'hello ' * 500}{r}", [(letters[:2 * width], " yes")]) for r in range(rows)]
        scorer.score_many(reqs)  # the prefixes cached: only the trees are timed
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            scorer.score_many(reqs)
            times.append(time.perf_counter() - t0)
        return sorted(times)[reps // 2]

    per_position = (seconds(8, 256) - seconds(8, 128)) / (8 * 128)
    return seconds(1, 2) - 4 * per_position, per_position


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--pages", type=int, default=5, help="most pages per session")
    ap.add_argument("--rounds", type=int, default=3, help="replays of the recorded calls")
    ap.add_argument("--concurrency", type=int, default=8, help="agents in flight")
    ap.add_argument("--memory", choices=["chroma", "none"], default="chroma")
    ap.add_argument("--positions", default=f"none,{CPU_FORWARD_POSITIONS}",
                    help="comma list: none (fewest forwards) or a forward's cost in positions")
    ap.add_argument("--forward-cost", action="store_true",
                    help="only measure what a forward costs, in positions, and stop")
    ap.add_argument("--leaves", action="store_true",
                    help="at the first --positions batching, trees with their leaves pushed "
                    "(before) against not (now)")
    args = ap.parse_args()
    if min(args.agents, args.pages, args.rounds, args.concurrency) < 1:
        ap.error("--agents, --pages, --rounds and --concurrency must be at least 1")
    try:
        modes = [None if x.strip() == "none" else int(x) for x in args.positions.split(",")]
    except ValueError:
        modes = [-1]
    if any(m is not None and m < 0 for m in modes):
        ap.error(f"--positions {args.positions}: a comma list of none or integers >= 0")
    console.print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
                  f"load average {os.getloadavg()[0]:.2f}")
    lm = timed("model (merged adapter)", lambda: load_lm(adapter=ADAPTER))
    if args.forward_cost:
        fixed, position = forward_cost(lm)
        console.print(f"a forward's fixed work {fixed * 1e3:.0f} ms, a position "
                      f"{position * 1e3:.2f} ms: a forward costs {fixed / position:.0f} "
                      f"positions (the CPU default is {CPU_FORWARD_POSITIONS})")
        return
    world = world_for()
    users = world.sample_users(args.agents + 1, seed=1)
    population(world, users[:1], Scorer(lm), "aligned", 1, 1, args.memory)  # warm-up
    scorer = Scorer(lm, cache_size=2 * args.concurrency + 16)
    calls = recorded(scorer)
    run = timed("population", lambda: population(
        world, users[1:], BatchingScorer(scorer), "aligned", args.pages, args.concurrency,
        args.memory))
    pages = run.decisions
    console.print(f"{pages} pages, {len(calls)} scorer calls of "
                  f"{sum(len(c) for c in calls)} requests; the run itself {run.seconds:.1f} s")
    runs: list[Mode] = ([(modes[0], True), (modes[0], False)] if args.leaves
                        else [(m, False) for m in modes])
    rows = []
    for (m, leaves), r in timed("replays", lambda: replay(lm, calls, runs, args.rounds)).items():
        label = "fewest forwards" if m is None else f"split at {m}"
        if args.leaves:
            label += ", leaves pushed" if leaves else ", leaves not pushed"
        rows.append([label, f"{r['s']:.1f}",
                     f"{r['s'] / pages:.3f}", f"{r['tokens'] / pages:,.0f}",
                     f"{r['padding'] / max(r['tokens'], 1):.1%}",
                     f"{r['forwards'] / pages:.2f}"])
    console.print(table(
        f"{args.agents} agents x up to {args.pages} pages on pop, {args.concurrency} in flight, "
        f"memory {args.memory} ({lm.name}, {lm.dtype}); the calls replayed {args.rounds}x, "
        "means", ["batches", "scoring s", "s/page", "positions/page", "padding",
                  "forwards/page"], rows))


if __name__ == "__main__":
    main()
