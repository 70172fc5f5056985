"""The cached-prefix pieces the scorer is built from: a prefix's KV entry, a batch cache over
views of it, and the counters benchmarks read."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class ScorerStats:
    """Plain counters so benchmarks can report forwards per decision and cache behaviour."""

    calls: int = 0
    forwards: int = 0
    tokens: int = 0  # token positions pushed through forwards (batch x length)
    options: int = 0
    prefix_hits: int = 0  # exact prefix found in the LRU
    prefix_extends: int = 0  # a cached prefix's leading tokens were reused
    prefix_misses: int = 0
    reused_tokens: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class Prefix:
    ids: tuple[int, ...]
    kv: KV  # per layer, batch 1, never mutated
    next_logprobs: torch.Tensor  # fp32 log-probs of the token after the prefix

    @property
    def nbytes(self) -> int:
        return self.next_logprobs.nbytes + sum(k.nbytes + v.nbytes for k, v in self.kv)


def expanded_cache(config: Any, kv: KV, batch: int, length: int | None = None) -> Any:
    """A fresh cache over batch-expanded views of the first ``length`` cached positions. The
    forward's ``update`` concatenates into new tensors, so stored entries are never written.
    Views go into plain DynamicLayers directly because the public ``ddp_cache_data`` route
    copies them once more (~0.2 s per 30-option decision); other layer kinds take that route."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    views = [
        (k[:, :, :length].expand(batch, -1, -1, -1), v[:, :, :length].expand(batch, -1, -1, -1))
        for k, v in kv
    ]
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(views) or any(type(x) is not DynamicLayer for x in cache.layers):
        return DynamicCache(ddp_cache_data=views, config=config)
    for layer, (k, v) in zip(cache.layers, views, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache
