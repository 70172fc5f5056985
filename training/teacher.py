"""Reflection teachers: why did the human choose this rather than the alternatives?

``GroundedTeacher`` writes the reflection from numbers it can cite (the ratings this person gave
similar titles, their liked genres, the world model's expected ratings and predicted next page),
deterministically and offline. ``ChatTeacher`` asks any text model (e.g. a large chat model
behind langchain-core) with the shared teacher prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agents import prompts, text
from agents.text import ItemView, NextState


@dataclass
class Option:
    """An action (watched slots, next/exit) with what the world model predicts for it."""

    watched: tuple[int, ...]
    then: str
    expected: dict[int, float] = field(default_factory=dict)  # slot -> expected rating
    next_state: NextState | None = None

    def describe(self) -> str:
        what = ("watch " + ", ".join(f"[{s}]" for s in self.watched)) if self.watched \
            else "watch nothing"
        return f"{what}, then {self.then}"


class Teacher(Protocol):
    def reflect(self, views: Sequence[ItemView], liked_genres: Sequence[str],
                human: Option, alternatives: Sequence[Option], persona: str) -> str: ...


def _evidence_mean(view: ItemView) -> float | None:
    if not view.evidence:
        return None
    return sum(e.rating for e in view.evidence) / len(view.evidence)


def _value(opt: Option, views: Sequence[ItemView]) -> float:
    """Mean expected rating of what the option watches (3.0, a neutral value, for none)."""
    vals = [opt.expected.get(s, _evidence_mean(views[s - 1]) or 3.0) for s in opt.watched]
    return sum(vals) / len(vals) if vals else 3.0


def _future(opt: Option) -> str:
    if opt.then == "exit":
        return "the session ends"
    if opt.next_state and opt.next_state.genres:
        return "a next page of " + ", ".join(opt.next_state.genres[:3])
    return "another page"


@dataclass
class GroundedTeacher:
    """Deterministic, compact reflection citing persona statistics and world-model predictions."""

    def reflect(self, views: Sequence[ItemView], liked_genres: Sequence[str],
                human: Option, alternatives: Sequence[Option], persona: str = "") -> str:
        liked = set(liked_genres)
        parts = [f"Chosen: {human.describe()}."]
        for s in human.watched:
            v = views[s - 1]
            ev = _evidence_mean(v)
            fit = sorted(liked & set(v.genres))
            parts.append(f"[{s}]: " + (f"similar rated {ev:.1f}" if ev is not None
                                       else "nothing similar")
                         + (f", liked {'/'.join(fit)}" if fit else "")
                         + (f", expect {human.expected[s]:.1f}" if s in human.expected else "")
                         + ".")
        for k, alt in enumerate(alternatives, 1):
            exp = " ".join(f"{alt.expected[s]:.1f}" for s in alt.watched if s in alt.expected)
            parts.append(f"Alt {k}: {alt.describe()}" + (f", expect {exp}" if exp else "")
                         + f"; {_future(alt)}.")
        h_val = _value(human, views)
        best_alt = max((_value(a, views) for a in alternatives), default=3.0)
        parts.append(f"Context: {h_val:.1f} vs {best_alt:.1f}.")
        h_genres = sorted({g for s in human.watched for g in views[s - 1].genres} & liked)
        parts.append("Persona: " + (f"likes {'/'.join(h_genres)}." if h_genres
                                    else "no liked genre tempts."))
        parts.append(f"Future: {_future(human)}.")
        return " ".join(parts)


@dataclass
class ChatTeacher:
    """Any text model (local or remote chat) writes the reflection from the shared prompt."""

    model: object  # agents.chat.TextModel
    max_new_tokens: int = 120

    def reflect(self, views: Sequence[ItemView], liked_genres: Sequence[str],
                human: Option, alternatives: Sequence[Option], persona: str = "") -> str:
        page = "".join(text.render_item(s, v) + "\n" for s, v in enumerate(views, 1))
        alts = "\n".join(f"- {a.describe()}: {_future(a)}; expected "
                         + ", ".join(f"[{s}] {a.expected.get(s, 0):.1f}" for s in a.watched)
                         for a in alternatives)
        prompt = prompts.TEACHER.format(persona=persona, page=page, human=human.describe(),
                                        alternatives=alts)
        return self.model.complete(prompt, self.max_new_tokens).strip().replace("\n", " ")


def make_teacher(kind: str, lm: object = None, chat_spec: str | None = None) -> Teacher:
    """The reflection writer ``TrainConfig.teacher`` names. ``chat`` builds its model with
    ``agents.chat.chat_model``, so one spec serves as simulate's chat policy and as teacher."""
    if kind == "grounded":
        return GroundedTeacher()
    from agents.chat import LangChainTextModel, LocalTextModel, chat_model

    if kind == "local":
        return ChatTeacher(LocalTextModel(lm))
    if kind == "chat":
        if not chat_spec:
            raise ValueError("teacher chat needs --teacher-model PROVIDER:MODEL")
        return ChatTeacher(LangChainTextModel(chat_model(chat_spec)))
    raise ValueError(f"unknown teacher {kind!r}; known: grounded, local, chat")
