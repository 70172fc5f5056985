"""Pydantic configs for the commands, and the wiring that builds their parts from them.

The CLI flags map one to one onto these fields; each field's description is its help text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from graph.world import LLM_POLICIES, POLICIES, World, load_world, make_policy
from simulator.split import SplitConfig

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "alignuser-ml100k"
PolicyName = Literal["aligned", "zero_shot", "random", "popularity", "human_replay"]


class DataConfig(BaseModel):
    dataset: str = Field("ml-100k", description="ml-100k (bundled), ml-1m / ml-latest-small "
                         "(after `alignuser data fetch`), a RecBole atomic folder or a .zip")
    split: SplitConfig = Field(default_factory=SplitConfig, description="how held-out data is cut")


class SimulateConfig(BaseModel):
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and split")
    recommenders: list[str] = Field(["pop", "itemknn", "bpr"],
                                    description="recommenders the population browses")
    agents: int = Field(4, description="simulated users per recommender (sampled test users)")
    pages: int = Field(5, description="most pages per session")
    page_size: int = Field(4, description="items per page")
    policy: PolicyName = Field("aligned", description="decide-node policy")
    memory: Literal["chroma", "none"] = Field("chroma", description="recall node variant")
    world_model: Literal["on", "off"] = Field("on", description="predict node variant")
    model: str = Field("default", description="base causal LM: 'default' or a local HF folder")
    checkpoint: str | None = Field(
        str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.exists() else None,
        description="PEFT adapter for the aligned policy (default: the shipped checkpoint)")
    temperature: float = Field(1.0, description="sampling temperature of the policy")
    reactive: bool = Field(True, description="recommenders react to this session's watches")
    reason: bool = Field(False, description="generate a free-text interview reason (slower)")
    seed: int = Field(0, description="seeds user sampling and every sampled decision")


def world_for(data: DataConfig | None = None) -> World:
    data = data or DataConfig()
    return load_world(data.dataset, data.split)


__all__ = ["DataConfig", "SimulateConfig", "World", "world_for", "load_world", "make_policy",
           "LLM_POLICIES",
           "POLICIES"]
