"""The page-by-page recommender environment.

A session shows pages of ``page_size`` items; the user watches some, rates what it watched, then
asks for the next page or exits. Pages come from a *page source*: normally the recommender's
ranking with already-seen items masked, or the logged pages of a human trajectory for replay.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

PAGE_SIZE = 4  # Agent4Rec's page: items shown at once
MAX_PAGES = 5  # pages a visit may last before the person must leave


class InvalidAction(ValueError):
    """The action does not fit the page it answers."""


class PageAction(BaseModel):
    """What a user does on one page: the items watched with their 1–5 ratings, then next/exit."""

    model_config = ConfigDict(frozen=True)
    watched: dict[int, int] = Field(default_factory=dict,
                                    description="item id -> rating 1..5 for each watched item")
    then: Literal["next", "exit"] = "next"


class Observation(BaseModel):
    model_config = ConfigDict(frozen=True)
    user: int
    page: int = Field(description="1-based page number within the session")
    items: list[int]
    session: list[tuple[int, int]] = Field(
        default_factory=list, description="(item, rating) watched earlier in this session")
    max_pages: int = MAX_PAGES


class PageSource(Protocol):
    def __call__(self, user: int, page: int, k: int, seen: Collection[int],
                 session: Sequence[int]) -> list[int]: ...


def recommender_pages(rank: Callable[..., list[int]],
                      masked: Callable[[int], Collection[int]] = lambda u: ()) -> PageSource:
    """Pages as consecutive slices of a recommender ranking, seen and masked items excluded."""

    def source(user: int, page: int, k: int, seen: Collection[int],
               session: Sequence[int]) -> list[int]:
        exclude = set(seen) | set(masked(user))
        return rank(user, k, exclude=exclude, session=list(session))

    return source


def validate_action(obs: Observation, action: PageAction) -> None:
    shown = set(obs.items)
    for item, rating in action.watched.items():
        if item not in shown:
            raise InvalidAction(f"item {item} is not on page {obs.page} (shown: {obs.items})")
        if not isinstance(rating, int) or not 1 <= rating <= 5:
            raise InvalidAction(f"rating {rating!r} for item {item} must be an integer 1-5")


@dataclass
class PageEnv:
    """One user's session at a time; ``step`` validates the action against the current page."""

    pages: PageSource
    page_size: int = PAGE_SIZE
    max_pages: int = MAX_PAGES
    _obs: Observation | None = field(default=None, init=False, repr=False)
    _seen: set[int] = field(default_factory=set, init=False, repr=False)

    def reset(self, user: int) -> Observation:
        self._seen = set()
        self._obs = self._page(user, 1, [])
        return self._obs

    def _page(self, user: int, page: int, session: list[tuple[int, int]]) -> Observation:
        items = self.pages(user, page, self.page_size, self._seen, [i for i, _ in session])
        if len(set(items)) != len(items) or set(items) & self._seen:
            raise RuntimeError(f"page source repeated an item on page {page} for user {user}")
        self._seen |= set(items)
        return Observation(user=user, page=page, items=list(items), session=session,
                           max_pages=self.max_pages)

    def restore(self, obs: Observation, seen: Collection[int]) -> None:
        """Continue a session from a saved observation (e.g. a graph checkpoint)."""
        self._obs, self._seen = obs, set(seen)

    @property
    def observation(self) -> Observation:
        if self._obs is None:
            raise InvalidAction("call reset(user) before step(action)")
        return self._obs

    def step(self, action: PageAction) -> tuple[Observation, bool, dict]:
        obs = self.observation
        validate_action(obs, action)
        watched = [(i, action.watched[i]) for i in obs.items if i in action.watched]
        session = obs.session + watched
        info = {"page": obs.page, "items": obs.items, "watched": dict(watched),
                "then": action.then}
        if action.then == "exit" or obs.page >= self.max_pages:
            info["end"] = "exit" if action.then == "exit" else "max_pages"
            self._obs = obs.model_copy(update={"session": session})
            return self._obs, True, info
        nxt = self._page(obs.user, obs.page + 1, session)
        if not nxt.items:
            info["end"] = "exhausted"
            return nxt, True, info
        self._obs = nxt
        return nxt, False, info
