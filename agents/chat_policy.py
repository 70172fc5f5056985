"""Any LangChain chat model as the decide-node policy, answering each page in structured form.

Scored policies (``agents.policy.LLMPolicy``) cannot produce an invalid action; a chat model can,
so its answer is parsed into ``ChatPageAnswer`` (``with_structured_output``) and then checked
against the page it answers. An invalid answer or a failed call is asked again, up to
``retries`` times with the error shown to the model, and then the page gets the default action
(watch nothing, ``fallback_then``) with the reason in ``Decision.fallback``: a misbehaving or
unreachable model degrades its sessions, never the population run.

Pages are answered in batches (``decide_many``: one ``Runnable.batch`` per round, at most
``max_concurrency`` requests in flight); the request rate is capped on the chat model itself
(``agents.chat.chat_model(spec, rps=...)``). Chat answers are not seeded: ``DecisionInput.seed``
is ignored, so reruns agree only as far as the provider is deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Self

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import Runnable
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from agents import prompts
from agents.policy import Decision, DecisionInput
from agents.text import render_predictions
from simulator.env import PageAction

log = logging.getLogger(__name__)


class SlotRating(BaseModel):
    slot: int = Field(description=prompts.CHAT_SLOT)
    rating: int = Field(ge=1, le=5, description=prompts.CHAT_RATING)


class ChatPageAnswer(BaseModel):
    """A chat model's answer to one page, by slot ([1]..[n]) as the page text names items.

    Validated with ``context={"slots": n}`` it also refuses slots that are not on an n-item page;
    a slot named twice is always refused."""

    model_config = ConfigDict(json_schema_extra={"description": prompts.CHAT_ANSWER})
    watched: list[SlotRating] = Field(default_factory=list, description=prompts.CHAT_WATCHED)
    then: Literal["next", "exit"] = Field(description=prompts.CHAT_THEN)

    @model_validator(mode="after")
    def _fits_page(self, info: ValidationInfo) -> Self:
        slots = [w.slot for w in self.watched]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a movie is named more than once: {slots}")
        n = (info.context or {}).get("slots")
        off = [s for s in slots if n is not None and not 1 <= s <= n]
        if off:
            raise ValueError(f"{', '.join(f'[{s}]' for s in off)} not on this page (it shows "
                             f"[1] to [{n}])")
        return self

    def action(self, items: Sequence[int]) -> PageAction:
        return PageAction(watched={items[w.slot - 1]: w.rating for w in self.watched},
                          then=self.then)


class InvalidAnswer(ValueError):
    """A reply that is not a valid action for its page (or a call that failed)."""


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: "
                     f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())


def check_reply(reply: Any, n_slots: int) -> ChatPageAnswer:
    """The page-checked answer of one ``with_structured_output(include_raw=True)`` reply."""
    if isinstance(reply, BaseException):
        raise InvalidAnswer(f"{type(reply).__name__}: {reply}")
    parsed = reply.get("parsed")
    if parsed is None:
        err = reply.get("parsing_error")
        if isinstance(err, ValidationError):
            raise InvalidAnswer(_errors(err))
        raise InvalidAnswer(str(err).strip().splitlines()[0] if err else "no structured answer")
    data = parsed.model_dump() if isinstance(parsed, BaseModel) else parsed
    try:
        return ChatPageAnswer.model_validate(data, context={"slots": n_slots})
    except ValidationError as exc:
        raise InvalidAnswer(_errors(exc)) from None


def ask_all(runnable: Runnable, conversations: Sequence[list[BaseMessage]],
            check: Callable[[int, Any], Any], retry: Callable[[int, InvalidAnswer], str],
            retries: int, max_concurrency: int) -> list[Any]:
    """Each conversation's checked answer, or its last ``InvalidAnswer`` after ``retries`` more
    tries. One batch per round; a round asks again only the conversations that failed, each with
    its own last error appended (``retry``)."""
    asks = [list(c) for c in conversations]
    out: list[Any] = [None] * len(asks)
    pending = list(range(len(asks)))
    for _ in range(1 + retries):
        if not pending:
            break
        replies = runnable.batch([asks[k] for k in pending],
                                 config={"max_concurrency": max_concurrency},
                                 return_exceptions=True)
        failed = []
        for k, reply in zip(pending, replies, strict=True):
            try:
                out[k] = check(k, reply)
            except InvalidAnswer as exc:
                out[k] = exc
                failed.append(k)
                asks[k] = list(conversations[k]) + [HumanMessage(retry(k, exc))]
        pending = failed
    return out


class JudgeAnswer(BaseModel):
    """A judge's verdict on one session."""

    score: int = Field(ge=1, le=5, description="1 = clearly artificial, 5 = indistinguishable "
                       "from a real person")


