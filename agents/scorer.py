"""Scoring candidate continuations under a causal LM, with the persona/page prefix cached.

A decision scores a handful of short candidate lines after one long shared prefix. The prefix's
KV cache is computed once (and reused by any later prefix that extends it), and all candidates
are packed as one token tree (``agents.packing``) scored in one row over it; the rows of many
prefixes share a batched forward.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from agents.generation import greedy_many
from agents.kvcache import Prefix, ScorerStats, expanded_cache, padded_cache
from agents.llm import LM, cache_arg, encode, output_cache
from agents.packing import Trie, build_trie, padded_chunks, tree_inputs

_KEY = 8  # leading tokens a cached prefix must share to be extended in a batched call
_SHARED = 32  # leading tokens uncached prefixes of one call must share to compute them once
_HEAD_ROWS = 1024  # hidden rows per fp32 head matmul (1024 x vocab x 4 bytes: ~200 MB)

# A page prompt's KV is ~10 MB (SmolLM2-135M, ~430 tokens): the LRU is bounded in bytes as well
# as entries, so a large cache_size cannot grow past the machine's memory. A batched step needs
# its own pages' prompts and the previous page's (the persona it extends): ~1.3 GB for 64 lists.
# 100 lists pushed the same tokens under 4, 2 and 1.5 GiB, peaking at 10.1, 9.0 and 8.2 GB
# (``bench/bench_list_memory.py``); 2 GiB leaves room for the 100 longer held-out pages that
# ``decide_chunked`` keeps at once.
CACHE_BYTES = 2 << 30
# What one more batched forward costs on the CPU, in padded token positions: its fixed work
# (a 1-row, 4-token tree over a 500-token prefix) over the cost of one more position (8 rows
# of 256 tokens against 8 of 128), SmolLM2-135M on a 2-core CPU
# (``python bench/bench_padding.py --forward-cost``).
CPU_FORWARD_POSITIONS = 128


class Scorer:
    """Log-likelihood scoring of candidate continuations with a prefix KV cache.

    Not thread-safe. Call `clear()` after changing the weights (cached prefixes go stale).
    """

    def __init__(self, lm: LM, cache_size: int = 16, batch_tokens: int | None = None,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.lm, self.cache_size = lm, cache_size
        self.cache_bytes = cache_bytes
        # Option tokens per batched forward in ``score_many``, and rows per forward (each row
        # carries a copy of its prefix's KV): larger on a GPU.
        gpu = lm.device.type == "cuda"
        self.batch_tokens = batch_tokens or (65536 if gpu else 4096)
        self.max_rows = 1024 if gpu else 64
        # Batches split where padding costs more than another forward (CPU); a GPU is not
        # measured, so it keeps the fewest forwards the limits allow.
        self.forward_positions: int | None = None if gpu else CPU_FORWARD_POSITIONS
        self.stats = ScorerStats()
        self._cache: OrderedDict[str, Prefix] = OrderedDict()
        self._cached_bytes = 0
        self._head: torch.Tensor | None = None

    def clear(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0
        self._head = None

    def _hidden(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final hidden states (batch, length, dim): only the rows a score needs go through
        the LM head (``_logprobs``), not every position of the forward."""
        self.stats.forwards += 1
        self.stats.tokens += input_ids.numel()
        decoder = self.lm.model.get_decoder()
        return decoder(input_ids=input_ids.to(self.lm.device), **kwargs).last_hidden_state

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 next-token log-probs of hidden rows. A bf16 LM head rounds logits near 20 to
        steps of 0.125, so every watch-vs-skip log-odds fell on a 1/8 grid and rankings tied;
        the head in fp32 costs one (rows x vocab) matmul. Assumes a plain linear head (no
        logit soft-capping), as the supported causal LMs have."""
        if self._head is None:
            self._head = self.lm.model.get_output_embeddings().weight.float()
        return torch.log_softmax(hidden.float() @ self._head.T, -1)

    def greedy_step(self, tokens: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
        """One decoding step of a batch (``agents.generation``): push one token per row into
        ``cache`` and return each row's next greedy token, read off the fp32 head as scores
        are; ``kwargs`` are the forward's (attention mask, positions)."""
        hidden = self._hidden(tokens[:, None], **{cache_arg(self.lm.model): cache},
                              use_cache=True, **kwargs)
        return self._logprobs(hidden[:, -1]).argmax(-1)

    def prefixes(self, encoded: dict[str, list[int]], keep: bool = True,
                 reuse: bool = True) -> dict[str, Prefix]:
        """The cached KV of each text (given with its token ids), computed in batches; with
        ``keep=False`` the cache is not touched (one-off prompts, e.g. a generation's, would
        evict the personas later pages reuse); with ``reuse=False`` nothing cached is used, so
        the KV depends on these texts alone, not on what this scorer computed before."""
        return self._prefixes_batched(encoded, keep, reuse)

    def _prefix(self, text: str) -> Prefix:
        ids = encode(self.lm.tokenizer, [text])
        if not ids:
            raise ValueError("prefix must not be empty: the first target token needs context")
        return self._prefixes_batched({text: ids})[text]

    @torch.inference_mode()
    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        """Summed log-prob of each option's target given prefix + its context."""
        return self.score_many([(prefix, options)])[0]

    @torch.inference_mode()
    def score_many(self, requests: Sequence[tuple[str, Sequence[tuple[str, str]]]]
                   ) -> list[list[float]]:
        """``score`` for many (prefix, options) requests at once: prefixes go through padded
        batched forwards, then each request's options, packed as one token tree
        (``agents.packing``), as one row of a padded batched forward over its prefix's cache.
        This is how a population or a set of lists is scored in lockstep."""
        self.stats.calls += len(requests)
        tok = self.lm.tokenizer
        prefixes: dict[str, list[int]] = {}
        for prefix, options in requests:
            if options and prefix not in prefixes:
                prefixes[prefix] = encode(tok, [prefix])
                if not prefixes[prefix]:
                    raise ValueError("prefix must not be empty: the first target token needs "
                                     "context")
        entries = self._prefixes_batched(prefixes)
        rows = []  # (request index, prefix entry, trie of its options)
        for r, (prefix, options) in enumerate(requests):
            self.stats.options += len(options)
            encoded = []
            for context, target in options:
                c, t = encode(tok, [context]), encode(tok, [target])
                if not t:
                    raise ValueError(f"empty target in option {(context, target)!r}")
                encoded.append((c, t))
            if encoded:
                rows.append((r, entries[prefix], build_trie(encoded)))
        out: list[list[float]] = [[] for _ in requests]
        rows.sort(key=lambda row: (-row[2].width, -len(row[1].ids)))
        for a, b in padded_chunks([t.width for _, _, t in rows], self.forward_positions,
                                  self.max_rows, self.batch_tokens):
            for (r, _, _), scores in zip(rows[a:b], self._trees_batched(rows[a:b]),
                                         strict=True):
                out[r] = scores
        return out

    def _prefixes_batched(self, prefixes: dict[str, list[int]], keep: bool = True,
                          reuse: bool = True) -> dict[str, Prefix]:
        """Right-padded batched prefix forwards; each prefix's KV is kept unpadded. A prefix
        that shares its leading tokens with a cached one (the persona, from this user's
        previous page) starts from that entry's KV, so only its new tokens are computed
        (unless not ``reuse``)."""
        found = {t: self._cache[t] for t in prefixes if reuse and t in self._cache}
        self.stats.prefix_hits += len(found)
        todo = [t for t in prefixes if t not in found]
        groups: dict[tuple[int, int], list[str]] = {}
        bases: dict[int, Prefix] = {}
        index: dict[tuple[int, ...], list[Prefix]] = {}
        for entry in self._cache.values() if reuse else ():
            index.setdefault(entry.ids[:_KEY], []).append(entry)
        for t in todo:
            base, start = None, 0
            for candidate in index.get(tuple(prefixes[t][:_KEY]), []):
                shared = len(os.path.commonprefix([candidate.ids, tuple(prefixes[t])]))
                if shared > start:
                    base, start = candidate, shared
            start = min(start, len(prefixes[t]) - 1)
            if base is None or start < _KEY:
                base, start = None, 0
            else:
                bases[id(base)] = base
            groups.setdefault((id(base) if base else 0, start), []).append(t)
        for entry, texts in self._shared_starts({t: prefixes[t] for t in groups.pop((0, 0), [])}):
            if entry is None:
                groups.setdefault((0, 0), []).extend(texts)
            else:
                bases[id(entry)] = entry
                groups[(id(entry), len(entry.ids))] = texts
        for (key, start), texts in groups.items():
            texts.sort(key=lambda t: -len(prefixes[t]))
            found.update(self._extend_batched(bases.get(key), start,
                                              {t: prefixes[t] for t in texts}))
        if not keep:  # the cache, its LRU order included, is left as it was
            return found
        for t, entry in found.items():
            if t not in self._cache:
                self._cached_bytes += entry.nbytes
            self._cache[t] = entry
            self._cache.move_to_end(t)
        # Least recently used first, never one this call returns.
        while len(self._cache) > len(prefixes) and (len(self._cache) > self.cache_size
                                                    or self._cached_bytes > self.cache_bytes):
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return found

    def _shared_starts(self, prefixes: dict[str, list[int]]
                       ) -> list[tuple[Prefix | None, list[str]]]:
        """Uncached prefixes that share at least ``_SHARED`` leading tokens (a list's pages:
        one persona, several pages) grouped, with that shared start computed once, in one
        batched forward for all groups, as a base each group extends; the rest under None.
        The base is not cached: the pages that extend it are."""
        order = sorted(prefixes, key=lambda t: prefixes[t])  # shared starts sort together
        runs: list[tuple[list[int], list[str]]] = []
        for t in order:
            ids = prefixes[t]
            if runs:
                start, texts = runs[-1]
                shared = min(len(os.path.commonprefix([start, ids])), len(ids) - 1)
                if shared >= _SHARED:
                    runs[-1] = (start[:shared], [*texts, t])
                    continue
            runs.append((ids[:len(ids) - 1], [t]))
        alone = [t for start, texts in runs if len(texts) == 1 for t in texts]
        starts = sorted(((f"\0{k}", start) for k, (start, texts) in enumerate(runs)
                         if len(texts) > 1), key=lambda kv: -len(kv[1]))  # longest first
        entries = self._extend_batched(None, 0, dict(starts)) if starts else {}
        out: list[tuple[Prefix | None, list[str]]] = [(None, alone)] if alone else []
        return out + [(entries[f"\0{k}"], texts) for k, (_, texts) in enumerate(runs)
                      if len(texts) > 1]

    def _extend_batched(self, base: Prefix | None, start: int,
                        prefixes: dict[str, list[int]]) -> dict[str, Prefix]:
        """Prefixes that all begin with ``base``'s first ``start`` tokens (none: ``start`` 0),
        longest first, in right-padded batches over the base's KV."""
        device = self.lm.device
        decoder = self.lm.model.get_decoder()
        todo, out = list(prefixes), {}
        for a, b in padded_chunks([len(prefixes[t]) - start for t in todo],
                                  self.forward_positions, self.max_rows, self.batch_tokens,
                                  base=start):
            chunk = todo[a:b]
            width = len(prefixes[chunk[0]]) - start
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), start + width, dtype=torch.long)
            mask[:, :start] = 1
            for row, t in enumerate(chunk):
                rest = prefixes[t][start:]
                ids[row, :len(rest)] = torch.tensor(rest)
                mask[row, start:start + len(rest)] = 1
            kwargs: dict[str, Any] = {}
            if base is not None:
                self.stats.prefix_extends += len(chunk)
                self.stats.reused_tokens += start * len(chunk)
                kwargs[cache_arg(self.lm.model)] = expanded_cache(self.lm.model.config, base.kv,
                                                                  len(chunk), start)
                kwargs["position_ids"] = torch.arange(start, start + width,
                                                      device=device).expand(len(chunk), -1)
            else:
                self.stats.prefix_misses += len(chunk)
            self.stats.forwards += 1
            self.stats.tokens += ids.numel()
            self.stats.padding += ids.numel() - int(mask[:, start:].sum())
            res = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                          use_cache=True, **kwargs)
            last = torch.tensor([len(prefixes[t]) - start - 1 for t in chunk], device=device)
            hidden = res.last_hidden_state[torch.arange(len(chunk), device=device), last]
            logprobs = self._logprobs(hidden)
            layers = [(k, v) for k, v, *_ in output_cache(res)]
            for row, t in enumerate(chunk):
                n_tok = len(prefixes[t])
                kv = tuple((k[row:row + 1, :, :n_tok].clone(), v[row:row + 1, :, :n_tok].clone())
                           for k, v in layers)
                out[t] = Prefix(tuple(prefixes[t]), kv, logprobs[row].clone())
        return out

    def _trees_batched(self, rows: list[tuple[int, Prefix, Trie]]) -> list[list[float]]:
        """One padded forward over rows of different prefixes: each row's prefix KV
        right-padded to the longest, its option tree after it under an ancestor mask."""
        device = self.lm.device
        p = max(len(e.ids) for _, e, _ in rows)
        ids, positions, mask = tree_inputs([t for _, _, t in rows],
                                           [len(e.ids) for _, e, _ in rows], p,
                                           self.lm.model.dtype)
        self.stats.padding += ids.numel() - sum(t.width for _, _, t in rows)
        # the options' keys and values are written into room after the prefixes, not
        # concatenated with every prefix into new tensors (a copy of ~1 GB for 64 pages)
        cache = padded_cache(self.lm.model.config, [e for _, e, _ in rows], room=ids.shape[1])
        hidden = self._hidden(ids, attention_mask=mask.to(device),
                              position_ids=positions.to(device),
                              **{cache_arg(self.lm.model): cache}, use_cache=True)
        # Every target node after the first position is predicted by its parent's hidden row;
        # all of them go through the fp32 head together.
        where: dict[tuple[int, int], int] = {}
        picks: list[tuple[int, int, int]] = []
        for r, (_, _, trie) in enumerate(rows):
            for path in trie.targets:
                for node in path:
                    if trie.parents[node] >= 0 and (r, node) not in where:
                        where[(r, node)] = len(picks)
                        picks.append((r, trie.column(trie.parents[node]),
                                      trie.tokens[node]))
        picked = self._picked_logprobs(hidden, picks)
        out = []
        for r, (_, e, trie) in enumerate(rows):
            scores = []
            for path in trie.targets:
                inner = [where[(r, n)] for n in path if trie.parents[n] >= 0]
                total = picked[torch.tensor(inner, dtype=torch.long, device=device)].sum()
                if trie.parents[path[0]] < 0:  # the prefix's last position predicts it
                    total = total + e.next_logprobs[trie.tokens[path[0]]]
                scores.append(float(total))
            out.append(scores)
        return out

    def _picked_logprobs(self, hidden: torch.Tensor, picks: Sequence[tuple[int, int, int]]
                         ) -> torch.Tensor:
        """Log-prob of token ``t`` at hidden row ``(row, col)`` for each ``(row, col, t)``.
        The rows go through the fp32 head together, in chunks: one head matmul per option
        read the 113 MB head once per option, a fifth of a list's scoring time."""
        device = hidden.device
        picked = torch.empty(len(picks), dtype=torch.float32, device=device)
        for lo in range(0, len(picks), _HEAD_ROWS):
            rows, cols, toks = (torch.tensor(x, dtype=torch.long, device=device)
                                for x in zip(*picks[lo:lo + _HEAD_ROWS], strict=True))
            picked[lo:lo + len(toks)] = self._logprobs(hidden[rows, cols])[
                torch.arange(len(toks), device=device), toks]
        return picked

    @torch.inference_mode()
    def score_naive(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        """Reference: one uncached forward per option over the full text."""
        self.stats.calls += 1
        self.stats.options += len(options)
        scores = []
        if not encode(self.lm.tokenizer, [prefix]):
            raise ValueError("prefix must not be empty: the first target token needs context")
        for context, target in options:
            head = encode(self.lm.tokenizer, [prefix, context])
            tail = encode(self.lm.tokenizer, [target])
            if not tail:
                raise ValueError(f"empty target in option {(context, target)!r}")
            hidden = self._hidden(torch.tensor([head + tail]), use_cache=False)
            logprobs = self._logprobs(hidden[0, -len(tail) - 1:-1])
            tail_ids = torch.tensor(tail, device=self.lm.device, dtype=torch.long)[:, None]
            scores.append(float(logprobs.gather(-1, tail_ids).sum()))
        return scores

    def generate_many(self, prompts: Sequence[str], max_new_tokens: int = 64,
                      batch: int | None = None, fresh: bool = True,
                      stop: str | None = None) -> list[str]:
        """Greedy decoding of many prompts (free-text parts, e.g. the world model's next page),
        ``batch`` prompts of any lengths per batch (default: the scorer's row limit); each
        output stops at EOS, the token budget or ``stop`` (excluded; ``agents.generation``).

        ``fresh`` computes every prompt from scratch, so the texts depend on the prompts alone:
        in bf16 a prompt extended from a cached persona sums in another order than the same
        prompt computed whole, and one greedy near-tie read the other way changes the rest of
        the text (7 of 16 next pages changed with a warm cache; two cold runs agree)."""
        return greedy_many(self, prompts, max_new_tokens, batch or self.max_rows, stop,
                           fresh=fresh)

    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str:
        """Greedy decoding for free-text parts; stops at EOS, at ``stop`` (excluded) or at
        the token budget. Computed fresh, as ``generate_many``: the text depends on the
        prompt alone, and the prefix cache is left as it was, so an agent's interview
        does not change what the lockstep batches of other agents reuse."""
        return greedy_many(self, [prompt], max_new_tokens, 1, stop, fresh=True)[0]
