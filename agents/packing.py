"""Packing a decision's candidate lines into one token tree.

A page's candidate lines repeat each other: a slot's watch and skip lines share the slot's cue
line, every slot shares the tail after the page, the five rating lines share the choices before
them. Scored as separate rows, each repeat is pushed through the model again and each row
carries its own copy of the page's KV cache. Packed as a trie, each distinct token position is
pushed once, in one row per prefix, and an ancestor mask lets every token attend only to the
prefix and to the tokens on its own path, so each candidate's log-prob is what it would be
alone (up to float round-off). A leaf (a node with no child: each option's last token) is read
off its parent's row and predicts nothing, so only the nodes with a child are pushed: about 7%
of a page's tree nodes, 4% of the positions a full agent's list pushes.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Trie:
    """One request's options as a token trie. Node ``n`` holds ``tokens[n]`` at ``depth[n]``
    tokens after the prefix, under ``parents[n]`` (-1: directly after the prefix); nodes are
    numbered so a parent comes before its children. ``targets[k]`` are the nodes of option
    ``k``'s target tokens, in order."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    targets: list[list[int]]

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def pushed(self) -> np.ndarray:
        """The nodes a forward must push, in order: those with a child. A leaf's token is
        scored from its parent's row (or the prefix's last position) and its own row would
        predict nothing."""
        return np.unique(np.asarray([p for p in self.parents if p >= 0], dtype=np.int64))

    @property
    def width(self) -> int:
        """Token positions the tree takes in a forward."""
        return len(self.pushed)

    def column(self, node: int) -> int:
        """The forward column of pushed ``node``."""
        col = int(np.searchsorted(self.pushed, node))
        if col == len(self.pushed) or self.pushed[col] != node:
            raise ValueError(f"node {node} is a leaf: it is not pushed")
        return col

    def ancestors(self) -> np.ndarray:
        """(n, n) boolean: row ``i`` marks ``i`` and the nodes on its path from the prefix."""
        n = len(self.tokens)
        anc = np.zeros((n, n), dtype=bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                anc[i] = anc[parent]
            anc[i, i] = True
        return anc


def build_trie(options: Sequence[tuple[list[int], list[int]]]) -> Trie:
    """The trie of ``(context ids, target ids)`` options; equal leading tokens share nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    child: dict[tuple[int, int], int] = {}
    targets: list[list[int]] = []
    for context, target in options:
        node, path = -1, []
        for k, token in enumerate([*context, *target]):
            key = (node, token)
            if key not in child:
                child[key] = len(tokens)
                tokens.append(token)
                parents.append(node)
                depths.append(depths[node] + 1 if node >= 0 else 0)
            node = child[key]
            if k >= len(context):
                path.append(node)
        targets.append(path)
    return Trie(tokens, parents, depths, targets)


def tree_inputs(tries: Sequence[Trie], prefix_lens: Sequence[int], width_kv: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids (B, W), position ids (B, W) and an additive 4D mask (B, 1, W, P + W) for
    rows whose prefix KV is right-padded to ``width_kv`` = P; row ``r``'s columns are its
    trie's pushed nodes (``Trie.column``), at least one column however small the trees. A
    padding query attends to its prefix only, so no attention row is empty (an empty row is
    NaN under SDPA)."""
    batch, width = len(tries), max([1, *(t.width for t in tries)])
    ids = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    allowed = np.zeros((batch, width, width_kv + width), dtype=bool)
    for r, (trie, p) in enumerate(zip(tries, prefix_lens, strict=True)):
        keep, n = trie.pushed, trie.width
        ids[r, :n] = torch.tensor(np.asarray(trie.tokens)[keep])
        positions[r, :n] = torch.tensor(np.asarray(trie.depths)[keep]) + p
        positions[r, n:] = p
        allowed[r, :, :p] = True
        # a pushed node's ancestors all have a child, so they are pushed too
        allowed[r, :n, width_kv:width_kv + n] = trie.ancestors()[np.ix_(keep, keep)]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~torch.from_numpy(allowed), torch.finfo(dtype).min)
    return ids, positions, mask[:, None]


def padded_chunks(widths: Sequence[int], overhead: int | None, max_rows: int,
                  max_tokens: int, base: int = 0) -> list[tuple[int, int]]:
    """Split rows sorted longest first into consecutive batches ``[start, end)``, each padded
    to its first row's width. Each batch holds at most ``max_rows`` rows and ``max_tokens``
    positions (``base`` shared leading positions counted per row), or is one row.

    ``overhead``: what one more forward costs, in padded positions. The split then minimises
    padded positions plus ``overhead`` per forward: a lockstep batch of agents mixes a page's
    long expectation tree with others' short decision trees, and with every row padded to the
    longest, 22% of the positions a 16-agent population pushed were padding
    (``bench/bench_padding.py``). None: as many rows per batch as the limits allow (fewest
    forwards)."""
    n = len(widths)
    if any(a < b for a, b in itertools.pairwise(widths)):
        raise ValueError("widths must be sorted longest first")

    def fits(i: int, j: int) -> bool:
        return j - i == 1 or (j - i <= max_rows and (j - i) * (base + widths[i]) <= max_tokens)

    if overhead is None:
        out, i = [], 0
        while i < n:
            j = i + 1
            while j < n and fits(i, j + 1):
                j += 1
            out.append((i, j))
            i = j
        return out
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(-1, j - 1 - max_rows), -1):
            if not fits(i, j):
                break
            cost = best[i] + (j - i) * widths[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]
