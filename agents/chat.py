"""Free-text completion behind one small protocol.

Decisions are scored, but interviews, reflection teachers and judges need free text; they take a
`TextModel` so the local model and any LangChain chat model (a larger teacher or judge) are
interchangeable without the callers knowing which one they hold.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage

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
