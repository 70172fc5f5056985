"""Greedy decoding of many prompts of any lengths in one batch (the world model's next pages).

Each prompt's KV comes from the scorer's batched prefix pass and is right-padded to the
longest; every decoding step then pushes one real token per row, whose attention mask hides
its row's padding. No query row is ever a pad, so no row attends to nothing (a left-padded
batch has such rows, which SDPA on CUDA turns into NaN); prompts of different lengths can
share a batch, where before only prompts of equal token length could.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from agents.kvcache import Prefix, padded_cache
from agents.llm import LM, encode

if TYPE_CHECKING:
    from agents.scorer import Scorer


def eos_ids(lm: LM) -> set[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's."""
    extra = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    return {lm.tokenizer.eos_token_id, *(extra if isinstance(extra, list) else [extra])} - {None}


@torch.inference_mode()
def _decode(scorer: Scorer, entries: Sequence[Prefix], max_new_tokens: int, eos: set[int],
            until: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy tokens after each entry's prompt until EOS, ``until`` (the tokens so far) or
    ``max_new_tokens``; every step's token is read off the fp32 head, as scores are."""
    device = scorer.lm.device
    rows = len(entries)
    lengths = torch.tensor([len(e.ids) for e in entries], device=device)
    width = int(lengths.max())
    mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
    cache = padded_cache(scorer.lm.model.config, entries, room=max_new_tokens)
    token = torch.stack([e.next_logprobs.argmax() for e in entries]).to(device)
    new: list[list[int]] = [[] for _ in entries]
    done = [False] * rows
    for step in range(max_new_tokens):
        for r, t in enumerate(token.tolist()):
            if not done[r]:
                done[r] = t in eos
                if not done[r]:
                    new[r].append(t)
                    done[r] = until is not None and until(new[r])
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], 1)
        # A finished row keeps stepping (its tokens are dropped): cheaper than re-slicing
        # every layer's cache whenever one row ends.
        token = scorer.greedy_step(token, cache, attention_mask=mask,
                                   position_ids=(lengths + step)[:, None])
    return new


def greedy_many(scorer: Scorer, prompts: Sequence[str], max_new_tokens: int, rows: int,
                stop: str | None = None, fresh: bool = False) -> list[str]:
    """Greedy continuation of every prompt, ``rows`` prompts (longest first) per batch, each
    cut before ``stop`` when it appears; the same text as decoding each prompt alone, up to
    the summation order of a batched forward. ``fresh``: no cached KV is reused
    (``Scorer.generate_many``)."""
    tok = scorer.lm.tokenizer
    ids = {p: encode(tok, [p]) for p in prompts}
    if not all(ids.values()):
        raise ValueError("prompt must not be empty")
    if max_new_tokens < 1:
        return ["" for _ in prompts]
    until = None if not stop else (lambda new: stop in tok.decode(new, skip_special_tokens=True))
    order = sorted(ids, key=lambda p: -len(ids[p]))
    eos, out = eos_ids(scorer.lm), {}
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        scorer.stats.calls += len(chunk)
        entries = scorer.prefixes({p: ids[p] for p in chunk}, keep=False, reuse=not fresh)
        for p, new in zip(chunk, _decode(scorer, [entries[p] for p in chunk],
                                         max_new_tokens, eos, until), strict=True):
            text = tok.decode(new, skip_special_tokens=True)
            out[p] = text[:text.index(stop)] if stop and stop in text else text
    return [out[p] for p in prompts]
