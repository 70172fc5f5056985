"""The agent's LangGraph state machine and the registry used to swap its nodes.

One page is one loop: perceive -> recall -> predict -> decide -> act -> remember ->
(perceive | interview -> END). ``recall`` and ``predict`` have ablation variants chosen by name,
when the graph is compiled or, left open, per run from the context (``graph.context``); the policy
inside ``decide`` is swapped in the run's dependencies (see ``graph.runner``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from graph import nodes
from graph.context import AgentContext, context_of
from graph.state import AgentInput, AgentState

VARIANTS: dict[str, dict[str, Callable[..., dict[str, Any]]]] = {
    "memory": {"chroma": nodes.recall, "none": nodes.recall_off},
    "world_model": {"on": nodes.predict, "off": nodes.predict_off},
}


def chosen_per_run(slot: str) -> Callable[..., dict[str, Any]]:
    """A node that runs the ``slot`` variant the run's context names."""

    def node(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        return VARIANTS[slot][getattr(context_of(runtime), slot)](state, runtime)

    return node


def build_graph(memory: str | None = None, world_model: str | None = None,
                checkpointer: Any = None):
    """Compile the agent graph; ``memory`` and ``world_model`` pick node variants by name, and
    None leaves the choice to each run's context (``AgentContext.memory``/``.world_model``)."""
    choice = {"memory": memory, "world_model": world_model}
    for slot, name in choice.items():
        if name is not None and name not in VARIANTS[slot]:
            raise ValueError(f"unknown {slot} variant {name!r}; known: {sorted(VARIANTS[slot])}")
    slot_node = {slot: chosen_per_run(slot) if name is None else VARIANTS[slot][name]
                 for slot, name in choice.items()}
    g = StateGraph(AgentState, context_schema=AgentContext, input_schema=AgentInput)
    g.add_node("start", nodes.start)
    g.add_node("perceive", nodes.perceive)
    g.add_node("recall", slot_node["memory"])
    g.add_node("predict", slot_node["world_model"])
    g.add_node("decide", nodes.decide)
    g.add_node("act", nodes.act)
    g.add_node("remember", nodes.remember)
    g.add_node("interview", nodes.interview)
    g.add_edge(START, "start")
    g.add_edge("start", "perceive")
    g.add_edge("perceive", "recall")
    g.add_edge("recall", "predict")
    g.add_edge("predict", "decide")
    g.add_edge("decide", "act")
    g.add_edge("act", "remember")
    g.add_conditional_edges("remember", nodes.route_after_remember)
    g.add_edge("interview", END)
    return g.compile(checkpointer=checkpointer)


graph = build_graph()
"""The graph LangGraph's own tools serve (see langgraph.json): node variants, policy and data
come from each run's context, whose defaults complete a run without a language model."""
