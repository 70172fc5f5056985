"""Human trajectories rebuilt from a rating log: sessions, page plans, masking, replay, files."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulator.data import Dataset
from simulator.env import PageEnv
from simulator.policies import HumanReplay
from simulator.recommenders import make_recommender
from simulator.split import Split
from simulator.trajectories import (
    Exposure,
    Step,
    Trajectory,
    TrajectoryConfig,
    build_trajectories,
    first_visits,
    human_actions,
    logged_pages,
    plan_visits,
    read_jsonl,
    sessions,
    trajectory_stats,
    write_jsonl,
)

GAP = 30 * 60
# page_size * max_pages = 6 slots per visit, and every tiny user leaves 6 items unrated, so the
# filler never runs out (see test_too_small_catalogue_is_an_error for what happens otherwise).
TINY_CFG = TrajectoryConfig(page_size=2, max_pages=3, seed=0)


def _log(rows: Sequence[tuple[int, int, float, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def _items(chunks: list[tuple[int, int, pd.DataFrame]]) -> list[tuple[int, int, list[int]]]:
    return [(u, s, [int(i) for i in rows["item"]]) for u, s, rows in chunks]


# --- sessions -----------------------------------------------------------------------------------

def test_gap_of_exactly_thirty_minutes_stays_in_session() -> None:
    log = _log([(1, 10, 4, 0), (1, 11, 3, GAP), (1, 12, 5, 2 * GAP + 1)])
    assert _items(list(sessions(log, 30))) == [(1, 0, [10, 11]), (1, 1, [12])]


def test_gap_of_thirty_minutes_and_one_second_splits() -> None:
    log = _log([(1, 10, 4, 0), (1, 11, 3, GAP + 1), (1, 12, 5, GAP + 2)])
    assert _items(list(sessions(log, 30))) == [(1, 0, [10]), (1, 1, [11, 12])]
    # The threshold is the configured one, in minutes.
    assert _items(list(sessions(log, 31))) == [(1, 0, [10, 11, 12])]


def test_same_second_ties_are_ordered_by_item_and_input_order_does_not_matter() -> None:
    log = _log([(2, 30, 1, 500), (1, 9, 4, 100), (1, 3, 2, 100), (1, 7, 5, 50),
                (2, 20, 3, 500), (1, 1, 3, 100 + GAP + 1)])
    got = list(sessions(log, 30))
    assert _items(got) == [(1, 0, [7, 3, 9]), (1, 1, [1]), (2, 0, [20, 30])]
    assert list(got[0][2]["rating"]) == [5, 2, 4]  # rows travel with their items
    shuffled = log.sample(frac=1.0, random_state=3)
    assert _items(list(sessions(shuffled, 30))) == _items(got)


def test_sessions_are_per_user_even_without_gap() -> None:
    log = _log([(1, 1, 4, 0), (2, 2, 4, 10), (1, 3, 4, 20)])
    assert _items(list(sessions(log, 30))) == [(1, 0, [1, 3]), (2, 0, [2])]


# --- plan_visits --------------------------------------------------------------------------------

@pytest.mark.parametrize("probs", [(0.2, 0.45, 0.35), (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0),
                                   (1.0, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("n_items", [0, 1, 7, 40])
def test_plan_visits_respects_page_and_visit_limits(probs: tuple[float, ...], n_items: int
                                                    ) -> None:
    cfg = TrajectoryConfig(page_size=4, max_pages=3, watch_probs=probs)
    for seed in range(5):
        visits = plan_visits(n_items, cfg, np.random.default_rng(seed))
        assert sum(map(sum, visits)) == n_items  # every item placed exactly once
        assert all(1 <= len(v) <= cfg.max_pages for v in visits)
        assert all(0 <= n <= cfg.page_size for v in visits for n in v)
        assert all(len(v) == cfg.max_pages for v in visits[:-1])  # only the last visit is short
        if n_items == 0:
            assert visits == []


def test_plan_visits_caps_a_page_at_page_size() -> None:
    cfg = TrajectoryConfig(page_size=4, max_pages=5, watch_probs=(0, 0, 0, 0, 0, 0, 1))
    assert plan_visits(10, cfg, np.random.default_rng(0)) == [[4, 4, 2]]


def test_plan_visits_is_seeded() -> None:
    cfg = TrajectoryConfig()
    a = plan_visits(30, cfg, np.random.default_rng(5))
    assert a == plan_visits(30, cfg, np.random.default_rng(5))
    assert any(plan_visits(30, cfg, np.random.default_rng(s)) != a for s in range(6, 10))


# --- build_trajectories on the tiny data set ----------------------------------------------------

def _rank_by_id(catalogue: Collection[int]):
    ids = sorted(catalogue)

    def rank(user: int, k: int, exclude: Collection[int] = (), session: Sequence[int] = ()
             ) -> list[int]:
        return [i for i in ids if i not in exclude][:k]

    return rank


def _rated(log: pd.DataFrame) -> dict[int, set[int]]:
    return {int(u): {int(i) for i in g} for u, g in log.groupby("user")["item"]}


def _two_session_log(ds: Dataset) -> pd.DataFrame:
    """The tiny log with a 2-hour pause after each user's third rating."""
    log = ds.ratings.copy()
    late = log.groupby("user").cumcount() >= 3
    log.loc[late, "timestamp"] += 2 * 3600
    return log


