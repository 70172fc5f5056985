"""`alignuser simulate --backend ray`: agents sharded over Ray actors.

Each actor builds one set of dependencies (data, recommenders, policy, model replica) from the
run's config and runs chunks of consecutive jobs, as many agents together as the local backend
keeps in flight (8 LLM agents, whose scorer calls meet in lockstep batches). A chunk's traces go
to a SQLite file of its own on the worker and come back with its sessions and their episodic
memories; the driver merges them into the run folder and commits the sessions, so a Ray run is
traced and resumable like a local one (a kill loses the chunks in flight, as a local kill loses
the agents in flight). Results are put back in job order, so the same seed gives the same
sessions as the local backend; in bf16 an LLM's scores move by the round-off of other
batches. Ray is imported only when asked for (``simulator.cluster``).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.batching import BatchStats
from agents.kvcache import ScorerStats
from alignuser.config import LLM_POLICIES, SimulateConfig
from graph.engine import PopulationProgress
from graph.runner import thread_id
from graph.trace import TRACE_FILE, open_checkpointer
from simulator.cluster import plan_actors, ray_cluster, use_threads
from simulator.sessions import SessionRecord

Job = tuple[str, int]  # (recommender, user)


class SimulateWorker:
    """One actor: the dependencies of every recommender, built once; a chunk of sessions per
    call, run as the local backend runs a population (``graph.engine.run_jobs``: LLM agents in
    flight together, their scorer calls met in lockstep batches)."""

    def __init__(self, config: dict[str, Any], users: list[int], threads: int) -> None:
        from alignuser.config import world_for
        from alignuser.simulate import build_runtimes, load_scorer
        from memory.store import make_memory

        use_threads(threads)
        self.cfg = SimulateConfig.model_validate(config)
        self.folder = Path(tempfile.mkdtemp(prefix="alignuser-ray-"))
        world = world_for(self.cfg.data)
        self.scorer, self.model_name = load_scorer(self.cfg)
        chroma = self.cfg.memory == "chroma"
        self.memory = make_memory(self.cfg.memory, self.folder / "memory" if chroma else None)
        self.runtimes = build_runtimes(self.cfg, world, users, self.scorer, self.memory)

    def describe(self) -> tuple[list[str], str | None, int]:
        """The recommenders' names, the model's and how many agents a chunk runs together."""
        from graph.engine import default_concurrency

        return list(self.runtimes), self.model_name, default_concurrency(self.runtimes)

    def run_chunk(self, jobs: list[tuple[str, int]]
                  ) -> tuple[list[dict[str, Any]], bytes, list[dict | None], dict[str, int]]:
        """The chunk's sessions (in job order), their traces database, their memories and
        what they cost the model (``counters``).

        The prefix cache starts empty, so a chunk's sessions depend on its jobs alone, not on
        the chunks this actor happened to run before: the same seed repeats a run exactly."""
        from graph.engine import default_concurrency, run_jobs
        from graph.graph import build_graph
        from graph.runner import run_agent

        if self.scorer is not None:
            self.scorer.clear()
        before = counters(self.scorer)
        job = Path(tempfile.mkdtemp(dir=self.folder))
        try:
            with open_checkpointer(job) as saver:
                app = build_graph(self.cfg.memory, self.cfg.world_model, checkpointer=saver)
                sessions = run_jobs(lambda rec, user: run_agent(app, self.runtimes[rec], rec,
                                                                user),
                                    self.runtimes, jobs, default_concurrency(self.runtimes),
                                    progress=False)
            traces = (job / TRACE_FILE).read_bytes()
        finally:
            shutil.rmtree(job, ignore_errors=True)
        export = getattr(self.memory, "export", None)
        after = counters(self.scorer)
        return ([s.json_form() for s in sessions], traces,
                [export(s.thread) if export else None for s in sessions],
                {k: after[k] - before[k] for k in after})


def counters(scorer: Any) -> dict[str, int]:
    """A lockstep scorer's forwards, tokens and batches so far (nothing without a model)."""
    if scorer is None:
        return {}
    stats, batches = scorer.stats, scorer.batches
    return {"forwards": stats.forwards, "tokens": stats.tokens, "flushes": batches.flushes,
            "requests": batches.requests, "timeouts": batches.timeouts}


