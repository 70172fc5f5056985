"""Pydantic configs for the commands, and the wiring that builds their parts from them.

The CLI flags map one to one onto these fields; each field's description is its help text.
The bounds live here (``ge=`` and validators), not in argparse, so a bad flag is refused before
any data or model loads and the same rules hold for configs read back from run manifests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from agents.world import World, load_world
from alignuser.flags import DATASET_HELP
from graph.build import LLM_POLICIES, POLICIES, PolicyName, make_policy
from graph.settings import CHECKPOINTS, DEFAULT_CHECKPOINT, AgentSettings
from simulator.custom import SPEC_HELP as SPECS
from simulator.custom import check_recommenders
from simulator.recommenders import RECOMMENDERS
from simulator.split import SplitConfig
from simulator.trajectories import TrajectoryConfig

# The shipped adapters per set of weights: the full agent and its two training ablations.
SHIPPED = {"full": DEFAULT_CHECKPOINT, "sft": CHECKPOINTS / "sft-ml100k",
           "wm_policy": CHECKPOINTS / "wm-policy-ml100k"}


class DataConfig(BaseModel):
    dataset: str = Field("ml-100k", description=DATASET_HELP)
    split: SplitConfig = Field(default_factory=SplitConfig, description="how held-out data is cut")
    trajectories: TrajectoryConfig = Field(
        default_factory=TrajectoryConfig, description="how human page trajectories are rebuilt "
        "(exposure mixture of the filler slots, items per page, seed)")


def known_recommenders(names: list[str]) -> list[str]:
    """Refuse an empty or unknown name up front: it would otherwise fail after data loads.

    Built-in names are case-insensitive; a ``module:attribute`` spec is imported and a ranking
    file's header read here (``simulator.custom``), so a typo costs seconds, not a run."""
    return check_recommenders(names)


class SimulateConfig(AgentSettings):
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and split")
    recommenders: list[str] = Field(["pop", "itemknn"],
                                    description="recommenders the population browses: " + SPECS)
    agents: int = Field(50, ge=1, description="simulated users per recommender (sampled test "
                        "users; the default 50 on each of 2 recommenders took 6 min on a 2-core "
                        "CPU with native bf16, 21 min without: README)")
    policy: PolicyName = Field("aligned", description="decide-node policy")
    memory: Literal["chroma", "none"] = Field("chroma", description="recall node variant")
    world_model: Literal["on", "off"] = Field("on", description="predict node variant")
    chat_retries: int = Field(2, ge=0, description="policy chat: times an invalid answer or a "
                              "failed call is asked again before the page gets the default "
                              "action (watch nothing, next)")
    chat_rps: float | None = Field(None, gt=0, allow_inf_nan=False, description="policy chat: "
                                   "most requests per second to the chat model (default: no cap)")
    chat_concurrency: int = Field(4, ge=1, description="policy chat: most requests in flight "
                                  "when pages are decided in a batch")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the language model runs: auto (CUDA when present), cpu, cuda")
    concurrency: int | None = Field(
        None, ge=1, description="agents in flight; LLM agents' scorer calls are batched across "
        "them (default: 8 for LLM policies, 1 otherwise). A batch waits for every agent in flight "
        "and runs in text order, so a run repeats exactly at any one concurrency; in bf16 "
        "another concurrency batches otherwise and moves scores by round-off")
    backend: Literal["local", "ray"] = Field(
        "local", description="where agents run: local (this process) or ray (shards of agents on "
        "--concurrency Ray actors, by default one per free CPU of the cluster, or per free GPU "
        "where the model runs on CUDA, each with its own copy of the data and model; needs the "
        "'ray' extra)")
    address: str | None = Field(
        None, description="backend ray: the cluster to join (ray://HOST:10001, auto, or an "
        "address); default: a local cluster started for the run")

    _recommenders = field_validator("recommenders")(known_recommenders)

    @model_validator(mode="after")
    def _chat_needs_model(self) -> SimulateConfig:
        if self.policy == "chat" and not self.chat_model:
            raise ValueError("policy chat needs --chat-model PROVIDER:MODEL (e.g. ollama:llama3.1) "
                             "or pkg.module:factory")
        return self


class OfflineConfig(BaseModel):
    """``alignuser recommenders eval``: offline ranking metrics on the valid and test splits."""

    data: DataConfig = Field(default_factory=DataConfig, description="dataset and split")
    recommenders: list[str] = Field(list(RECOMMENDERS),
                                    description="recommenders to score: " + SPECS)
    k: int = Field(10, ge=1, description="cut-off of the ranking metrics")
    seed: int = Field(0, ge=0, description="seeds the random recommender and model training")

    _recommenders = field_validator("recommenders")(known_recommenders)


class DataInfoConfig(BaseModel):
    """``alignuser data info``: what is printed beside the counts, splits and hashes."""

    trajectories: bool = Field(False, description="also build human trajectories and print their "
                               "statistics and the signal check (each perceived cue's AUC on "
                               "training pages vs validation lists)")
    signal_users: int = Field(150, ge=1, description="train users sampled for the signal check")


def world_for(data: DataConfig | None = None) -> World:
    data = data or DataConfig()
    return load_world(data.dataset, data.split, data.trajectories)


__all__ = ["DataConfig", "DataInfoConfig", "OfflineConfig", "SimulateConfig", "World",
           "world_for", "load_world", "make_policy", "LLM_POLICIES", "POLICIES"]
