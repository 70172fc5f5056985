"""What the nodes call into, built once per run configuration and handed to them in the run's
context (``graph.context.AgentContext.deps``), never global."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agents.perception import Perceiver
from agents.policy import OptionScorer, Policy
from graph.settings import setting_default
from memory.store import EpisodicMemory, NoMemory
from simulator.env import PageAction, PageSource

if TYPE_CHECKING:
    from agents.chat import TextModel


@dataclass
class AgentDeps:
    """One recommender's agents' dependencies. Named apart from LangGraph's own ``Runtime``,
    which carries this object to the nodes inside the run context."""

    perceiver: Perceiver
    histories: Mapping[int, Mapping[int, float]]
    personas: Mapping[int, str]
    pages: PageSource
    policy: Policy
    scorer: OptionScorer | None = None
    memory: EpisodicMemory = field(default_factory=NoMemory)
    reason_model: TextModel | None = None
    human: Mapping[tuple[int, int], PageAction] = field(default_factory=dict)
    page_size: int = setting_default("page_size")
    max_pages: int = setting_default("pages")
    seed: int = setting_default("seed")
    memory_k: int = 3
    wm_rating_cue: bool = False  # the world model rates after each slot's rating cue
