"""Shared fixtures: bundled MovieLens-100K (loaded once per session) and a tiny hand-made set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pandas as pd
import pytest

from simulator.data import Dataset, Item, User, validate
from simulator.readers import load_dataset
from simulator.split import Split, make_split

if TYPE_CHECKING:
    from agents.scorer import Scorer
    from agents.world import World
    from training.pipeline import Prepared


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def ml100k() -> Dataset:
    return load_dataset("ml-100k")


@pytest.fixture(scope="session")
def split100k(ml100k: Dataset) -> Split:
    return make_split(ml100k.ratings)


@pytest.fixture(scope="session")
def small_world(ml100k: Dataset) -> World:
    """The first 40 users of ml-100k (all items): big enough for every split part, 1:m lists
    (10 held-out ratings a user) and the exposure mixture's recommenders, fast to build. The
    6-user ``tiny_dataset`` is too small for those (about one test rating a user)."""
    from agents.world import World

    ratings = ml100k.ratings[ml100k.ratings["user"] <= 40]
    ds = Dataset(name="ml-100k-40", users={u: ml100k.users[u] for u in range(1, 41)},
                 items=ml100k.items, ratings=ratings)
    return World(ds=ds, split=make_split(ds.ratings))


@pytest.fixture(scope="session")
def quick_bundle(small_world: World):
    """What the quick evaluation preset shows the agents on ``small_world`` (built once)."""
    from evaluation.run import EvalConfig, build_bundle

    return build_bundle(small_world, EvalConfig.quick())


@pytest.fixture(scope="session")
def prepared(small_world: World) -> Prepared:
    """A small prepared training file of ``small_world``: train, counterfactual, validation
    and calibration transitions, validation lists and sessions."""
    from training.config import TrainConfig
    from training.pipeline import prepare, train_data

    cfg = TrainConfig(wm_transitions=30, cr_transitions=10, valid_examples=5,
                      calibration_pages=12, calibration_lists=6, calibration_sessions=2,
                      seed=0)
    return prepare(cfg, train_data(small_world, cfg))


TINY_GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


@pytest.fixture
def tiny_dataset() -> Dataset:
    """6 users x 12 items; user u rates 6 items at timestamps 1000*u + 10*k (k = 0..5).

    Item i (1..12) is titled "Movie i", year 1990 + i, with genres TINY_GENRES[(i-1) % 6] and
    TINY_GENRES[i % 6]. User u rates items u..u+5 (wrapping past 12) with rating 1 + (u + k) % 5.
    """
    users = {u: User(id=u, age=20 + 5 * u, gender="F" if u % 2 else "M",
                     occupation=["student", "engineer", "artist"][u % 3]) for u in range(1, 7)}
    items = {i: Item(id=i, title=f"Movie {i}", year=1990 + i,
                     genres=(TINY_GENRES[(i - 1) % 6], TINY_GENRES[i % 6])) for i in range(1, 13)}
    rows = [(u, (u - 1 + k) % 12 + 1, float(1 + (u + k) % 5), 1000 * u + 10 * k)
            for u in range(1, 7) for k in range(6)]
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    return validate("tiny", users, items, ratings)


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    """A tiny random Llama's scorer for a module's decision tests (a module may define its own)."""
    from agents.llm import tiny_lm
    from agents.scorer import Scorer

    return Scorer(tiny_lm(seed=4), cache_size=256)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine extra threads only
    contend (a 40x slowdown was measured); restored afterwards for other modules."""
    import torch

    patch = pytest.MonkeyPatch()
    patch.setenv("ALIGNUSER_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    patch.undo()