def _build(ds: Dataset, log: pd.DataFrame, cfg: TrajectoryConfig = TINY_CFG) -> list[Trajectory]:
    return build_trajectories(log, _rank_by_id(ds.items), _rated(log), cfg, "by-id",
                              progress=False)


@pytest.fixture
def tiny_trajs(tiny_dataset: Dataset) -> tuple[pd.DataFrame, list[Trajectory]]:
    log = _two_session_log(tiny_dataset)
    return log, _build(tiny_dataset, log)


def test_every_logged_rating_is_watched_exactly_once_in_order(tiny_trajs) -> None:
    log, trajs = tiny_trajs
    watched = [(t.user, i, r) for t in trajs for s in t.steps for i, r in s.watched.items()]
    logged = [(int(u), int(i), int(r)) for u, i, r in zip(log["user"], log["item"],
                                                           log["rating"], strict=True)]
    assert Counter(watched) == Counter(logged) and len(watched) == len(logged) == 36
    for user in range(1, 7):
        mine = sorted((t for t in trajs if t.user == user), key=lambda t: (t.session, t.visit))
        order = [i for t in mine for s in t.steps for i in s.watched]
        rows = log[log["user"] == user].sort_values(["timestamp", "item"])
        assert order == list(rows["item"])
        assert [t.session for t in mine] == sorted(t.session for t in mine)
        assert {t.session for t in mine} == {0, 1}
        for t in mine:
            first = rows["timestamp"].min() if t.session == 0 else rows["timestamp"].iloc[3]
            assert t.start == first


def test_steps_are_well_formed(tiny_trajs) -> None:
    _, trajs = tiny_trajs
    for t in trajs:
        assert t.recommender == "by-id" and t.part == "train"
        assert [s.page for s in t.steps] == list(range(1, len(t.steps) + 1))
        assert 1 <= len(t.steps) <= TINY_CFG.max_pages
        assert [s.then for s in t.steps][:-1] == ["next"] * (len(t.steps) - 1)
        shown = [i for s in t.steps for i in s.items]
        assert len(shown) == len(set(shown))  # no item twice within a visit
        for s in t.steps:
            assert 1 <= len(s.items) <= TINY_CFG.page_size
            assert set(s.watched) <= set(s.items)
            assert all(1 <= r <= 5 for r in s.watched.values())


def test_a_visit_exits_only_when_its_session_ends(tiny_trajs) -> None:
    """A session longer than one visit is cut by the page limit: the person went on, so only
    the last visit of a session ends by exit; the others fill every page and say next."""
    _, trajs = tiny_trajs
    last = {}
    for t in trajs:
        last[(t.user, t.session)] = max(last.get((t.user, t.session), -1), t.visit)
    cut = [t for t in trajs if t.visit < last[(t.user, t.session)]]
    assert cut and len(cut) < len(trajs)  # the fixture holds both kinds
    for t in trajs:
        leaves = t.visit == last[(t.user, t.session)]
        assert t.steps[-1].then == ("exit" if leaves else "next")
        assert t.end == ("exit" if leaves else "max_pages")
        if not leaves:
            assert len(t.steps) == TINY_CFG.max_pages


def test_filler_items_are_never_rated_by_the_user(tiny_dataset: Dataset, tiny_trajs) -> None:
    _, trajs = tiny_trajs
    rated = _rated(tiny_dataset.ratings)
    fillers = 0
    for t in trajs:
        for s in t.steps:
            filler = set(s.items) - set(s.watched)
            assert not filler & rated[t.user], (t.user, s)
            fillers += len(filler)
    assert fillers > 0


def test_masked_items_from_other_parts_stay_off_pages(tiny_dataset: Dataset) -> None:
    """Building one part masks what the user rated in other parts too (as World does)."""
    log = tiny_dataset.ratings
    first_half = log[log.groupby("user").cumcount() < 3]
    trajs = build_trajectories(first_half, _rank_by_id(tiny_dataset.items), _rated(log),
                               TINY_CFG, progress=False)
    rated = _rated(log)
    for t in trajs:
        for s in t.steps:
            assert not (set(s.items) - set(s.watched)) & rated[t.user]


def test_same_seed_same_trajectories_other_seed_differs(tiny_dataset: Dataset) -> None:
    log = _two_session_log(tiny_dataset)
    a = _build(tiny_dataset, log)
    assert _build(tiny_dataset, log) == a
    b = _build(tiny_dataset, log, TINY_CFG.model_copy(update={"seed": 1}))
    assert b != a
    # Another seed moves pages and positions, never what was watched.
    key = sorted((t.user, i, r) for t in b for s in t.steps for i, r in s.watched.items())
    assert key == sorted((t.user, i, r) for t in a for s in t.steps for i, r in s.watched.items())


def test_max_visits_per_user_keeps_the_earliest(tiny_dataset: Dataset) -> None:
    log = _two_session_log(tiny_dataset)
    every = _build(tiny_dataset, log)
    capped = _build(tiny_dataset, log, TINY_CFG.model_copy(update={"max_visits_per_user": 1}))
    assert sorted(t.user for t in capped) == list(range(1, 7))
    earliest = first_visits(every)
    assert {t.user: t for t in capped} == earliest


def test_too_small_catalogue_is_an_error(tiny_dataset: Dataset) -> None:
    """4-item pages over 5 pages need up to 20 items per visit; the tiny set has 12. A page with
    no logged item and nothing to fill it would end the visit and silently drop ratings."""
    log = tiny_dataset.ratings
    with pytest.raises(RuntimeError, match="too small"):
        for seed in range(10):
            build_trajectories(log, _rank_by_id(tiny_dataset.items), _rated(log),
                               TrajectoryConfig(seed=seed), progress=False)


def _exposure(ds: Dataset) -> Exposure:
    catalogue = np.asarray(sorted(ds.items), dtype=np.int64)
    counts = ds.ratings["item"].value_counts()
    return Exposure(ranks={"by-id": _rank_by_id(ds.items)}, catalogue=catalogue,
                    popularity=np.asarray([counts.get(i, 0) + 1.0 for i in catalogue]))


@pytest.mark.parametrize("shares", [{"uniform": 1.0}, {"popular": 1.0}, {"by-id": 1.0},
                                    {"uniform": 0.7, "popular": 0.1, "by-id": 0.2}])
