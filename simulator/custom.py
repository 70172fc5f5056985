"""Recommenders brought from outside, named by a spec string beside the built-in names.

A spec is one of:

- a built-in name: ``random``, ``pop``, ``itemknn``, ``userknn``, ``als``, ``bpr`` (any case);
- ``module:Class`` naming a LensKit pipeline component that scores items, e.g.
  ``lenskit.knn:ItemKNNScorer`` or ``lenskit.als:BiasedMFScorer``, optionally configured with
  ``?option=value&...`` (``lenskit.knn:ItemKNNScorer?k=50&feedback=implicit``). It is trained on
  the training split and wrapped like the built-ins (``LensKitRecommender``): it sees history plus
  session, and ties and unscored items fall back to popularity, then item id;
- ``module:factory`` naming any other callable: ``factory()`` returns an object with ``fit``,
  ``rank`` and ``scores`` (the ``Recommender`` protocol) and a ``name`` (default: the factory's);
- ``file:PATH``, or a path ending in ``.csv``, ``.csv.gz``, ``.parquet`` or ``.pq``: a ranking
  precomputed elsewhere (RecBole, Elliot, a production system) with columns ``user,item`` and
  ``score`` (higher is better) or ``rank`` (1 is best), in the dataset's ids. It is static: the
  session never changes it. Users and items it does not rank fall back to popularity, then id.

Modules are imported as Python imports them: installed, or on ``PYTHONPATH``. Every spec is
checked by ``check_recommenders`` when a config is built, before any data loads.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd
from lenskit.data import Dataset as LKDataset
from lenskit.data import ItemList, RecQuery
from lenskit.pipeline import Component
from lenskit.training import TrainingOptions

from simulator.data import RATING_MAX, RATING_MIN
from simulator.recommenders import (
    RECOMMENDERS,
    LensKitRecommender,
    Recommender,
    keep_torch_threads,
    make_recommender,
)

FILE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
_EMPTY = np.zeros(0, dtype=np.int64)
MID_RATING = (RATING_MIN + RATING_MAX) / 2  # for a user with no training ratings
PROTOCOL = ("fit", "rank", "scores")
SPEC_HELP = ("a built-in name, module:attribute (a factory or a LensKit component), or a "
             ".csv/.parquet ranking file")


@dataclass(frozen=True)
class Spec:
    """A checked spec: its kind, the text to record, the name shown in tables, what it loads."""

    kind: Literal["builtin", "lenskit", "factory", "file"]
    text: str
    label: str
    target: Any = None
    options: dict[str, str] = field(default_factory=dict)


def parse_spec(spec: str) -> Spec:
    """Check one spec fully (import, attribute, factory result, file header); ValueError if not."""
    text = spec.strip() if isinstance(spec, str) else ""
    if text.lower() in RECOMMENDERS:
        return Spec("builtin", text.lower(), text.lower())
    if text.startswith("file:") or text.lower().endswith(FILE_SUFFIXES):
        path = Path(text.removeprefix("file:")).expanduser()
        check_ranking_file(path)
        return Spec("file", text, _stem(path), path)
    if ":" not in text:
        raise ValueError(f"unknown recommender(s) {text!r}; known: {', '.join(RECOMMENDERS)}; "
                         f"or give {SPEC_HELP}")
    target, _, query = text.partition("?")
    module, _, attr = target.partition(":")
    obj = _import(text, module.strip(), attr.strip())
    options = dict(parse_qsl(query, keep_blank_values=True))
    if isinstance(obj, type) and issubclass(obj, Component):
        _check_component(text, obj, options)
        shown = ",".join(f"{k}={v}" for k, v in options.items())
        return Spec("lenskit", text, f"{obj.__name__}({shown})" if shown else obj.__name__,
                    obj, options)
    if query:
        raise ValueError(f"recommender {text!r}: options after '?' apply only to LensKit "
                         f"components, and {attr} is not one")
    if not callable(obj):
        raise ValueError(f"recommender {text!r}: {attr} is a {type(obj).__name__}, neither a "
                         "factory to call nor a LensKit component class")
    made = _call_factory(text, obj, attr)
    return Spec("factory", text, str(getattr(made, "name", "") or attr.rsplit(".", 1)[-1]), obj)


def check_recommenders(names: list[str]) -> list[str]:
    """Config validator: every spec checked, built-ins lower-cased, display names distinct."""
    if not names:
        raise ValueError(f"name at least one recommender; known: {', '.join(RECOMMENDERS)}")
    unknown = [n.strip() for n in names if not n.strip()]
    if unknown:
        raise ValueError(f"unknown recommender(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(RECOMMENDERS)}")
    specs = [parse_spec(n) for n in names]
    seen: dict[str, str] = {}
    for s in specs:
        if s.label in seen:
            raise ValueError(f"recommenders {seen[s.label]!r} and {s.text!r} would both be "
                             f"shown as {s.label!r}; give each a distinct name")
        seen[s.label] = s.text
    return [s.text for s in specs]


def recommender_label(spec: str) -> str:
    """The short name a spec's results are shown and keyed under."""
    return parse_spec(spec).label


