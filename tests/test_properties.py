"""Properties that must hold for any input, checked on generated ones (hypothesis).

The renderer/parser pair the world model is scored with, the splitter (no leakage for any log,
seed or configuration) and the page environment (any valid action sequence keeps its rules).
"""

from __future__ import annotations

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.text import ItemView, parse_next_state, render_next_state
from simulator.env import PageAction, PageEnv
from simulator.split import SplitConfig, make_split

FAST = settings(max_examples=40, deadline=None)

# Text the page line can carry: no separators of its own (";", "[", "]", ","), no line breaks.
WORD = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters=" '-:&!."),
               min_size=1, max_size=20).map(str.strip).filter(bool)
ITEM = st.builds(ItemView, id=st.integers(1, 10_000), title=WORD,
                 year=st.one_of(st.none(), st.integers(1900, 2030)),
                 genres=st.lists(WORD, max_size=3).map(tuple))


@FAST
@given(ratings=st.dictionaries(st.integers(1, 12), st.integers(1, 5), max_size=6),
       items=st.one_of(st.none(), st.lists(ITEM, min_size=1, max_size=5)))
def test_next_state_round_trips(ratings: dict[int, int], items: list[ItemView] | None) -> None:
    state = parse_next_state(render_next_state(ratings, items))
    assert state.ratings == ratings
    assert state.ends == (items is None)
    assert state.titles == ([it.label() for it in items] if items else [])
    assert state.genres == sorted({g for it in items or [] for g in it.genres})


def test_a_title_starting_with_none_is_a_page_not_the_end() -> None:
    page = [ItemView(id=1, title="none", genres=()), ItemView(id=2, title="nonesuch",
                                                            genres=("Drama",))]
    state = parse_next_state(render_next_state({}, page))
    assert not state.ends and state.titles == ["none", "nonesuch"]
    assert parse_next_state(render_next_state({1: 4}, None)).ends


LOG = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 30), st.integers(1, 5),
                         st.integers(0, 10_000)), min_size=1, max_size=80)
CONFIG = st.builds(SplitConfig, kind=st.sampled_from(["user_chrono", "global_time"]),
                   valid_frac=st.sampled_from([0.0, 0.1, 0.25]),
                   test_frac=st.sampled_from([0.0, 0.2, 0.3]))


@FAST
@given(rows=LOG, cfg=CONFIG)
def test_split_has_no_leakage(rows: list[tuple[int, int, int, int]], cfg: SplitConfig) -> None:
    log = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    log = log.drop_duplicates(["user", "item"], keep="last")  # the readers keep one per pair
    split = make_split(log, cfg)
    parts = {p: split.part(p) for p in ("train", "valid", "test")}
    keys = {p: set(zip(f["user"], f["item"], strict=True)) for p, f in parts.items()}
    assert sum(len(f) for f in parts.values()) == len(log)
    assert keys["train"] | keys["valid"] | keys["test"] == set(zip(log["user"], log["item"],
                                                                    strict=True))
    assert not (keys["train"] & keys["valid"] or keys["train"] & keys["test"]
                or keys["valid"] & keys["test"])
    if cfg.kind == "user_chrono":
        for user in log["user"].unique():
            times = [parts[p].loc[parts[p]["user"] == user, "timestamp"] for p in parts]
            spans = [(t.min(), t.max()) for t in times if len(t)]
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    else:  # one calendar cut-off for everybody
        spans = [(f["timestamp"].min(), f["timestamp"].max()) for f in parts.values() if len(f)]
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def _fresh(catalogue: int):
    def pages(user: int, page: int, k: int, seen: object, session: object) -> list[int]:
        return [i for i in range(1, catalogue + 1) if i not in seen][:k]  # type: ignore[operator]
    return pages


@FAST
@given(catalogue=st.integers(0, 30), page_size=st.integers(1, 5), max_pages=st.integers(1, 8),
       choices=st.lists(st.tuples(st.lists(st.integers(0, 4), max_size=4), st.integers(1, 5),
                                  st.booleans()), min_size=1, max_size=12))
def test_env_keeps_its_rules(catalogue: int, page_size: int, max_pages: int,
                             choices: list[tuple[list[int], int, bool]]) -> None:
    """Whatever valid actions come: no item twice, never past max_pages, done after exit."""
    env = PageEnv(pages=_fresh(catalogue), page_size=page_size, max_pages=max_pages)
    obs = env.reset(user=1)
    shown: list[int] = list(obs.items)
    done = not obs.items
    for slots, rating, leave in choices:
        if done:
            break
        watched = {obs.items[s]: rating for s in slots if s < len(obs.items)}
        obs, done, info = env.step(PageAction(watched=watched, then="exit" if leave else "next"))
        assert obs.page <= max_pages and info["watched"] == watched
        if leave:
            assert done and info["end"] == "exit"
        if not done:
            shown += obs.items
        assert all(i in dict(obs.session) for i in watched)
    assert len(shown) == len(set(shown)) and len(shown) <= catalogue