def test_exposure_mixture_fills_pages_with_never_rated_items(tiny_dataset: Dataset,
                                                             shares: dict[str, float]) -> None:
    log = _two_session_log(tiny_dataset)
    cfg = TINY_CFG.model_copy(update={"exposure": shares})
    rated = _rated(log)

    def build() -> list[Trajectory]:
        return build_trajectories(log, lambda *a, **k: [], rated, cfg, "exposure",
                                  progress=False, exposure=_exposure(tiny_dataset))

    trajs = build()
    assert trajs == build()  # seeded
    watched = sorted((t.user, i) for t in trajs for s in t.steps for i in s.watched)
    assert watched == sorted(zip(log["user"].astype(int), log["item"].astype(int), strict=True))
    for t in trajs:
        assert t.recommender == "exposure"
        shown = [i for s in t.steps for i in s.items]
        assert len(shown) == len(set(shown)), "an item is shown once per visit"
        for s in t.steps:
            assert len(s.items) == cfg.page_size
            assert not (set(s.items) - set(s.watched)) & rated[t.user]
    if shares == {"by-id": 1.0}:  # the recommender's next pick: lowest unrated, unseen id
        for t in trajs:
            fillers = [i for s in t.steps for i in s.items if i not in s.watched]
            assert sorted(fillers) == [i for i in sorted(tiny_dataset.items)
                                       if i not in rated[t.user]][:len(fillers)]


def test_exposure_shares_are_validated() -> None:
    # The default, chosen on validation lists, draws no recommender's picks.
    assert TrajectoryConfig().recommenders() == []
    assert TrajectoryConfig(exposure={"uniform": .8, "itemknn": .1, "bpr": .1}
                            ).recommenders() == ["bpr", "itemknn"]
    assert sum(TrajectoryConfig().exposure.values()) == pytest.approx(1.0)
    assert TrajectoryConfig(exposure={"uniform": 1.0, "pop": 0.0}).recommenders() == []
    for bad in ({}, {"uniform": -0.1, "bpr": 1.0}, {"uniform": 0.0}):
        with pytest.raises(ValueError, match="exposure shares"):
            TrajectoryConfig(exposure=bad)


def test_replaying_logged_pages_reproduces_each_trajectory(tiny_trajs) -> None:
    _, trajs = tiny_trajs
    assert len(trajs) > 6
    for t in trajs:
        env = PageEnv(logged_pages({t.user: t}), TINY_CFG.page_size, TINY_CFG.max_pages)
        human = HumanReplay({t.user: t})
        obs, done, steps = env.reset(t.user), False, []
        while not done:
            action = human.act(obs)
            steps.append(Step(page=obs.page, items=obs.items, watched=action.watched,
                              then=action.then))
            obs, done, info = env.step(action)
        assert steps == t.steps and info["end"] == t.end
        actions = human_actions({t.user: t})
        assert [(a.watched, a.then) for a in actions.values()] == [
            (s.watched, s.then) for s in t.steps]


def test_human_replay_refuses_a_different_page(tiny_trajs) -> None:
    from simulator.env import InvalidAction, Observation

    _, trajs = tiny_trajs
    t = trajs[0]
    human = HumanReplay({t.user: t})
    with pytest.raises(InvalidAction, match="differs"):
        human.act(Observation(user=t.user, page=1, items=list(reversed(t.steps[0].items)) + [99]))
    with pytest.raises(InvalidAction, match="no logged page"):
        human.act(Observation(user=t.user, page=len(t.steps) + 1, items=[1]))
    assert logged_pages({t.user: t})(t.user, len(t.steps) + 1, 4, set(), []) == []
    assert logged_pages({t.user: t})(t.user + 100, 1, 4, set(), []) == []


def test_jsonl_round_trip(tiny_trajs, tmp_path: Path) -> None:
    _, trajs = tiny_trajs
    path = write_jsonl(trajs, tmp_path / "sub" / "trajs.jsonl")
    assert path.read_text().count("\n") == len(trajs)
    back = read_jsonl(path)
    assert back == trajs
    assert all(isinstance(i, int) for t in back for s in t.steps for i in s.watched)