def load_recommender(spec: str, reactive: bool = True, seed: int = 0) -> Recommender:
    """An unfitted recommender for any spec; call ``fit(train)`` before ranking."""
    keep_torch_threads()  # before a user's own object trains LensKit models in its fit
    s = parse_spec(spec)
    if s.kind == "builtin":
        return make_recommender(s.text, reactive=reactive, seed=seed)
    if s.kind == "lenskit":
        return ComponentRecommender(s.target, s.options, s.label, reactive=reactive, seed=seed)
    if s.kind == "file":
        return RankingFileRecommender(s.target, s.label, reactive=False, seed=seed)
    attr = s.text.partition(":")[2]
    return ObjectRecommender(_call_factory(s.text, s.target, attr), s.label, reactive)


# ---- checks ---------------------------------------------------------------------------------
def _import(spec: str, module: str, attr: str) -> Any:
    if not module or not attr:
        raise ValueError(f"recommender {spec!r}: expected module:attribute, e.g. "
                         "examples.my_recommender:factory or lenskit.knn:ItemKNNScorer")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"recommender {spec!r}: cannot import module {module!r} ({exc}); "
                         "install it or put its folder on PYTHONPATH") from exc
    except Exception as exc:  # the user's module failed while importing
        raise ValueError(f"recommender {spec!r}: importing {module!r} failed "
                         f"({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"recommender {spec!r}: module {module!r} has no attribute "
                             f"{attr!r}")
        obj = getattr(obj, part)
    return obj


def _call_factory(spec: str, factory: Callable[[], Any], attr: str) -> Any:
    try:
        made = factory()
    except Exception as exc:
        raise ValueError(f"recommender {spec!r}: {attr}() failed "
                         f"({type(exc).__name__}: {exc})") from exc
    missing = [m for m in PROTOCOL if not callable(getattr(made, m, None))]
    if missing:
        raise ValueError(f"recommender {spec!r}: {attr}() returned a {type(made).__name__} "
                         f"without {', '.join(missing)} (a Recommender needs fit, rank, scores)")
    return made


def _check_component(spec: str, cls: type[Component], options: dict[str, str]) -> None:
    if "items" not in inspect.signature(cls.__call__).parameters:
        raise ValueError(f"recommender {spec!r}: {cls.__name__} does not score items "
                         "(its __call__ takes no 'items')")
    try:
        cls.validate_config(options or None)
    except Exception as exc:  # pydantic's message spans lines; keep the first complaint
        errors = getattr(exc, "errors", lambda: [])()
        why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or exc
        raise ValueError(f"recommender {spec!r}: bad option for {cls.__name__} ({why})") from None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)] or name
    return path.stem or name


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith((".parquet", ".pq"))


def _score_column(path: Path, columns: Sequence[str]) -> str:
    if "user" not in columns or "item" not in columns or not {"score", "rank"} & set(columns):
        raise ValueError(f"ranking file {path}: needs columns user, item and score or rank; "
                         f"it has {', '.join(map(str, columns)) or 'none'}")
    return "score" if "score" in columns else "rank"


