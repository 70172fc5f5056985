"""Ray, for the runners that shard work over a cluster (`simulate` and `evaluate` with
``--backend ray``). Ray is imported only here, and only when a run asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def ray_module() -> Any:
    """``ray``, or a one-line install hint when the extra is missing."""
    try:
        import ray
    except ImportError:
        raise ImportError("--backend ray needs Ray: pip install 'alignuser[ray]' "
                          "(or pip install 'ray>=2.9')") from None
    return ray


@contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """Joins ``address`` (or the cluster this process already joined), else starts a local
    cluster for the run and stops it after; yields ``ray``. The caller kills the actors it
    made (a joined cluster outlives the run)."""
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def actors_and_threads(ray: Any, wanted: int | None, jobs: int) -> tuple[int, int]:
    """How many actors (``wanted``, default one per free CPU of the cluster, never more than
    the jobs) and the CPUs each takes: the free CPUs shared among them. Each actor runs torch
    on that many threads (``ALIGNUSER_THREADS``); left to the model loader's default, each
    took every core of its machine and two actors on 2 cores ran at a third of one process."""
    cpus = int(ray.available_resources().get("CPU", 1)) or 1
    n = max(1, min(wanted or cpus, jobs))
    return n, max(1, cpus // n)


def use_threads(threads: int) -> None:
    """In an actor: its model runs on ``threads`` torch threads (read by ``agents.llm``)."""
    os.environ["ALIGNUSER_THREADS"] = str(threads)
