"""The run context of the agent graph (LangGraph's ``context_schema``) and the process-wide
builder that turns a context into the nodes' dependencies.

Two kinds of caller run the graph. The project's runner builds ``AgentDeps`` once per recommender
and passes them in ``AgentContext.deps``, so its runs load nothing. A LangGraph client (``langgraph
dev``, Studio, the SDK) can only send plain JSON, so it names the settings instead and the nodes
resolve them through ``BUILDER``: the world is loaded once per process, and the models and
dependencies once per distinct setting.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from langgraph.runtime import Runtime
from pydantic import ConfigDict, Field, InstanceOf, field_validator
from pydantic.json_schema import SkipJsonSchema

from agents.world import World, load_world
from graph.build import POLICIES, make_runtime, policy_scorer
from graph.deps import AgentDeps
from graph.settings import AgentSettings
from memory.store import EpisodicMemory, Memory, NoMemory, make_memory


def settings_deps(world: World, recommender: str, settings: AgentSettings, policy: str,
                  scorer: Any, memory: Any, *, chat: Any = None,
                  users: list[int] | None = None) -> AgentDeps:
    """One recommender's dependencies from the shared settings, for ``alignuser simulate`` and
    for client runs alike: the interview's text model and the checkpoint's validation-fitted
    offsets, so simulate, evaluate, trace and a Studio run decide alike."""
    reason_model = None
    if settings.reason and scorer is not None:
        from agents.chat import LocalTextModel

        reason_model = LocalTextModel(scorer.lm)
    from agents.decide import Calibration

    calibration = Calibration.of_checkpoint(settings.checkpoint) if policy == "aligned" else None
    return make_runtime(world, recommender, policy, scorer, memory, users=users,
                        seed=settings.seed, temperature=settings.temperature,
                        reactive=settings.reactive, page_size=settings.page_size,
                        max_pages=settings.pages, reason_model=reason_model,
                        calibration=calibration, chat=chat)


class AgentContext(AgentSettings):
    """What one run of the agent graph is given; every field but ``deps`` is plain JSON."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("ml-100k", description="dataset the agents' world is built from")
    policy: str = Field("popularity", description="decide-node policy (popularity needs no "
                        "language model, so a run completes in seconds)",
                        json_schema_extra={"enum": list(POLICIES)})
    memory: Literal["chroma", "none"] = Field("none", description="recall node variant")
    world_model: Literal["on", "off"] = Field("off", description="predict node variant (on "
                                              "needs an LLM policy: aligned or zero_shot)")
    memory_dir: str | None = Field(None, description="folder Chroma memory persists to "
                                   "(default: a temporary folder for this process)")
    deps: SkipJsonSchema[InstanceOf[AgentDeps] | None] = Field(
        None, exclude=True, repr=False,
        description="already-built dependencies (in-process runs); when set, the settings "
        "above are not read")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
        return name

    def settings(self) -> tuple[tuple[str, Hashable], ...]:
        """The JSON settings as a cache key."""
        return tuple(sorted(self.model_dump(exclude={"deps"}).items()))


class DepsBuilder:
    """Builds and keeps what client runs need, each part once per distinct setting.

    Server runs execute nodes on worker threads, so building happens under one (re-entrant)
    lock; a dependency already built is returned without it."""

    def __init__(self, load: Callable[[str], World] = load_world) -> None:
        self._load = load
        self._lock = threading.RLock()  # a build builds its parts
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._tmp: Path | None = None

    def _once(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if (hit := self._cache.get(key)) is not None:
            return hit
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    def world(self, dataset: str) -> World:
        return self._once(("world", dataset), lambda: self._load(dataset))

    def scorer(self, ctx: AgentContext) -> Any:
        """The LLM scorer of an LLM policy (None for the others), loaded as ``alignuser
        simulate`` loads it; a missing checkpoint is refused on every call, never cached."""
        return self._once(("scorer", ctx.policy, ctx.model, ctx.checkpoint),
                          lambda: policy_scorer(ctx.policy, ctx.model, ctx.checkpoint))

    def chat(self, ctx: AgentContext) -> Any:
        """The chat policy of ``policy: chat``, one model per spec shared by every thread."""
        if ctx.policy != "chat":
            return None
        if not ctx.chat_model:
            raise ValueError("policy chat needs context.chat_model (PROVIDER:MODEL or "
                             "pkg.module:factory)")

        def build() -> Any:
            from agents.chat import chat_model
            from agents.chat_policy import ChatPolicy

            return ChatPolicy(chat_model(ctx.chat_model))

        return self._once(("chat", ctx.chat_model), build)

    def memory(self, ctx: AgentContext) -> EpisodicMemory:
        if ctx.memory == "none":
            return make_memory("none")
        with self._lock:
            if ctx.memory_dir is None and self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="alignuser-memory-"))
        folder = Path(ctx.memory_dir) if ctx.memory_dir else self._tmp
        return self._once(("memory", str(folder)), lambda: make_memory("chroma", folder))

    def deps(self, ctx: AgentContext, recommender: str) -> AgentDeps:
        def build() -> AgentDeps:
            return settings_deps(self.world(ctx.dataset), recommender, ctx, ctx.policy,
                                 self.scorer(ctx), self.memory(ctx), chat=self.chat(ctx))

        return self._once(("deps", recommender, ctx.settings()), build)


@dataclass(frozen=True)
class ThreadMemory:
    """One client thread's view of a shared store: a new thread is a new session that recalls
    nothing, while re-running a thread from a checkpoint recalls what that thread wrote."""

    inner: EpisodicMemory
    thread: str

    def _id(self, agent_id: str) -> str:
        return f"{self.thread}/{agent_id}"

    def add(self, agent_id: str, text: str, step: int, meta: dict | None = None) -> None:
        self.inner.add(self._id(agent_id), text, step, meta)

    def add_many(self, agent_id: str, texts: Sequence[str], steps: Sequence[int],
                 metas: Sequence[dict | None] | None = None) -> None:
        self.inner.add_many(self._id(agent_id), texts, steps, metas)

    def recall(self, agent_id: str, query: str, step: int, k: int = 3) -> list[Memory]:
        return self.inner.recall(self._id(agent_id), query, step, k)

    def reset(self, agent_id: str) -> None:
        self.inner.reset(self._id(agent_id))

    def count(self, agent_id: str | None = None) -> int:
        return self.inner.count(None if agent_id is None else self._id(agent_id))


BUILDER = DepsBuilder()
"""The process's builder: a server loads each world and model once for all its runs."""


def context_of(runtime: Runtime[AgentContext]) -> AgentContext:
    """The run's context; a client run sent without one gets the defaults."""
    return runtime.context if runtime.context is not None else AgentContext()


def deps_of(runtime: Runtime[AgentContext], recommender: str) -> AgentDeps:
    """The nodes' dependencies: the ones passed in, else built from the context's settings,
    with memory kept apart per thread (a run without a thread shares the process's)."""
    ctx = context_of(runtime)
    if ctx.deps is not None:
        return ctx.deps
    deps = BUILDER.deps(ctx, recommender)
    thread = runtime.execution_info.thread_id if runtime.execution_info else None
    if thread is None or isinstance(deps.memory, NoMemory):
        return deps
    return replace(deps, memory=ThreadMemory(deps.memory, thread))
