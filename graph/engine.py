"""Running many agent sessions at once on one machine.

Agents run in a pool of threads; when their runtimes share a ``agents.batching.BatchingScorer``
the pool's workers are registered with it, so the agents' scorer calls meet in lockstep batches
(one batched forward for N agents' pages). Non-LLM agents gain nothing from threads (pure
Python holds the GIL), so their default is one at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from graph.deps import AgentDeps
from simulator.sessions import SessionRecord

LLM_CONCURRENCY = 8
"""Agents in flight for LLM policies: enough to fill a batched forward on a CPU; more only adds
padding and memory (see bench/bench_engine.py)."""

Job = tuple[str, int]  # (recommender, user)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def trim_heap() -> bool:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``); False where there is none.

    A batched forward runs on whichever agent thread completes the batch, so KV caches of
    ever-changing sizes are allocated and freed across glibc's per-thread arenas; the freed
    pieces stay resident, and without a trim a population's memory creeps up by megabytes per
    agent. Called once per finished agent; it costs milliseconds."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) >= 0)


def default_concurrency(runtimes: Mapping[str, AgentDeps]) -> int:
    """LLM agents batch their forwards across agents; chat-model agents wait on requests, so as
    many run as the chat policy lets requests be in flight; other policies gain nothing."""
    if any(rt.scorer is not None for rt in runtimes.values()):
        return LLM_CONCURRENCY
    chat = [getattr(rt.policy, "max_concurrency", 0) for rt in runtimes.values()]
    return max([1, *chat])


def batchers(runtimes: Mapping[str, AgentDeps]) -> list[Any]:
    """The distinct lockstep scorers the runtimes share (see ``agents.batching``)."""
    found: dict[int, Any] = {}
    for rt in runtimes.values():
        if rt.scorer is not None and hasattr(rt.scorer, "enter"):
            found[id(rt.scorer)] = rt.scorer
    return list(found.values())


class PopulationProgress:
    """Agents done, decisions (pages) per second and the ETA, on one tqdm bar."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, desc="agents", unit="agent", disable=not enabled)
        self.t0, self.decisions = time.perf_counter(), 0
        self._lock = threading.Lock()

    def done(self, session: SessionRecord) -> None:
        with self._lock:
            self.decisions += len(session.pages)
            rate = self.decisions / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:.2f} decisions/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_jobs(run_one: Callable[[str, int], SessionRecord], runtimes: Mapping[str, AgentDeps],
             jobs: Sequence[Job], concurrency: int, progress: bool = True
             ) -> list[SessionRecord]:
    """``run_one`` over the jobs with ``concurrency`` agents in flight; results in job order.

    Each worker counts as one participant of every shared batcher until it runs out of jobs,
    so a batch is flushed once every worker still running is waiting on the scorer."""
    bar = PopulationProgress(len(jobs), progress)
    out: list[SessionRecord | None] = [None] * len(jobs)
    try:
        if concurrency <= 1 or len(jobs) <= 1:
            for k, (rec, user) in enumerate(jobs):
                out[k] = run_one(rec, user)
                bar.done(out[k])
                trim_heap()
            return [s for s in out if s is not None]
        workers = min(concurrency, len(jobs))
        shared = batchers(runtimes)
        lock, next_job, failed = threading.Lock(), iter(range(len(jobs))), threading.Event()

        def worker() -> None:
            try:
                while not failed.is_set():
                    with lock:
                        k = next(next_job, None)
                    if k is None:
                        return
                    out[k] = run_one(*jobs[k])
                    bar.done(out[k])
                    trim_heap()
            except BaseException:
                failed.set()
                raise
            finally:
                for b in shared:
                    b.leave()

        for b in shared:
            b.enter(workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="agent") as pool:
            futures = [pool.submit(worker) for _ in range(workers)]
            for f in futures:
                f.result()
        return [s for s in out if s is not None]
    finally:
        bar.close()
