"""The cached-prefix pieces the scorer is built from: a prefix's KV entry, a batch cache over
views of it, and the counters benchmarks read."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class ScorerStats:
    """Plain counters so benchmarks can report forwards per decision and cache behaviour."""

    calls: int = 0
    forwards: int = 0
    tokens: int = 0  # token positions pushed through forwards (batch x length)
    padding: int = 0  # of those, positions that pad a shorter row to its batch's width
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


@functools.cache
def _room_layer_type() -> type:
    """A DynamicLayer over preallocated ``keys``/``values`` buffers (``_room``: the full
    buffers; ``keys``/``values``: the positions filled so far): each step's new entries are
    written into the room after them. A DynamicLayer concatenates the whole cache into new
    tensors every step, which was 60% of a batched decoding step on the CPU (64 prompts of
    ~650 tokens copy ~1 GB a step). Built on first use: transformers loads lazily."""
    from transformers.cache_utils import DynamicLayer

    class RoomLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self._room
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > keys.shape[-2]:  # out of room: grow as a DynamicLayer does
                return super().update(key_states, value_states, *args, **kwargs)
            keys[:, :, start:end] = key_states
            values[:, :, start:end] = value_states
            self.keys, self.values = keys[:, :, :end], values[:, :, :end]
            return self.keys, self.values

    return RoomLayer


def _room_layer(keys: torch.Tensor, values: torch.Tensor, used: int) -> Any:
    layer = _room_layer_type()()
    layer.lazy_initialization(keys, values)
    layer._room = (keys, values)
    layer.keys, layer.values = keys[:, :, :used], values[:, :, :used]
    return layer


def padded_cache(config: Any, entries: Sequence[Prefix], room: int = 0) -> Any:
    """One batch cache over the entries' KV, each right-padded with zeros to the longest,
    with ``room`` positions reserved after it for tokens appended in place."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    width = max(len(e.ids) for e in entries)
    layers = []
    for li in range(len(entries[0].kv)):
        k0, v0 = entries[0].kv[li]
        ks = k0.new_zeros((len(entries), k0.shape[1], width + room, k0.shape[3]))
        vs = v0.new_zeros((len(entries), v0.shape[1], width + room, v0.shape[3]))
        for row, e in enumerate(entries):
            k, v = e.kv[li]
            ks[row, :, :k.shape[2]] = k[0]
            vs[row, :, :v.shape[2]] = v[0]
        layers.append((ks, vs))
    if room:
        cache = DynamicCache(config=config)
        if len(cache.layers) == len(layers) and all(type(x) is DynamicLayer
                                                    for x in cache.layers):
            cache.layers = [_room_layer(k, v, width) for k, v in layers]
            return cache
    # no room asked for, or layers of another kind (sliding windows): appends grow the cache
    return DynamicCache(ddp_cache_data=[(k[:, :, :width], v[:, :, :width]) for k, v in layers],
                        config=config)
