"""The policy registry and the builder of one recommender's agent dependencies.

The policy names are listed once, in ``PolicyName``; the CLI's choices, the configs and the
LangGraph run context read them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from agents.policy import FixedPolicy, LLMPolicy, Policy
from agents.world import World
from graph.deps import AgentDeps
from graph.settings import setting_default
from memory.store import NoMemory
from simulator.env import recommender_pages
from simulator.policies import HumanReplay, RandomPolicy, ScoreThreshold
from simulator.trajectories import first_visits, human_actions, logged_pages

LLMPolicyName = Literal["aligned", "zero_shot"]
"""The policies that score their actions with the agent's language model."""
PolicyName = Literal[LLMPolicyName, "random", "popularity", "human_replay", "chat"]
POLICIES: tuple[str, ...] = get_args(PolicyName)
LLM_POLICIES: tuple[str, ...] = get_args(LLMPolicyName)


def make_policy(name: str, world: World, scorer=None, seed: int = setting_default("seed"),
                temperature: float = setting_default("temperature"), human=None,
                calibration=None, chat=None) -> Policy:
    """A decide-node policy by name; LLM policies need a scorer over the right weights, the chat
    policy its ``agents.chat_policy.ChatPolicy`` (built once, so all runtimes share its model
    and rate limit)."""
    if name == "chat":
        if chat is None:
            raise ValueError("policy chat needs a chat model (--chat-model)")
        return chat
    if name in LLM_POLICIES:
        if scorer is None:
            raise ValueError(f"policy {name} needs a language model")
        return LLMPolicy(scorer, name=name, temperature=temperature, calibration=calibration)
    if name == "random":
        return FixedPolicy(RandomPolicy(seed=seed), "random")
    if name == "popularity":
        counts, threshold = world.popularity
        means = world.split.train.groupby("item")["rating"].mean().to_dict()
        return FixedPolicy(ScoreThreshold(lambda i: float(counts.get(i, 0)), threshold, means),
                           "popularity")
    if name == "human_replay":
        if human is None:
            raise ValueError("policy human_replay needs logged trajectories")
        return FixedPolicy(HumanReplay(human), "human_replay")
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")


def make_runtime(world: World, recommender: str, policy: str, scorer=None, memory=None, *,
                 users: list[int] | None = None, seed: int = setting_default("seed"),
                 temperature: float = setting_default("temperature"),
                 reactive: bool = setting_default("reactive"),
                 page_size: int = setting_default("page_size"),
                 max_pages: int = setting_default("pages"), reason_model=None,
                 calibration=None, chat=None) -> AgentDeps:
    """Everything one recommender's agents need, the defaults those of ``AgentSettings``.
    ``human_replay`` browses the logged pages of each user's first held-out visit; other
    policies browse the live recommender."""
    rec = world.recommender(recommender, reactive=reactive, seed=seed)
    pages, human, logged = recommender_pages(rec.rank), {}, None
    if policy == "human_replay":
        logged = first_visits(world.trajectories("test", recommender, users=users,
                                                 progress=False))
        pages, human = logged_pages(logged), human_actions(logged)
    return AgentDeps(perceiver=world.perceiver, histories=world.histories,
                     personas=world.personas, pages=pages,
                     policy=make_policy(policy, world, scorer, seed, temperature, logged,
                                        calibration, chat),
                     scorer=scorer, memory=memory or NoMemory(), human=human,
                     reason_model=reason_model, page_size=page_size, max_pages=max_pages,
                     seed=seed, wm_rating_cue=bool(calibration and calibration.wm_rating_cue))


def policy_scorer(policy: str, model: str, checkpoint: str | None, *, device: str = "auto",
                  hint: str = "set context.checkpoint or use policy zero_shot",
                  **scorer_options: Any) -> Any:
    """The scorer an LLM policy decides with (None for the other policies): the aligned policy
    over its adapter, zero_shot over the base model. A missing adapter is refused before any
    model loads; ``hint`` tells the caller's user how to name one."""
    if policy not in LLM_POLICIES:
        return None
    adapter = checkpoint if policy == "aligned" else None
    if policy == "aligned" and (adapter is None or not Path(adapter).exists()):
        raise FileNotFoundError(f"policy aligned needs an existing checkpoint, got {adapter}; "
                                f"{hint}")
    from agents.llm import load_lm
    from agents.scorer import Scorer

    return Scorer(load_lm(model, adapter=adapter, device=device), **scorer_options)
