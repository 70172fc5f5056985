"""An offline chat model for the chat-policy tests, importable as ``tests.fake_chat:factory``.

``ScriptedChatModel`` answers each call with what its ``answer`` function returns for the
conversation: a dict becomes a structured-output tool call, a string plain text, an exception is
raised. ``bind_tools`` returns the model itself, which is all ``with_structured_output`` needs.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field, PrivateAttr

Answer = dict[str, Any] | str | Exception


class ScriptedChatModel(BaseChatModel):
    answer: Callable[[list[BaseMessage]], Answer]
    delay: float = 0.0
    tool_name: str = "ChatPageAnswer"  # the structured-output schema its dict answers fill
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    peak_in_flight: int = 0
    _in_flight: int = PrivateAttr(0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        with self._lock:
            self.calls.append(list(messages))
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            time.sleep(self.delay)
            out = self.answer(list(messages))
        finally:
            with self._lock:
                self._in_flight -= 1
        if isinstance(out, Exception):
            raise out
        if isinstance(out, str):
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=out))])
        call = {"name": self.tool_name, "args": out, "id": f"call-{len(self.calls)}"}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="",
                                                                        tool_calls=[call]))])


def page_number(messages: Sequence[BaseMessage]) -> int:
    """The page a conversation asks about, read from the rendered page text."""
    found = re.search(r"Page (\d+) of at most", str(messages[1].content))
    assert found, "the page text is not in the first user message"
    return int(found.group(1))


def watch_first(messages: Sequence[BaseMessage]) -> Answer:
    """Watch [1], rate it 4 and go on: a fixed answer whose effect on a session is checkable."""
    return {"watched": [{"slot": 1, "rating": 4}], "then": "next"}


def factory() -> ScriptedChatModel:
    return ScriptedChatModel(answer=watch_first)


def teacher_factory() -> ScriptedChatModel:
    """A free-text model, as the reflection teacher uses one."""
    return ScriptedChatModel(answer=lambda m: "They like thrillers.\nThe rest looked dull.")


def not_a_model() -> str:
    return "not a chat model"
