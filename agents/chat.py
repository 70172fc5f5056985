"""Free-text completion behind one small protocol.

Decisions are scored, but interviews, reflection teachers and judges need free text; they take a
`TextModel` so the local model and any LangChain chat model (a larger teacher or judge) are
interchangeable without the callers knowing which one they hold.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from langchain_core.rate_limiters import InMemoryRateLimiter

from agents.llm import LM
from agents.scorer import Scorer


@runtime_checkable
class TextModel(Protocol):
    def complete(self, prompt: str, max_new_tokens: int) -> str: ...


class LocalTextModel:
    """Greedy generation with the local model, wrapped in its chat template so an instruct
    model sees the turn format it was tuned on."""

    def __init__(self, backend: Scorer | LM, system: str | None = None) -> None:
        self.scorer = backend if isinstance(backend, Scorer) else Scorer(backend)
        self.system = system

    def prompt_text(self, prompt: str) -> str:
        tokenizer = self.scorer.lm.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return prompt
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def complete(self, prompt: str, max_new_tokens: int = 128) -> str:
        return self.scorer.generate(self.prompt_text(prompt), max_new_tokens).strip()


class LangChainTextModel:
    """Any langchain-core chat model as a `TextModel`.

    The token budget is not forwarded: providers name it differently (``max_tokens``,
    ``max_output_tokens``, ``num_predict``), so set it when constructing the chat model.
    """

    def __init__(self, chat_model: BaseChatModel) -> None:
        self.chat_model = chat_model

    def complete(self, prompt: str, max_new_tokens: int = 128) -> str:
        reply = self.chat_model.invoke([HumanMessage(content=prompt)])
        return str(reply.text).strip()


def is_import_path(spec: str) -> bool:
    """``pkg.module:factory``: a dotted module, then a name. Provider names carry no dot, so
    ``ollama:llama3.1`` or ``openai:gpt-4o-mini`` go to ``init_chat_model`` instead."""
    module, sep, name = spec.partition(":")
    return bool(sep) and "." in module and name.isidentifier()


def chat_model(spec: str, rps: float | None = None, **kwargs: Any) -> BaseChatModel:
    """The one way a chat model is built from its spec, for the chat policy, teacher or judge.

    ``spec`` is ``PROVIDER:MODEL`` for LangChain's ``init_chat_model`` (its provider package
    installed, the API key and endpoint read from the provider's usual environment variables,
    so only the spec string is ever recorded) or ``pkg.module:factory``, a zero-argument
    callable returning a ``BaseChatModel``. ``rps`` caps requests per second across every
    caller sharing the model (LangChain's ``InMemoryRateLimiter``); ``kwargs`` go to
    ``init_chat_model`` (e.g. ``temperature``, ``base_url``).
    """
    limiter = None if rps is None else InMemoryRateLimiter(
        requests_per_second=rps, check_every_n_seconds=min(0.1, 0.5 / rps))
    if is_import_path(spec):
        if kwargs:
            raise ValueError(f"{spec}: options cannot be passed to a factory ({sorted(kwargs)})")
        module, _, name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"{spec}: {exc}") from exc
        model = factory()
        if not isinstance(model, BaseChatModel):
            raise ValueError(f"{spec} returned {type(model).__name__}, not a BaseChatModel")
        return model if limiter is None else model.model_copy(update={"rate_limiter": limiter})
    from langchain.chat_models import init_chat_model

    if limiter is not None:
        kwargs["rate_limiter"] = limiter
    try:
        return init_chat_model(spec, **kwargs)
    except ImportError as exc:  # the provider's package is missing; the message names it
        raise ValueError(f"{spec}: {exc}") from exc
