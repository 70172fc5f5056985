"""Speed of agent populations on this machine with the real model (SmolLM2-135M + the shipped
adapter, merged): agents one after another (naive) vs agents in a thread pool whose scorer calls
meet in lockstep batches; wall time and peak RSS as the population grows; tokens/s against the
two-part page bound of ``bench_roofline.py``; the merged vs the unmerged adapter. Writes one PNG.

    python bench/bench_population.py [--agents 1,8] [--llm-pages 1] [--sizes 10,30,100]
        [--memory chroma|none]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from bench_roofline import page_bound
from rich.console import Console
from rich.table import Table

from agents.batching import BatchingScorer
from agents.llm import load_lm
from agents.scorer import Scorer
from alignuser.config import SimulateConfig, World, world_for
from alignuser.simulate import build_runtimes
from graph.graph import build_graph
from graph.runner import run_population
from memory.store import make_memory

ADAPTER = "checkpoints/alignuser-ml100k"
console = Console()


@dataclass
class Run:
    agents: int
    seconds: float
    decisions: int
    peak_rss_mb: float
    forwards: int = 0
    tokens: int = 0
    flush_size: float = 0.0

    @property
    def rate(self) -> float:
        return self.decisions / self.seconds


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""
    proc, stop = psutil.Process(), threading.Event()
    peak = [proc.memory_info().rss]

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = [0.0]
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out[0] = peak[0] / 2**20


def population(world: World, users: list[int], scorer: Any, policy: str, pages: int,
               concurrency: int, memory: str = "none") -> Run:
    cfg = SimulateConfig(policy=policy, recommenders=["pop"], memory=memory, pages=pages,
                         world_model="on" if scorer is not None else "off", seed=0,
                         checkpoint=ADAPTER)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_memory(cfg.memory, Path(tmp) if memory == "chroma" else None)
        runtimes = build_runtimes(cfg, world, users, scorer, store)
        app = build_graph(cfg.memory, cfg.world_model)
        return _timed_run(app, runtimes, users, scorer, concurrency)


def _timed_run(app: Any, runtimes: Any, users: list[int], scorer: Any, concurrency: int) -> Run:
    stats = getattr(scorer, "stats", None)
    before = (stats.forwards, stats.tokens) if stats else (0, 0)
    with peak_rss() as rss:
        t0 = time.perf_counter()
        sessions = run_population(app, runtimes, users, progress=False, concurrency=concurrency)
        dt = time.perf_counter() - t0
    run = Run(len(users), dt, sum(len(s.pages) for s in sessions), rss[0])
    if stats:
        run.forwards, run.tokens = stats.forwards - before[0], stats.tokens - before[1]
    if isinstance(scorer, BatchingScorer) and scorer.batches.flushes:
        run.flush_size = scorer.batches.requests / scorer.batches.flushes
    return run


def forward_seconds(model: Any, batch: int = 2, length: int = 256, reps: int = 3) -> float:
    ids = torch.randint(100, 40000, (batch, length))
    with torch.inference_mode():
        model(input_ids=ids[:, :16], logits_to_keep=1)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def table(title: str, cols: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    console.print(f"[dim]{label}: {time.perf_counter() - t0:.1f} s[/dim]")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", default="1,8", help="LLM agents in flight to compare")
    ap.add_argument("--llm-pages", type=int, default=1, help="most pages per LLM session")
    ap.add_argument("--sizes", default="10,30,100", help="non-LLM population sizes")
    ap.add_argument("--llm-sizes", default="", help="extra LLM population sizes (batched)")
    ap.add_argument("--memory", choices=["chroma", "none"], default="chroma",
                    help="the LLM agents' recall node, as `alignuser simulate --memory`")
    ap.add_argument("--png", default="bench/bench_population.png")
    args = ap.parse_args()
    t_start = time.perf_counter()
    console.print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
                  f"load average {os.getloadavg()[0]:.2f}")
    world = timed("world", world_for)
    timed("world warm-up", lambda: (world.personas, world.perceiver, world.histories))
    lm = timed("model (merged adapter)", lambda: load_lm(adapter=ADAPTER))
    counts = [int(x) for x in args.agents.split(",")]
    users = world.sample_users(max(counts + [int(x) for x in args.llm_sizes.split(",") if x])
                               + 1, seed=1)
    warm, users = users[:1], users[1:]
    mem = args.memory
    population(world, warm, Scorer(lm), "aligned", 1, 1, mem)  # recommender and kernels warm

    # (a) naive vs batched
    naive, batched = {}, {}
    for n in counts:
        naive[n] = timed(f"naive {n}", lambda n=n: population(
            world, users[:n], Scorer(lm, cache_size=64), "aligned", args.llm_pages, 1, mem))
        if n > 1:
            batched[n] = timed(f"batched {n}", lambda n=n: population(
                world, users[:n], BatchingScorer(Scorer(lm, cache_size=2 * n + 16)), "aligned",
                args.llm_pages, n, mem))
        else:
            batched[n] = naive[n]
    console.print(table(
        f"(a) LLM agents ({lm.name}, {lm.dtype}, memory {mem}, {args.llm_pages} page(s) + "
        "interview each)",
        ["agents", "naive decisions/s", "batched decisions/s", "speed-up", "requests/flush",
         "forwards/page naive", "forwards/page batched", "tokens/page naive",
         "tokens/page batched"],
        [[str(n), f"{naive[n].rate:.3f}", f"{batched[n].rate:.3f}",
          f"{batched[n].rate / naive[n].rate:.2f}x", f"{batched[n].flush_size:.1f}",
          f"{naive[n].forwards / naive[n].decisions:.1f}",
          f"{batched[n].forwards / batched[n].decisions:.1f}",
          f"{naive[n].tokens / naive[n].decisions:,.0f}",
          f"{batched[n].tokens / batched[n].decisions:,.0f}"] for n in counts]))

    # (b) wall time and peak RSS as the population grows
    grow = [("random (no LLM), 5 pages", n, timed(f"random {n}", lambda n=n: population(
        world, world.sample_users(n, seed=2), None, "random", 5, 1)))
        for n in (int(x) for x in args.sizes.split(","))]
    llm_runs = {n: batched[n] for n in counts}
    for n in (int(x) for x in args.llm_sizes.split(",") if x):
        llm_runs[n] = timed(f"LLM {n}", lambda n=n: population(
            world, users[:n], BatchingScorer(Scorer(lm, cache_size=32)), "aligned",
            args.llm_pages, 8, mem))
    grow += [(f"aligned LLM, memory {mem}, batched, {args.llm_pages} page(s)", n, r)
             for n, r in sorted(llm_runs.items())]
    rows = [[kind, str(n), f"{r.seconds:.1f}", f"{r.peak_rss_mb:,.0f}", f"{r.rate:.2f}"]
            for kind, n, r in grow]
    for kind in dict.fromkeys(k for k, _, _ in grow):
        pts = [(n, r) for k, n, r in grow if k == kind]
        n, r = pts[-1]
        rows.append([kind, "1000 (extrapolated)", f"{r.seconds / n * 1000:.0f}", "-", "-"])
    console.print(table("(b) population size: wall time and peak RSS of the process",
                        ["policy", "agents", "wall s", "peak RSS MB", "decisions/s"], rows))

    # (c) tokens/s against the two-part bound of bench_roofline (weights + attention)
    bound = page_bound(lm.model, lm.dtype)
    rows = []
    for label, r in [("naive", naive[counts[-1]]), ("batched", batched[counts[-1]])]:
        tps = r.tokens / r.seconds
        rows.append([f"{label}, {r.agents} agents", f"{tps:,.0f}",
                     f"{bound.tokens_per_s:,.0f}", f"{100 * tps / bound.tokens_per_s:.0f}%"])
    console.print(table(f"(c) token positions/s vs the page bound (weights at {bound.lin:.0f} "
                        f"GFLOP/s, attention at {bound.att:.0f}; bench/bench_roofline.py)",
                        ["run", "tokens/s", "bound tokens/s", "% of the bound"], rows))

    # (d) the merged adapter vs the PEFT wrapper
    merged = forward_seconds(lm.model)
    unmerged_lm = load_lm(adapter=ADAPTER, merge=False)
    unmerged = forward_seconds(unmerged_lm.model)
    console.print(table("(d) one forward, 2 x 256 tokens (median of 3)",
                        ["adapter", "seconds", "speed-up"],
                        [["PEFT (unmerged)", f"{unmerged:.3f}", "1.00x"],
                         ["merged", f"{merged:.3f}", f"{unmerged / merged:.2f}x"]]))
    plot(Path(args.png), counts, naive, batched, grow)
    console.print(f"PNG: {args.png}; total {time.perf_counter() - t_start:.0f} s, "
                  f"load average {os.getloadavg()[0]:.2f}")


def plot(path: Path, counts: list[int], naive: dict[int, Run], batched: dict[int, Run],
         grow: list[tuple[str, int, Run]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(counts))
    a.bar([i - 0.2 for i in x], [naive[n].rate for n in counts], 0.4, label="naive")
    a.bar([i + 0.2 for i in x], [batched[n].rate for n in counts], 0.4, label="batched")
    a.set_xticks(list(x), [str(n) for n in counts])
    a.set_xlabel("LLM agents in flight")
    a.set_ylabel("decisions/s")
    a.legend()
    for kind in dict.fromkeys(k for k, _, _ in grow):
        pts = [(n, r.seconds) for k, n, r in grow if k == kind]
        b.plot(*zip(*pts, strict=True), marker="o", label=kind)
    b.set_xlabel("agents")
    b.set_ylabel("wall s")
    b.set_xscale("log")
    b.set_yscale("log")
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
