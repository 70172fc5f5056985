"""The typed state that flows through an agent's graph, one page per loop.

Everything a trace needs to show (perception text, memories, predictions, scores, the chosen and
the human action) is in the state, so a checkpoint is a complete record of a super-step.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, NotRequired

# pydantic (LangGraph Server's schemas) needs typing_extensions' TypedDict before Python 3.12
from typing_extensions import TypedDict


class AgentState(TypedDict, total=False):
    agent_id: str
    user: int
    recommender: str
    persona_text: str
    page: int
    items: list[int]
    seen: list[int]
    session: list[tuple[int, int]]
    views: list[dict[str, Any]]
    page_text: str
    memories: list[str]
    predictions: dict[int, float]
    decision: dict[str, Any]
    human_action: dict[str, Any] | None
    done: bool
    end: str
    satisfaction: float
    interview: str
    pages: Annotated[list[dict[str, Any]], operator.add]


class AgentInput(TypedDict):
    """What starts a session: the user and the recommender they browse (``agent_id`` defaults
    to ``recommender:user``, the runner's thread name)."""

    user: int
    recommender: str
    agent_id: NotRequired[str]
