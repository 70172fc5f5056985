"""Turning item ids and a person's history into what the agent perceives.

Public facts (title, genres, train popularity, mean rating) and personal evidence (this person's
most similar past items and the ratings they gave them) are kept apart: ``facts`` is what any
simulator shows; ``with_evidence`` adds what lets a small model go beyond popularity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agents.text import Evidence, ItemView
from memory.evidence import ItemSimilarity
from simulator.data import Item


@dataclass
class Perceiver:
    items: Mapping[int, Item]
    similarity: ItemSimilarity
    k_evidence: int = 3

    def facts(self, item_id: int) -> ItemView:
        it = self.items[item_id]
        mean = self.similarity.mean_rating(item_id)
        return ItemView(id=item_id, title=it.title, year=it.year, genres=it.genres,
                        popularity=self.similarity.popularity(item_id),
                        mean_rating=None if mean is None else round(mean, 1))

    def evidence(self, item_id: int, history: Mapping[int, float]) -> list[Evidence]:
        return [Evidence(title=self.items[j].title, rating=int(round(r)),
                         similarity=round(sim, 3))
                for j, sim, r in self.similarity.similar_in_history(item_id, history,
                                                                    self.k_evidence)]

    def with_evidence(self, views: Sequence[ItemView], history: Mapping[int, float],
                      without: int | None = None) -> list[ItemView]:
        """Add the personal evidence: similar past titles and the collaborative match.
        ``without``: the train user whose own ratings the match must not have seen (their
        training pages, ``ItemSimilarity.history_scores``)."""
        match = self.similarity.match_percentiles(history, without)
        out = []
        for v in views:
            n, mean = self.similarity.closest_watched(v.id, history)
            out.append(v.model_copy(update={
                "evidence": self.evidence(v.id, history), "match": match.get(v.id, 0),
                "close_watched": n, "close_rating": None if mean is None else round(mean, 1),
                "likely_rating": round(self.similarity.knn_rating(v.id, history), 1)}))
        return out

    def page(self, item_ids: Sequence[int], history: Mapping[int, float],
             without: int | None = None) -> list[ItemView]:
        return self.with_evidence([self.facts(i) for i in item_ids], history, without)
