"""The page-by-page environment: validation, session ends, no repeats, and restoring a session."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pytest

from simulator.env import InvalidAction, Observation, PageAction, PageEnv, recommender_pages

CATALOGUE = list(range(1, 41))


class CountingSource:
    """Serves the lowest unseen ids; records every request so tests can check what it was told."""

    def __init__(self, catalogue: Sequence[int] = CATALOGUE) -> None:
        self.catalogue = list(catalogue)
        self.calls: list[tuple[int, int, int, frozenset[int], tuple[int, ...]]] = []

    def __call__(self, user: int, page: int, k: int, seen: Collection[int],
                 session: Sequence[int]) -> list[int]:
        self.calls.append((user, page, k, frozenset(seen), tuple(session)))
        return [i for i in self.catalogue if i not in seen][:k]


def test_reset_shows_first_page() -> None:
    src = CountingSource()
    env = PageEnv(src, page_size=4, max_pages=3)
    obs = env.reset(7)
    assert obs == Observation(user=7, page=1, items=[1, 2, 3, 4], session=[], max_pages=3)
    assert env.observation == obs
    assert src.calls == [(7, 1, 4, frozenset(), ())]


def test_step_records_watched_in_page_order_and_passes_session_on() -> None:
    src = CountingSource()
    env = PageEnv(src, page_size=4, max_pages=3)
    env.reset(1)
    obs, done, info = env.step(PageAction(watched={4: 2, 2: 5}, then="next"))
    assert not done
    assert info == {"page": 1, "items": [1, 2, 3, 4], "watched": {2: 5, 4: 2}, "then": "next"}
    assert list(info["watched"]) == [2, 4]  # page order, not the order the action listed them
    assert obs.page == 2 and obs.items == [5, 6, 7, 8]
    assert obs.session == [(2, 5), (4, 2)]
    # The page source saw everything shown so far and the session's watched items.
    assert src.calls[-1] == (1, 2, 4, frozenset({1, 2, 3, 4}), (2, 4))


@pytest.mark.parametrize("action, pattern", [
    (PageAction(watched={99: 4}), r"item 99 is not on page 1 \(shown: \[1, 2, 3, 4\]\)"),
    (PageAction(watched={2: 0}), r"rating 0 for item 2 must be an integer 1-5"),
    (PageAction(watched={2: 6}), r"rating 6 for item 2 must be an integer 1-5"),
    (PageAction(watched={1: 3, 2: -1}), r"rating -1 for item 2"),
])
def test_invalid_actions_raise_with_clear_message(action: PageAction, pattern: str) -> None:
    env = PageEnv(CountingSource(), page_size=4, max_pages=3)
    first = env.reset(1)
    with pytest.raises(InvalidAction, match=pattern):
        env.step(action)
    assert env.observation == first  # a rejected action does not advance the session
    obs, _, _ = env.step(PageAction(watched={1: 1, 4: 5}))
    assert obs.page == 2


def test_invalid_action_is_a_value_error() -> None:
    assert issubclass(InvalidAction, ValueError)


def test_step_before_reset_raises() -> None:
    env = PageEnv(CountingSource())
    with pytest.raises(InvalidAction, match=r"reset\(user\) before step"):
        env.step(PageAction())
    with pytest.raises(InvalidAction):
        _ = env.observation


def test_exit_ends_session_and_keeps_last_watches() -> None:
    env = PageEnv(CountingSource(), page_size=4, max_pages=5)
    env.reset(3)
    env.step(PageAction(watched={1: 4}))
    obs, done, info = env.step(PageAction(watched={6: 3}, then="exit"))
    assert done and info["end"] == "exit"
    assert obs.page == 2 and obs.items == [5, 6, 7, 8]
    assert obs.session == [(1, 4), (6, 3)]


def test_session_ends_at_max_pages_even_when_asking_for_more() -> None:
    src = CountingSource()
    env = PageEnv(src, page_size=2, max_pages=3)
    env.reset(1)
    dones = []
    for _ in range(3):
        obs, done, info = env.step(PageAction(then="next"))
        dones.append(done)
    assert dones == [False, False, True]
    assert info["end"] == "max_pages" and obs.page == 3
    assert len(src.calls) == 3  # no fourth page was ever requested


def test_empty_page_ends_session_as_exhausted() -> None:
    env = PageEnv(CountingSource(catalogue=[1, 2, 3, 4, 5, 6]), page_size=4, max_pages=5)
    env.reset(1)
    obs, done, _ = env.step(PageAction())
    assert not done and obs.items == [5, 6]  # a short page is still a page
    obs, done, info = env.step(PageAction())
    assert done and info["end"] == "exhausted" and obs.items == []


def test_seen_items_never_repeat_within_a_session() -> None:
    env = PageEnv(CountingSource(), page_size=4, max_pages=5)
    shown = list(env.reset(2).items)
    done = False
    while not done:
        obs, done, _ = env.step(PageAction(watched={env.observation.items[0]: 3}))
        if not done:
            shown += obs.items
    assert len(shown) == 20 and len(set(shown)) == len(shown)
    # A new session starts from a clean slate.
    assert env.reset(2).items == [1, 2, 3, 4]


def test_page_source_that_repeats_an_item_is_refused() -> None:
    def sticky(user: int, page: int, k: int, seen: Collection[int],
               session: Sequence[int]) -> list[int]:
        return [1, 2] if page == 1 else [2, 3]

    env = PageEnv(sticky, page_size=2)
    env.reset(1)
    with pytest.raises(RuntimeError, match="repeated an item on page 2"):
        env.step(PageAction())

    env = PageEnv(lambda *a: [5, 5], page_size=2)
    with pytest.raises(RuntimeError, match="page 1"):
        env.reset(1)


def test_recommender_pages_excludes_seen_and_masked() -> None:
    got: list[dict] = []

    def rank(user: int, k: int, exclude: Collection[int] = (), session: Sequence[int] = ()
             ) -> list[int]:
        got.append({"user": user, "exclude": set(exclude), "session": list(session)})
        return [i for i in CATALOGUE if i not in exclude][:k]

    src = recommender_pages(rank, masked=lambda u: {1, 3} if u == 9 else set())
    env = PageEnv(src, page_size=3, max_pages=2)
    assert env.reset(9).items == [2, 4, 5]
    obs, _, _ = env.step(PageAction(watched={4: 5}))
    assert obs.items == [6, 7, 8]
    assert got[-1] == {"user": 9, "exclude": {1, 2, 3, 4, 5}, "session": [4]}
    assert PageEnv(src, page_size=3).reset(10).items == [1, 2, 3]


def _run(env: PageEnv, actions: Sequence[PageAction]) -> list[tuple[Observation, bool, dict]]:
    return [env.step(a) for a in actions]


def test_restore_continues_a_session_identically() -> None:
    actions = [PageAction(watched={1: 5}), PageAction(watched={7: 2, 8: 4}),
               PageAction(watched={10: 3}), PageAction(), PageAction(then="exit")]
    whole = PageEnv(CountingSource(), page_size=4, max_pages=5)
    shown = list(whole.reset(4).items)
    head = _run(whole, actions[:2])
    shown += [i for obs, _, _ in head for i in obs.items]
    saved = head[-1][0]
    rest = _run(whole, actions[2:])
    assert rest[-1][1] and rest[-1][2]["end"] == "exit"

    restored = PageEnv(CountingSource(), page_size=4, max_pages=5)
    restored.restore(saved, shown)
    assert restored.observation == saved
    assert _run(restored, actions[2:]) == rest


def test_restore_without_seen_items_would_repeat_them() -> None:
    """The seen set is part of the state: restoring with it is what prevents repeats."""
    env = PageEnv(CountingSource(), page_size=4, max_pages=5)
    env.reset(1)
    obs, _, _ = env.step(PageAction())
    fresh = PageEnv(CountingSource(), page_size=4, max_pages=5)
    fresh.restore(obs, seen=obs.items)  # forgets page 1
    nxt, _, _ = fresh.step(PageAction())
    assert nxt.items == [1, 2, 3, 4]
    full = PageEnv(CountingSource(), page_size=4, max_pages=5)
    full.restore(obs, seen=[1, 2, 3, 4, *obs.items])
    assert full.step(PageAction())[0].items == [9, 10, 11, 12]
