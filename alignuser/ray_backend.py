"""`alignuser simulate --backend ray`: agents sharded over Ray actors.

Each actor builds one set of dependencies (data, recommenders, policy, model replica) from the
run's config and runs whole sessions, one per job. A session's traces go to a SQLite file of
its own on the worker and come back with the session, with its episodic memories; the driver
merges them into the run folder and commits the session, so a Ray run is traced and resumable
like a local one. Results are put back in job order, so the same seed gives the same sessions as
the local backend. Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignuser.config import SimulateConfig
from graph.runner import thread_id
from graph.trace import TRACE_FILE, open_checkpointer
from simulator.sessions import SessionRecord


class SimulateWorker:
    """One actor: the dependencies of every recommender, built once; one session per call."""

    def __init__(self, config: dict[str, Any], users: list[int]) -> None:
        from alignuser.config import world_for
        from alignuser.simulate import build_runtimes, load_scorer
        from memory.store import make_memory

        self.cfg = SimulateConfig.model_validate(config)
        self.folder = Path(tempfile.mkdtemp(prefix="alignuser-ray-"))
        world = world_for(self.cfg.data)
        scorer, self.model_name = load_scorer(self.cfg)
        chroma = self.cfg.memory == "chroma"
        self.memory = make_memory(self.cfg.memory, self.folder / "memory" if chroma else None)
        self.runtimes = build_runtimes(self.cfg, world, users, scorer, self.memory)

    def recommenders(self) -> tuple[list[str], str | None]:
        return list(self.runtimes), self.model_name

    def run(self, recommender: str, user: int) -> tuple[dict[str, Any], bytes, dict | None]:
        """The session, its traces database and its memories."""
        from graph.engine import trim_heap
        from graph.graph import build_graph
        from graph.runner import run_agent

        job = Path(tempfile.mkdtemp(dir=self.folder))
        try:
            with open_checkpointer(job) as saver:
                app = build_graph(self.cfg.memory, self.cfg.world_model, checkpointer=saver)
                session = run_agent(app, self.runtimes[recommender], recommender, user)
            traces = (job / TRACE_FILE).read_bytes()
        finally:
            shutil.rmtree(job, ignore_errors=True)
            trim_heap()  # as the local runner does after every agent
        export = getattr(self.memory, "export", None)
        memories = export(thread_id(recommender, user)) if export else None
        return session.json_form(), traces, memories


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("--backend ray needs Ray: pip install 'alignuser[ray]' "
                          "(or pip install 'ray>=2.9')") from None
    return ray


def merge_traces(run_dir: Path, thread: str, traces: bytes) -> None:
    """Put one job's checkpoints into the run's trace database, replacing any of that thread."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / TRACE_FILE
        part.write_bytes(traces)
        with open_checkpointer(run_dir) as saver:
            saver.setup()
            saver.delete_thread(thread)
            conn = saver.conn
            conn.execute("ATTACH DATABASE ? AS job", (str(part),))
            try:
                with conn:
                    for table in ("checkpoints", "writes"):
                        cols = ", ".join(r[1] for r in conn.execute(
                            f"PRAGMA job.table_info({table})"))
                        conn.execute(f"INSERT INTO main.{table} ({cols}) "
                                     f"SELECT {cols} FROM job.{table}")
            finally:
                conn.execute("DETACH DATABASE job")


def run_on_ray(cfg: SimulateConfig, users: list[int], run_dir: Path,
               finished: dict[str, SessionRecord], commit: Callable[[SessionRecord], None]
               ) -> tuple[list[SessionRecord], str | None]:
    """Every session in job order; ``cfg.concurrency`` actors (default: the cluster's CPUs).

    Joins ``cfg.address`` (or the cluster this process already joined), else starts a local
    one for the run and stops it after."""
    from memory.store import make_memory

    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False)
    actors: list[Any] = []
    try:
        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        n = max(1, min(cfg.concurrency or cpus, len(cfg.recommenders) * len(users)))
        worker = ray.remote(num_cpus=1)(SimulateWorker)
        actors = [worker.remote(cfg.model_dump(mode="json"), users) for _ in range(n)]
        names, model_name = ray.get(actors[0].recommenders.remote())
        jobs = [(rec, u) for rec in names for u in users]
        todo = [job for job in jobs if thread_id(*job) not in finished]
        memory = make_memory(cfg.memory, run_dir / "memory" if cfg.memory == "chroma" else None)
        new: dict[str, SessionRecord] = {}
        from ray.util import ActorPool

        pool = ActorPool(actors)
        for data, traces, memories in pool.map_unordered(
                lambda actor, job: actor.run.remote(*job), todo):
            session = SessionRecord.model_validate(data)
            merge_traces(run_dir, session.thread, traces)
            memory.reset(session.thread)
            if memories is not None and hasattr(memory, "load"):
                memory.load(memories)
            commit(session)
            new[session.thread] = session
        return [finished.get(thread_id(*job)) or new[thread_id(*job)] for job in jobs], model_name
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
