"""Offline top-k accuracy of recommenders, the yardstick a simulator's verdicts are checked against.

Metrics come from LensKit (``RunAnalysis`` with Recall, Precision and NDCG) so the numbers match
what the field reports. Every held-out item counts as relevant whatever its rating, and items in
``train`` are never recommended. When scoring the test split of models fit on train, pass
train+valid as ``train`` so valid items are excluded instead of counted as misses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
from lenskit.data import ItemList, ItemListCollection
from lenskit.metrics import NDCG, Precision, Recall, RunAnalysis

from simulator.recommenders import Recommender


def recommendation_lists(rec: Recommender, train: pd.DataFrame, users: Iterable[int],
                         k: int) -> ItemListCollection:
    """One ranked list per user, never containing that user's ``train`` items."""
    seen = {int(u): set(g.tolist()) for u, g in train.groupby("user")["item"]}
    out = ItemListCollection.empty(["user"])
    for u in users:
        ids = rec.rank(int(u), k, exclude=seen.get(int(u), ()))
        out.add(ItemList(item_ids=np.asarray(ids, dtype=np.int64), ordered=True), user=int(u))
    return out


def offline_metrics(recs: Mapping[str, Recommender], train: pd.DataFrame, test: pd.DataFrame,
                    k: int = 10, users: Iterable[int] | None = None) -> pd.DataFrame:
    """Mean Recall@k, Precision@k and NDCG@k per recommender (rows), over users with test items.

    ``users`` narrows the evaluated users (those without test items are skipped, since recall
    and NDCG are undefined for them).
    """
    truth_frame = test[["user", "item"]].drop_duplicates().rename(columns={"item": "item_id"})
    truth = ItemListCollection.from_df(truth_frame, "user")
    wanted = sorted(int(u) for u in truth_frame["user"].unique())
    if users is not None:
        chosen = {int(u) for u in users}
        wanted = [u for u in wanted if u in chosen]
    rows = []
    for name, rec in recs.items():
        analysis = RunAnalysis(Recall(k), Precision(k), NDCG(k))
        result = analysis.measure(recommendation_lists(rec, train, wanted, k), truth)
        means = result.list_summary()["mean"]
        rows.append({"recommender": name,
                     f"Recall@{k}": float(means[f"Recall@{k}"]),
                     f"Precision@{k}": float(means[f"Precision@{k}"]),
                     f"NDCG@{k}": float(means[f"NDCG@{k}"]),
                     "users": len(wanted)})
    return pd.DataFrame(rows).set_index("recommender")


def rating_predictions(train: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Rating baselines for (user, item) pairs: LensKit user+item bias and biased MF (ALS).

    Predictions are clipped to 1–5; a pair a model cannot score gets the train mean.
    """
    import warnings

    from lenskit.als import BiasedMFScorer
    from lenskit.basic import BiasScorer
    from lenskit.data import ItemList, RecQuery, from_interactions_df
    from lenskit.training import TrainingOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = from_interactions_df(train[["user", "item", "rating", "timestamp"]].copy())
        models = {"user+item bias": BiasScorer(damping=5.0),
                  "biased MF (ALS, 50)": BiasedMFScorer(embedding_size=50, damping=5.0)}
        for model in models.values():
            model.train(data, TrainingOptions(rng=0))
    mean = float(train["rating"].mean())
    out = {}
    for name, model in models.items():
        preds = np.full(len(pairs), mean)
        for user, idx in pairs.groupby("user").indices.items():
            items = pairs["item"].to_numpy()[idx]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = model(RecQuery(user_id=int(user)), ItemList(item_ids=items)).scores()
            scores = np.asarray(scores, dtype=float)
            preds[idx] = np.where(np.isfinite(scores), scores, mean)
        out[name] = np.clip(preds, 1.0, 5.0)
    return out
