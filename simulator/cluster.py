"""Ray, for the runners that shard work over a cluster (`simulate` and `evaluate` with
``--backend ray``). Ray is imported only here, and only when a run asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple


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


class ActorPlan(NamedTuple):
    """How a run's actors share the cluster."""

    actors: int
    cpus: int  # each; its torch runs on that many threads
    gpus: float  # each: 0 on CPUs; 1, or a share where more actors than GPUs are wanted


def plan_actors(ray: Any, wanted: int | None, jobs: int, device: str = "cpu") -> ActorPlan:
    """``wanted`` actors, never more than the jobs; by default one per free GPU of the cluster
    when the model runs on CUDA (``device`` cuda, or auto on a cluster with GPUs), else one
    per free CPU. The free CPUs are shared among them, each actor's torch on its share (left
    to the model loader's default, each took every core of its machine, and two actors on 2
    cores ran at a third of one process's speed), and so are the GPUs when more actors than
    GPUs are wanted (Ray places fractional GPUs)."""
    free = ray.available_resources()
    cpus, gpus = int(free.get("CPU", 1)) or 1, int(free.get("GPU", 0))
    cuda = device == "cuda" or (device == "auto" and gpus > 0)
    if cuda and not gpus:
        raise ValueError("--device cuda, but the Ray cluster has no free GPU")
    n = max(1, min(wanted or (gpus if cuda else cpus), jobs))
    return ActorPlan(n, max(1, cpus // n), min(1.0, gpus / n) if cuda else 0.0)


def use_threads(threads: int) -> None:
    """In an actor: its model runs on ``threads`` torch threads (read by ``agents.llm``)."""
    os.environ["ALIGNUSER_THREADS"] = str(threads)
