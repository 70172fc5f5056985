"""Running populations of agent graphs and summarising their sessions.

Each (recommender, user) pair is one LangGraph thread, so every session can be traced and
replayed from the checkpointer. Candidate scoring is batched inside each decision (see
``agents.scorer.Scorer``); LLM agents run in a thread pool whose scorer calls meet in lockstep
batches across agents (``graph.engine``, ``agents.batching``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from graph.context import AgentContext
from graph.deps import AgentDeps
from graph.engine import default_concurrency, run_jobs
from simulator.sessions import SessionRecord, as_records


def thread_id(recommender: str, user: int) -> str:
    return f"{recommender}:{user}"


STEPS_PER_PAGE = 6
"""Super-steps one page costs: perceive, recall, predict, decide, act, remember."""


def recursion_limit(max_pages: int) -> int:
    """LangGraph's step budget for a session of ``max_pages`` pages.

    A fixed 200 killed long sessions with GraphRecursionError (``--pages 33`` needs
    6 * 33 + start + interview = 200 steps), so it grows with the pages; never below the old 200.
    """
    return max(200, STEPS_PER_PAGE * max_pages + 2 + 8)


def run_config(rt: AgentDeps, thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread},
            "recursion_limit": recursion_limit(rt.max_pages)}


def run_context(rt: AgentDeps) -> AgentContext:
    """The built dependencies travel in the run context: the nodes build nothing themselves."""
    return AgentContext(deps=rt)


def run_agent(app: Any, rt: AgentDeps, recommender: str, user: int) -> SessionRecord:
    thread = thread_id(recommender, user)
    state = app.invoke({"agent_id": thread, "user": user, "recommender": recommender},
                       run_config(rt, thread), context=run_context(rt))
    return SessionRecord(thread=thread, user=user, recommender=recommender,
                         pages=state["pages"], end=state.get("end"),
                         satisfaction=state.get("satisfaction"),
                         interview=state.get("interview", ""))


def run_population(app: Any, runtimes: Mapping[str, AgentDeps], users: Iterable[int],
                   progress: bool = True, concurrency: int | None = None,
                   finished: Mapping[str, SessionRecord] | None = None,
                   on_done: Callable[[SessionRecord], None] | None = None
                   ) -> list[SessionRecord]:
    """Every (recommender, user) session; ``concurrency`` agents in flight (default: 8 for LLM
    policies, whose scorer calls then meet in lockstep batches, 1 otherwise; see
    ``graph.engine``). Sessions come back in job order whatever the concurrency.

    Threads in ``finished`` (a resumed run's committed sessions) are not run again; ``on_done``
    sees each new session as it ends (from the agent's worker thread), so a run can commit it."""
    users = list(users)
    finished = finished or {}
    jobs = [(rec, u) for rec in runtimes for u in users]
    todo = [job for job in jobs if thread_id(*job) not in finished]

    def run_one(rec: str, user: int) -> SessionRecord:
        session = run_agent(app, runtimes[rec], rec, user)
        if on_done is not None:
            on_done(session)
        return session

    n = default_concurrency(runtimes) if concurrency is None else concurrency
    new = dict(zip(todo, run_jobs(run_one, runtimes, todo, n, progress), strict=True))
    return [finished.get(thread_id(*job)) or new[job] for job in jobs]


def session_metrics(sessions: Iterable[SessionRecord | Mapping[str, Any]]
                    ) -> dict[str, dict[str, float]]:
    """Per recommender: watch ratio, likes (rating >= 4) per page, mean exit page, the share of
    sessions that ended by exit, satisfaction, and the pages a policy answered with its default
    action (``Decision.fallback``)."""
    by_rec: dict[str, list[SessionRecord]] = {}
    for s in as_records(sessions):
        by_rec.setdefault(s.recommender, []).append(s)
    table = {}
    for rec, rows in by_rec.items():
        shown = sum(len(p.items) for s in rows for p in s.pages)
        ratings = [r for s in rows for r in s.ratings()]
        pages = sum(len(s.pages) for s in rows)
        sats = [s.satisfaction for s in rows if s.satisfaction is not None]
        table[rec] = {
            "sessions": len(rows),
            "watch_ratio": len(ratings) / shown if shown else 0.0,
            "likes_per_page": sum(r >= 4 for r in ratings) / pages if pages else 0.0,
            "exit_page": float(np.mean([len(s.pages) for s in rows])),
            "exit_share": float(np.mean([s.end == "exit" for s in rows])),
            "mean_rating": float(np.mean(ratings)) if ratings else float("nan"),
            "satisfaction": float(np.mean(sats)) if sats else float("nan"),
            "fallback_pages": sum(p.fallback is not None for s in rows for p in s.pages),
        }
    return table