@dataclass
class ActorsCost:
    """The actors' model costs summed, in the shape ``alignuser.simulate.scoring_cost`` reads
    off a local scorer."""

    stats: ScorerStats = field(default_factory=ScorerStats)
    batches: BatchStats = field(default_factory=BatchStats)

    def add(self, spent: dict[str, int]) -> None:
        for key in ("forwards", "tokens"):
            setattr(self.stats, key, getattr(self.stats, key) + spent[key])
        for key in ("flushes", "requests", "timeouts"):
            setattr(self.batches, key, getattr(self.batches, key) + spent[key])


def merge_traces(run_dir: Path, threads: list[str], traces: bytes) -> None:
    """Put one chunk's checkpoints into the run's trace database, replacing any of its
    threads."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / TRACE_FILE
        part.write_bytes(traces)
        with open_checkpointer(run_dir) as saver:
            saver.setup()
            for thread in threads:
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


def chunks(jobs: list[Job], actors: int, flight: int) -> list[list[Job]]:
    """Consecutive jobs, ``flight`` to a chunk (the agents an actor runs together), fewer when
    the jobs would otherwise leave actors idle."""
    size = max(1, min(flight, math.ceil(len(jobs) / max(actors, 1))))
    return [jobs[k:k + size] for k in range(0, len(jobs), size)]


def run_on_ray(cfg: SimulateConfig, users: list[int], run_dir: Path,
               finished: dict[str, SessionRecord], commit: Callable[[SessionRecord], None]
               ) -> tuple[list[SessionRecord], str | None, ActorsCost | None]:
    """Every session in job order, on the actors ``simulator.cluster.plan_actors`` places for
    ``cfg.concurrency`` on ``cfg.address`` (``simulator.cluster.ray_cluster``)."""
    from memory.store import make_memory

    with ray_cluster(cfg.address) as ray:
        from ray.util import ActorPool

        plan = plan_actors(ray, cfg.concurrency, len(cfg.recommenders) * len(users),
                           cfg.device if cfg.policy in LLM_POLICIES else "cpu")
        worker = ray.remote(num_cpus=plan.cpus, num_gpus=plan.gpus)(SimulateWorker)
        actors = [worker.remote(cfg.model_dump(mode="json"), users, plan.cpus)
                  for _ in range(plan.actors)]
        try:
            names, model_name, flight = ray.get(actors[0].describe.remote())
            jobs = [(rec, u) for rec in names for u in users]
            todo = [job for job in jobs if thread_id(*job) not in finished]
            memory = make_memory(cfg.memory,
                                 run_dir / "memory" if cfg.memory == "chroma" else None)
            new: dict[str, SessionRecord] = {}
            bar, cost = PopulationProgress(len(todo)), ActorsCost()
            for data, traces, memories, spent in ActorPool(actors).map_unordered(
                    lambda actor, chunk: actor.run_chunk.remote(chunk),
                    chunks(todo, plan.actors, flight)):
                sessions = [SessionRecord.model_validate(d) for d in data]
                if spent:
                    cost.add(spent)
                merge_traces(run_dir, [s.thread for s in sessions], traces)
                for session, kept in zip(sessions, memories, strict=True):
                    memory.reset(session.thread)
                    if kept is not None and hasattr(memory, "load"):
                        memory.load(kept)
                    commit(session)
                    new[session.thread] = session
                    bar.done(session)
            bar.close()
        finally:
            for actor in actors:
                ray.kill(actor)
    return ([finished.get(thread_id(*job)) or new[thread_id(*job)] for job in jobs], model_name,
            cost if model_name and cost.stats.forwards else None)