def _check_verdict(reply: Any) -> int:
    if isinstance(reply, BaseException):
        raise InvalidAnswer(f"{type(reply).__name__}: {reply}")
    parsed = reply.get("parsed")
    if parsed is None:
        err = reply.get("parsing_error")
        raise InvalidAnswer(_errors(err) if isinstance(err, ValidationError)
                            else str(err or "no structured answer").strip().splitlines()[0])
    data = parsed.model_dump() if isinstance(parsed, BaseModel) else parsed
    try:
        return JudgeAnswer.model_validate(data).score
    except ValidationError as exc:
        raise InvalidAnswer(_errors(exc)) from None


def chat_judge(model: BaseChatModel, judge_prompts: Sequence[str], retries: int = 2,
               max_concurrency: int = 4) -> list[float]:
    """Human-likeness 1-5 per session from a chat model (NaN where it never answered validly):
    the same model that can act as policy and teacher, as a judge."""
    runnable = model.with_structured_output(JudgeAnswer, include_raw=True)
    answers = ask_all(runnable, [[HumanMessage(p)] for p in judge_prompts],
                      check=lambda k, reply: _check_verdict(reply),
                      retry=lambda k, err: prompts.JUDGE_RETRY.format(error=err),
                      retries=retries, max_concurrency=max_concurrency)
    return [float("nan") if isinstance(a, InvalidAnswer) else float(a) for a in answers]


@dataclass
class ChatPolicy:
    """Asks a chat model for each page's action; see the module docstring for the contract."""

    model: BaseChatModel
    name: str = "chat"
    retries: int = 2
    max_concurrency: int = 4
    fallback_then: Literal["next", "exit"] = "next"

    @cached_property
    def runnable(self) -> Runnable:
        return self.model.with_structured_output(ChatPageAnswer, include_raw=True)

    def messages(self, inp: DecisionInput) -> list[BaseMessage]:
        page = inp.persona_text.rstrip("\n") + "\n" + inp.page_text + render_predictions(
            inp.predictions)
        return [SystemMessage(prompts.CHAT_POLICY.format(n=len(inp.items))), HumanMessage(page)]

    def decide(self, inp: DecisionInput) -> Decision:
        return self.decide_many([inp])[0]

    def decide_many(self, inputs: Sequence[DecisionInput]) -> list[Decision]:
        """Every page in one batch per round (see ``ask_all``)."""
        inputs = list(inputs)
        answers = ask_all(
            self.runnable, [self.messages(i) for i in inputs],
            check=lambda k, reply: check_reply(reply, len(inputs[k].items)),
            retry=lambda k, err: prompts.CHAT_RETRY.format(error=err, n=len(inputs[k].items)),
            retries=self.retries, max_concurrency=self.max_concurrency)
        return [self._fallback(inp, str(a)) if isinstance(a, InvalidAnswer)
                else self._decision(inp, a) for inp, a in zip(inputs, answers, strict=True)]

    def _decision(self, inp: DecisionInput, answer: ChatPageAnswer) -> Decision:
        watched = {w.slot for w in answer.watched}
        return Decision(action=answer.action(inp.items), predictions=inp.predictions,
                        watch_scores={s: float(s in watched) for s in range(1, len(inp.items) + 1)})

    def _fallback(self, inp: DecisionInput, error: str) -> Decision:
        reason = f"{1 + self.retries} invalid answer(s); last: {error}"
        log.warning("chat policy, user %s page %s: default action (%s)", inp.user, inp.page,
                    reason)
        return Decision(action=PageAction(then=self.fallback_then), predictions=inp.predictions,
                        watch_scores={s: 0.0 for s in range(1, len(inp.items) + 1)},
                        fallback=reason)