def test_build_on_ml100k_fills_every_page(ml100k: Dataset, split100k: Split) -> None:
    rec = make_recommender("pop").fit(split100k.train)
    users = [1, 2, 3]
    log = split100k.test[split100k.test["user"].isin(users)]
    masked = _rated(pd.concat([split100k.train, split100k.valid, split100k.test]))
    trajs = build_trajectories(log, rec.rank, masked, TrajectoryConfig(), "pop", "test",
                               progress=False)
    assert {t.user for t in trajs} == set(users)
    assert all(len(s.items) == 4 for t in trajs for s in t.steps)
    assert sum(len(s.watched) for t in trajs for s in t.steps) == len(log)


# --- stats --------------------------------------------------------------------------------------

def test_trajectory_stats_on_a_hand_example() -> None:
    a = Trajectory(user=1, session=0, visit=0, recommender="x", steps=[
        Step(page=1, items=[1, 2, 3, 4], watched={1: 5, 2: 4}, then="next"),
        Step(page=2, items=[5, 6, 7, 8], watched={}, then="exit")])
    b = Trajectory(user=2, session=0, visit=0, recommender="x", steps=[
        Step(page=1, items=[9, 10], watched={9: 1}, then="exit")])
    c = Trajectory(user=3, session=0, visit=0, recommender="x", steps=[  # cut by the limit
        Step(page=1, items=[11, 12], watched={}, then="next")])
    stats = trajectory_stats([a, b, c])
    assert stats == {"visits": 3, "pages": 4, "watch_ratio": pytest.approx(3 / 12),
                     "watches_per_page": pytest.approx(0.75),
                     "pages_per_visit": pytest.approx(4 / 3),
                     "empty_page_share": pytest.approx(2 / 4),
                     "exit_share": pytest.approx(2 / 3),
                     "ratings_hist": {"1": 1, "2": 0, "3": 0, "4": 1, "5": 1}}
    empty = trajectory_stats([])
    assert empty["visits"] == 0 and empty["watch_ratio"] == 0.0


def test_slots_hold_the_humans_items_independently_by_default() -> None:
    from scipy.stats import binom

    cfg = TrajectoryConfig()
    probs = cfg.count_probs()
    assert np.allclose(probs, binom.pmf(range(5), 4, cfg.slot_share))
    assert abs(probs @ np.arange(5) - 1.15) < 1e-9  # 1.15 of the human's items a 4-item page
    capped = TrajectoryConfig(watch_probs=(0.2, 0.45, 0.35)).count_probs()
    assert np.allclose(capped, [0.2, 0.45, 0.35])
    counts = [n for s in range(200) for v in plan_visits(12, cfg, np.random.default_rng(s))
              for n in v]
    assert max(counts) >= 3  # no cap at 2: a page can hold 3 or 4 of the human's items


def _mates_label_corr(world, cfg: TrajectoryConfig) -> float:
    own, mates = [], []
    for t in world.trajectories("train", cfg=cfg, progress=False):
        for step in t.steps:
            labels = [int(i in step.watched) for i in step.items]
            for y in labels:
                own.append(y)
                mates.append((sum(labels) - y) / max(len(labels) - 1, 1))
    return float(np.corrcoef(own, mates)[0, 1])


def test_independent_slots_leave_page_mates_uninformative(small_world) -> None:
    """Capped at 2 of the human's items a page, a slot's label falls with its page-mates'
    (the construction teaches a pull); with independent slots it barely does (only a visit's
    last page, cut to the items left, ties them)."""
    capped = _mates_label_corr(small_world, TrajectoryConfig(watch_probs=(0.2, 0.45, 0.35)))
    independent = _mates_label_corr(small_world, TrajectoryConfig())
    assert capped < -0.15, capped
    assert abs(independent) < 0.06, independent
