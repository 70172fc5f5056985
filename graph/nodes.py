"""Graph nodes: small functions ``(state, runtime) -> partial update`` that call into the packages.

Each node finds its dependencies through LangGraph's ``Runtime`` (``graph.context.deps_of``).
Nodes hold no logic of their own beyond plumbing; routers are pure functions of the state.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from langgraph.runtime import Runtime

from agents import prompts
from agents.policy import DecisionInput, expected_value
from agents.text import (
    ItemView,
    memory_note,
    page_cues,
    page_prompt,
    page_rating_cues,
    session_summary,
)
from agents.world_model import expected_ratings
from graph.context import AgentContext, deps_of
from graph.deps import AgentDeps
from graph.state import AgentState
from simulator.env import Observation, PageAction, PageEnv
from simulator.sessions import PageRecord


def _deps(state: AgentState, runtime: Runtime[AgentContext]) -> AgentDeps:
    return deps_of(runtime, state["recommender"])


def _env(rt: AgentDeps) -> PageEnv:
    return PageEnv(rt.pages, rt.page_size, rt.max_pages)


def _history(rt: AgentDeps, state: AgentState) -> dict[int, float]:
    """Train history plus what was watched in this run's session: the agent's own evidence."""
    return {**rt.histories.get(state["user"], {}), **dict(state.get("session", []))}


def start(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """A client names only the user and recommender; the agent id defaults to the runner's
    thread name ``recommender:user``."""
    rt = _deps(state, runtime)
    user = state["user"]
    if user not in rt.personas:
        raise ValueError(f"user {user!r} has no persona: not a user of the dataset")
    obs = _env(rt).reset(user)
    return {"agent_id": state.get("agent_id") or f"{state['recommender']}:{user}",
            "page": 1, "items": obs.items, "seen": list(obs.items), "session": [],
            "persona_text": rt.personas[user], "done": False, "pages": []}


def perceive(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    rt = _deps(state, runtime)
    return {"views": [rt.perceiver.facts(i).model_dump(mode="json") for i in state["items"]]}


def recall(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    rt = _deps(state, runtime)
    views = rt.perceiver.with_evidence([ItemView(**v) for v in state["views"]],
                                       _history(rt, state))
    query = "; ".join(v.label() for v in views)
    # Only pages already acted on: the note about this page is written after it (remember), so
    # a replay from this page's checkpoint must not see it.
    memories = [m.text for m in rt.memory.recall(state["agent_id"], query, state["page"] - 1,
                                                 rt.memory_k)]
    return {"views": [v.model_dump(mode="json") for v in views], "memories": memories}


def recall_off(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """Ablation: public facts only, no personal evidence and no episodic memory."""
    return {"memories": []}


def predict(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    rt = _deps(state, runtime)
    text = page_text(state, rt)
    if rt.scorer is None:
        raise ValueError("world_model=on needs an LLM scorer; use world_model=off")
    prefix = prompts.prefix(state["persona_text"], text)
    cues = page_rating_cues([ItemView(**v) for v in state["views"]]) if rt.wm_rating_cue else None
    return {"page_text": text,
            "predictions": expected_ratings(rt.scorer, prefix, len(state["items"]), cues)}


def predict_off(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    return {"page_text": page_text(state, _deps(state, runtime)), "predictions": {}}


def page_text(state: AgentState, rt: AgentDeps) -> str:
    titles = {v["id"]: v["title"] for v in state["views"]}
    session = [(titles.get(i) or rt.perceiver.items[i].title, r)
               for i, r in state.get("session", [])]
    return page_prompt(state["page"], rt.max_pages, [ItemView(**v) for v in state["views"]],
                       session, state.get("memories", []))


def decide(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    rt = _deps(state, runtime)
    views = [ItemView(**v) for v in state["views"]]
    inp = DecisionInput(user=state["user"], page=state["page"], items=state["items"],
                        persona_text=state["persona_text"], page_text=state["page_text"],
                        predictions={int(k): v for k, v in state.get("predictions", {}).items()},
                        cues=page_cues(views), rating_cues=page_rating_cues(views),
                        seed=rt.seed, last=state["page"] >= rt.max_pages,
                        history=len(rt.histories.get(state["user"], {})))
    decision = rt.policy.decide(inp)
    human = rt.human.get((state["user"], state["page"]))
    return {"decision": decision.model_dump(mode="json"),
            "human_action": None if human is None else human.model_dump(mode="json")}


def act(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    rt = _deps(state, runtime)
    env = _env(rt)
    env.restore(Observation(user=state["user"], page=state["page"], items=state["items"],
                            session=state.get("session", []), max_pages=rt.max_pages),
                state.get("seen", []))
    action = PageAction.model_validate(state["decision"]["action"])
    obs, done, info = env.step(action)
    record = PageRecord(page=state["page"], items=state["items"], watched=action.watched,
                        then=action.then, watch_scores=state["decision"].get("watch_scores", {}),
                        fallback=state["decision"].get("fallback"),
                        human=state.get("human_action"))
    update: dict[str, Any] = {"pages": [record.model_dump(mode="json")], "done": done,
                              "session": obs.session}
    if done:
        update["end"] = info.get("end", "exit")
    else:
        update |= {"page": obs.page, "items": obs.items,
                   "seen": list(state.get("seen", [])) + list(obs.items)}
    return update


def remember(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    rt = _deps(state, runtime)
    last = PageRecord.model_validate(state["pages"][-1])
    titles = {v["id"]: v["title"] for v in state["views"]}
    note = memory_note(last.page, [(titles[i], r) for i, r in last.watched.items()],
                       [titles[i] for i in last.items if i not in last.watched], last.then)
    rt.memory.add(state["agent_id"], note, last.page)
    return {}


def route_after_remember(state: AgentState) -> Literal["perceive", "interview"]:
    return "interview" if state.get("done") else "perceive"


def interview(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """Post-session satisfaction 1–10, scored as an enumerated answer; a free-text reason only
    when a text model is configured (the one place free text is allowed)."""
    rt = _deps(state, runtime)
    watched = [r for p in state["pages"] for r in PageRecord.model_validate(p).watched.values()]
    facts = {"persona": state["persona_text"],
             "session": session_summary(len(state["pages"]), watched)}
    if rt.scorer is None:
        likes = sum(r >= 4 for r in watched)
        return {"satisfaction": float(np.clip(1 + round(9 * likes / max(len(state["pages"]), 1)
                                                        / 2), 1, 10)),
                "interview": "no language model: satisfaction from likes per page"}
    options = [(prompts.SATISFACTION_TAIL, prompts.satisfaction_option(k)) for k in range(1, 11)]
    # The expectation, not its rounding: an untrained interview keeps its mass on a few
    # answers, and rounding would hide how the answer moves with the session.
    score = round(expected_value(rt.scorer.score(prompts.SATISFACTION.format(**facts), options),
                                 range(1, 11)), 2)
    reason = (rt.reason_model.complete(prompts.INTERVIEW.format(**facts), 40)
              if rt.reason_model else "")
    return {"satisfaction": score, "interview": reason.strip()}