def check_ranking_file(path: Path) -> str:
    """The file exists and its header has the needed columns; returns the score column."""
    if not path.is_file():
        raise ValueError(f"ranking file {path} does not exist")
    try:
        if _is_parquet(path):
            import pyarrow.parquet as pq

            columns = list(pq.read_schema(path).names)
        else:
            columns = list(pd.read_csv(path, nrows=0).columns)
    except Exception as exc:
        kind = "Parquet" if _is_parquet(path) else "CSV"
        raise ValueError(f"ranking file {path}: cannot read it as {kind} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         ) from exc
    return _score_column(path, [str(c).strip() for c in columns])


def read_ranking_file(path: Path) -> pd.DataFrame:
    """``user, item, score`` rows (``rank`` turned into ``-rank``), one per pair, best kept."""
    column = check_ranking_file(path)
    frame = (pd.read_parquet(path) if _is_parquet(path) else pd.read_csv(path))
    frame = frame.rename(columns=lambda c: str(c).strip())[["user", "item", column]]
    for col in ("user", "item", column):
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna()
        if col != column:
            bad |= values % 1 != 0
        if bad.any():
            first = frame[col][bad].iloc[0]
            what = "integer ids" if col != column else "numbers"
            raise ValueError(f"ranking file {path}: column {col} must hold {what}; "
                             f"{int(bad.sum())} row(s) do not (first: {first!r})")
        frame[col] = values
    score = frame[column].astype(np.float64)
    out = pd.DataFrame({"user": frame["user"].astype(np.int64),
                        "item": frame["item"].astype(np.int64),
                        "score": -score if column == "rank" else score})
    return out.sort_values("score", ascending=False).drop_duplicates(["user", "item"])


# ---- adapters -------------------------------------------------------------------------------
class ComponentRecommender(LensKitRecommender):
    """Any LensKit scorer, trained and queried with history + session like the built-ins."""

    def __init__(self, component: type[Component], options: dict[str, str], name: str,
                 reactive: bool = True, seed: int = 0) -> None:
        super().__init__(name, reactive=reactive, seed=seed)
        self._component, self._options = component, dict(options)

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        self._scorer = self._component(**self._options)
        if callable(getattr(self._scorer, "train", None)):
            self._scorer.train(data, options)
        self._query = "query" in inspect.signature(self._component.__call__).parameters
        self._index = pd.Index(self._ids)
        self._data = data

    def _history_items(self, user: int) -> ItemList:
        """The training row with its ratings, which explicit-feedback scorers read."""
        il = self._history_list.get(user)
        if il is None:
            row = self._data.user_row(user)
            il = self._history_list[user] = row if row is not None else ItemList(
                item_ids=_EMPTY, rating=np.zeros(0))
        return il

    def _session_query(self, user: int, session: np.ndarray) -> RecQuery:
        """Session items carry the user's mean training rating: the pages know what was
        watched, not its rating, and explicit scorers need one (implicit ones ignore it)."""
        history = self._history_items(user)
        if not len(session):
            return RecQuery(user_id=user, history_items=history)
        rated = history.field("rating")
        mean = float(np.mean(rated)) if rated is not None and len(rated) else MID_RATING
        items = ItemList(item_ids=session, rating=np.full(len(session), mean))
        return RecQuery(user_id=user, history_items=history, session_items=items,
                        query_source={"history", "session"})

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = (self._scorer(self._session_query(user, session), self._catalog) if self._query
                   else self._scorer(self._catalog))
        if not isinstance(out, ItemList):
            raise TypeError(f"{self.name} returned {type(out).__name__}, not an ItemList")
        scores = out.scores()
        if scores is None:  # a ranker that orders without scoring: its order is its score
            if not out.ordered:
                raise TypeError(f"{self.name} returned items with neither scores nor an order")
            scores = np.arange(len(out), 0, -1, dtype=np.float64)
        raw = np.full(len(self._ids), np.nan)
        pos = self._index.get_indexer(np.asarray(out.ids()))
        raw[pos[pos >= 0]] = np.asarray(scores, dtype=np.float64)[pos >= 0]
        return raw


class RankingFileRecommender(LensKitRecommender):
    """A precomputed ranking read from a file; static by nature (the session never moves it)."""

    uses_session = False

    def __init__(self, path: Path, name: str, reactive: bool = False, seed: int = 0) -> None:
        super().__init__(name, reactive=False, seed=seed)
        self.path = Path(path)

    def _train(self, data: LKDataset, options: TrainingOptions) -> None:
        frame = read_ranking_file(self.path)
        pos = pd.Index(self._ids).get_indexer(frame["item"].to_numpy())
        if len(frame) and not (pos >= 0).any():
            raise ValueError(f"ranking file {self.path}: none of its items is in the training "
                             "data; are its ids the dataset's?")
        kept = frame.assign(pos=pos)[pos >= 0]
        self._ranked = {int(u): (g["pos"].to_numpy(), g["score"].to_numpy(dtype=np.float64))
                        for u, g in kept.groupby("user", sort=False)}

    def _raw_scores(self, user: int, session: np.ndarray) -> np.ndarray:
        raw = np.full(len(self._ids), np.nan)
        hit = self._ranked.get(int(user))
        if hit is not None:
            raw[hit[0]] = hit[1]
        return raw


class ObjectRecommender:
    """A factory's object behind the rules every page follows: ``exclude`` and session items
    never shown, at most ``k`` distinct ids, and no session at all in static mode."""

    def __init__(self, inner: Any, name: str, reactive: bool = True) -> None:
        self.inner, self.name, self.reactive = inner, name, reactive

    def __repr__(self) -> str:
        return f"<ObjectRecommender {self.name} {'reactive' if self.reactive else 'static'}>"

    def fit(self, train: pd.DataFrame) -> ObjectRecommender:
        self.inner.fit(train)
        return self

    def rank(self, user: int, k: int, exclude: Collection[int] = (),
             session: Sequence[int] = ()) -> list[int]:
        banned = {int(i) for i in exclude} | {int(i) for i in session}
        ids = self.inner.rank(int(user), k, exclude=banned,
                              session=list(session) if self.reactive else [])
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i not in banned:
                banned.add(i)
                out.append(i)
        return out[:k]

    def scores(self, user: int, items: Sequence[int], session: Sequence[int] = ()) -> np.ndarray:
        sess = list(session) if self.reactive else []
        return np.asarray(self.inner.scores(int(user), list(items), session=sess),
                          dtype=np.float64)
