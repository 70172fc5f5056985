"""Running populations of agent graphs and summarising their sessions.

Each (recommender, user) pair is one LangGraph thread, so every session can be traced and
replayed from the checkpointer. Candidate scoring is batched inside each decision (see
``agents.scorer.Scorer``); agents run one after another on a machine this size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from graph.context import AgentContext
from graph.deps import AgentDeps


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


def run_agent(app: Any, rt: AgentDeps, recommender: str, user: int) -> dict[str, Any]:
    thread = thread_id(recommender, user)
    state = app.invoke({"agent_id": thread, "user": user, "recommender": recommender},
                       run_config(rt, thread), context=run_context(rt))
    return {"thread": thread, "user": user, "recommender": recommender,
            "pages": state["pages"], "end": state.get("end"),
            "satisfaction": state.get("satisfaction"), "interview": state.get("interview", "")}


def run_population(app: Any, runtimes: Mapping[str, AgentDeps], users: Iterable[int],
                   progress: bool = True) -> list[dict[str, Any]]:
    users = list(users)
    jobs = [(rec, u) for rec in runtimes for u in users]
    out = []
    for rec, user in tqdm(jobs, desc="agents", unit="session", disable=not progress):
        out.append(run_agent(app, runtimes[rec], rec, user))
    return out


def session_metrics(sessions: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per recommender: watch ratio, likes (rating >= 4) per page, mean exit page, satisfaction,
    and the pages a policy answered with its default action (``Decision.fallback``)."""
    by_rec: dict[str, list[Mapping[str, Any]]] = {}
    for s in sessions:
        by_rec.setdefault(s["recommender"], []).append(s)
    table = {}
    for rec, rows in by_rec.items():
        shown = sum(len(p["items"]) for s in rows for p in s["pages"])
        ratings = [r for s in rows for p in s["pages"] for r in p["watched"].values()]
        pages = sum(len(s["pages"]) for s in rows)
        sats = [s["satisfaction"] for s in rows if s.get("satisfaction") is not None]
        table[rec] = {
            "sessions": len(rows),
            "watch_ratio": len(ratings) / shown if shown else 0.0,
            "likes_per_page": sum(r >= 4 for r in ratings) / pages if pages else 0.0,
            "exit_page": float(np.mean([len(s["pages"]) for s in rows])),
            "mean_rating": float(np.mean(ratings)) if ratings else float("nan"),
            "satisfaction": float(np.mean(sats)) if sats else float("nan"),
            "fallback_pages": sum(p.get("fallback") is not None for s in rows
                                  for p in s["pages"]),
        }
    return table
