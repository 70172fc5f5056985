"""The agent's LangGraph state machine and the registry used to swap its nodes.

One page is one loop: perceive -> recall -> predict -> decide -> act -> remember ->
(perceive | interview -> END). ``recall`` and ``predict`` have ablation variants chosen by name;
the policy inside ``decide`` is swapped in the runtime (see ``graph.runner``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langgraph.graph import END, START, StateGraph

from graph import nodes
from graph.state import AgentState

VARIANTS: dict[str, dict[str, Callable[..., dict[str, Any]]]] = {
    "memory": {"chroma": nodes.recall, "none": nodes.recall_off},
    "world_model": {"on": nodes.predict, "off": nodes.predict_off},
}


def build_graph(memory: str = "chroma", world_model: str = "on", checkpointer: Any = None):
    """Compile the agent graph; ``memory`` and ``world_model`` pick node variants by name."""
    choice = {"memory": memory, "world_model": world_model}
    for slot, name in choice.items():
        if name not in VARIANTS[slot]:
            raise ValueError(f"unknown {slot} variant {name!r}; known: {sorted(VARIANTS[slot])}")
    g = StateGraph(AgentState)
    g.add_node("start", nodes.start)
    g.add_node("perceive", nodes.perceive)
    g.add_node("recall", VARIANTS["memory"][memory])
    g.add_node("predict", VARIANTS["world_model"][world_model])
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
    g.add_conditional_edges("remember", nodes.route_after_remember,
                            {"perceive": "perceive", "interview": "interview"})
    g.add_edge("interview", END)
    return g.compile(checkpointer=checkpointer)


graph = build_graph()
"""The default graph, for LangGraph's own tools (see langgraph.json)."""
