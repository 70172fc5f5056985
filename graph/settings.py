"""The agent settings ``alignuser simulate`` and a LangGraph client's run context share.

Kept apart from ``graph.context`` so the builder of an agent's dependencies (``graph.build``)
takes its defaults from the same fields without an import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from agents.policy import DEFAULT_TEMPERATURE
from simulator.env import MAX_PAGES, PAGE_SIZE

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS / "alignuser-ml100k"


class AgentSettings(BaseModel):
    """How an agent browses and decides: the settings ``alignuser simulate`` and a LangGraph
    client's run context share, declared (with their defaults) only here."""

    pages: int = Field(MAX_PAGES, ge=1, description="most pages per session")
    page_size: int = Field(PAGE_SIZE, ge=1, description="items per page")
    model: str = Field("default", description="base causal LM: 'default' or a local HF folder")
    checkpoint: str | None = Field(
        str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.exists() else None,
        description="PEFT adapter for the aligned policy (default: the shipped checkpoint)")
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, allow_inf_nan=False,
                               description="sampling temperature of the policy")
    chat_model: str | None = Field(
        None, description="policy chat: PROVIDER:MODEL for LangChain's init_chat_model (e.g. "
        "ollama:llama3.1; the provider's package installed, its key and endpoint from its usual "
        "environment variables, never recorded) or pkg.module:factory returning a BaseChatModel")
    reactive: bool = Field(True, description="recommenders react to this session's watches")
    reason: bool = Field(False, description="generate a free-text interview reason (slower)")
    seed: int = Field(0, ge=0, description="seeds user sampling and every sampled decision")


def setting_default(name: str) -> Any:
    """A setting's declared default, for the functions that take it as a keyword."""
    return AgentSettings.model_fields[name].default
