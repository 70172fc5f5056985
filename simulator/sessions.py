"""Typed records of simulated (and held-out human) sessions, and their one JSON form.

In Python an item id is always an ``int``; JSON object keys can only be strings, so the JSON form
(``sessions.jsonl``, LangGraph checkpoints, evaluation outputs) writes ``watched`` as
``{"<item>": rating}``. Building and reading sessions through these models keeps that flip in one
place.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from simulator.env import PageAction


class PageRecord(BaseModel):
    """One page of a session: what was shown, watched (item -> rating) and done next."""

    page: int = Field(ge=1)
    items: list[int]
    watched: dict[int, int] = Field(default_factory=dict)
    then: Literal["next", "exit"]
    watch_scores: dict[int, float] = Field(
        default_factory=dict, description="slot -> log P(watch) - log P(skip), when scored")
    fallback: str | None = Field(None, description="why the policy took its default action")
    human: PageAction | None = Field(None, description="the logged human action on this page")

    def liked(self) -> int:
        return sum(r >= 4 for r in self.watched.values())


class SessionRecord(BaseModel):
    """One agent's (or human's) session on one recommender."""

    thread: str | None = Field(None, description="the LangGraph thread: '<recommender>:<user>'")
    user: int
    recommender: str
    pages: list[PageRecord]
    end: str | None = Field(None, description="exit or max_pages")
    satisfaction: float | None = None
    interview: str = ""

    def ratings(self) -> list[int]:
        return [r for p in self.pages for r in p.watched.values()]

    def json_form(self, full: bool = True) -> dict[str, Any]:
        """The JSON-able dict; ``full=False`` keeps only the fields that were given (the
        evaluation's shorter session shape)."""
        return self.model_dump(mode="json", exclude_unset=not full)

    def line(self) -> str:
        """One ``sessions.jsonl`` line (without its newline)."""
        return json.dumps(self.json_form())


def read_sessions(lines: Iterable[str]) -> list[SessionRecord]:
    """Records from JSON lines; blank lines are skipped."""
    return [SessionRecord.model_validate_json(ln) for ln in lines if ln.strip()]


def as_records(sessions: Iterable[SessionRecord | Mapping[str, Any]]) -> list[SessionRecord]:
    """Records from records or their JSON form (e.g. read back from a file)."""
    return [SessionRecord.model_validate(s) for s in sessions]


class SessionLog:
    """A run's committed sessions, one JSON line each, appended as its agents finish.

    Each line is flushed and fsynced before the next agent counts as done, so a run killed at any
    moment keeps every session it reported; a line cut short by the kill is dropped on reading.
    Safe to commit from several agent threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def commit(self, session: SessionRecord) -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(session.line() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> dict[str, SessionRecord]:
        """The committed sessions by thread; a torn last line is cut off the file."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(len(whole))
        done = read_sessions(whole.decode("utf-8").splitlines())
        return {s.thread or f"{s.recommender}:{s.user}": s for s in done}

    def has_commits(self) -> bool:
        """Whether any session is committed (read-only: a torn tail stays as it is)."""
        return self.path.exists() and b"\n" in self.path.read_bytes()
