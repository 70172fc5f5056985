"""Training batches: tokenised examples, and examples that share a page in one forward of it.

A page yields one watch/skip example per slot, one next/exit + ratings example, its world-model
example and sometimes a counterfactual one: all start with the same persona and page blocks
(``Example.segments[:2]``, ~450 tokens) and differ only in a short tail and target (~10 tokens).
Training each alone pushes the page through the model a dozen times; here the page goes through
once, and its tails and targets follow as one token tree over its KV cache (``agents.packing``,
as ``agents.scorer`` scores them at run time); gradients flow back through the shared cache.
A step's pages go through together: their heads in one padded forward, their trees in a second,
so a step costs two forwards, not two per page. Each example's loss is the same number as when
it is trained alone (``tests/test_training.py`` checks losses and gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from agents import text
from agents.llm import cache_arg, encode, output_cache
from agents.transition import Example

IGNORE = -100


def tokenize(tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """Input ids and labels (prompt masked); the prompt is cut from the left to fit."""
    prompt = encode(tokenizer, list(ex.segments))
    target = _target(tokenizer, ex)[:max_len - 1]
    prompt = prompt[max(0, len(prompt) - (max_len - len(target))):]
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Right, not left: a left pad is a query row that may attend to no key
    at all, and on CUDA SDPA returns NaN for such rows, which then spreads through the batch
    (transformers 5 dropped its guard); with right padding every row attends to something."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)] = torch.tensor(i)
        labels[r, :len(lab)] = torch.tensor(lab)
        mask[r, :len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def example_losses(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean target-token cross-entropy per example (shape: batch). The output layer runs only
    at target positions: over whole prompts its 49k-word projection was most of a step."""
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][sel]).float()
    ce = torch.nn.functional.cross_entropy(logits, labels[sel], reduction="none")
    rows = sel.nonzero()[:, 0]
    sums = ce.new_zeros(labels.shape[0]).index_add(0, rows, ce)
    return sums / sel.sum(1).clamp(min=1)



def head(ex: Example) -> tuple[str, ...]:
    """The part an example shares with the other examples of its page (empty: shares none)."""
    return ex.segments[:2] if len(ex.segments) > 2 else ()


def units(examples: Sequence[Example]) -> list[list[int]]:
    """Positions of ``examples`` grouped by shared head, in first-seen order; an example that
    shares none stands alone."""
    groups: dict[tuple[str, ...], list[int]] = {}
    out: list[list[int]] = []
    for i, ex in enumerate(examples):
        key = head(ex)
        if not key:
            out.append([i])
        elif key in groups:
            groups[key].append(i)
        else:
            groups[key] = [i]
            out.append(groups[key])
    return out


def _target(tokenizer, ex: Example) -> list[int]:
    """The target's ids, closed by EOS where the tokenizer has one."""
    target = encode(tokenizer, [ex.target])
    return target + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else target


class Packed(NamedTuple):
    """Per-example losses in the examples' order, the token positions pushed, and each watch/
    skip line's margin (logit of "watch" minus "skip" where the two lines part: the log-odds
    the agent decides by, up to the ~0 tail after the answer word); NaN for other examples."""

    losses: torch.Tensor
    tokens: int
    margins: torch.Tensor


def _answer(tokenizer, ex: Example, target: list[int]) -> tuple[int, int, int] | None:
    """Where a watch/skip line's target parts from the other answer's line: (position, watch
    id, skip id); None for any other example."""
    line, slot = ex.meta.get("line"), ex.meta.get("slot")
    if line is None or slot is None:
        return None
    other = encode(tokenizer, [text.slot_line(slot, text.SKIP if line == text.WATCH
                                              else text.WATCH)])
    k = next(i for i, (a, b) in enumerate(zip(target, other, strict=False)) if a != b)
    return (k, target[k], other[k]) if line == text.WATCH else (k, other[k], target[k])


def _branch(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """Tail and target ids after the head."""
    return encode(tokenizer, list(ex.segments[2:])), _target(tokenizer, ex)


# Head positions per batched forward: a step's pages go through in as few forwards as this
# allows (two small forwards per page took ~0.3-0.5 s a page on an H200, far below its speed).
_HEAD_TOKENS = 32768


def _pages_losses(model, tokenizer, pages: Sequence[Sequence[Example]], max_len: int,
                  detach_head: bool = False) -> tuple[list[torch.Tensor], int, list[torch.Tensor]]:
    """Per-example losses of several pages: their heads in one right-padded forward, then
    every page's tails and targets as one token tree (``agents.packing``) over its head's KV in
    a second forward. Also the token positions pushed, and per-example margins (``Packed``).
    ``detach_head`` runs the heads without gradient (see ``packed_losses``)."""
    from transformers import DynamicCache

    from agents.packing import build_trie, tree_inputs

    device = next(model.parameters()).device
    tries, heads, answers = [], [], []
    for group in pages:
        branches = [_branch(tokenizer, ex) for ex in group]
        answers += [_answer(tokenizer, ex, t) for ex, (_, t) in zip(group, branches, strict=True)]
        width = max(len(c) + len(t) for c, t in branches)
        head_ids = encode(tokenizer, list(group[0].segments[:2]))
        heads.append(head_ids[max(0, len(head_ids) - max(1, max_len - width)):])
        tries.append(build_trie(branches))
    p = max(len(h) for h in heads)
    ids = torch.zeros((len(heads), p), dtype=torch.long)
    mask = torch.zeros((len(heads), p), dtype=torch.long)
    for r, h in enumerate(heads):
        ids[r, :len(h)] = torch.tensor(h)
        mask[r, :len(h)] = 1
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_head):
        out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    cache = DynamicCache(ddp_cache_data=[(k, v) for k, v, *_ in output_cache(out)],
                         config=model.config)
    lens = [len(h) for h in heads]
    tree_ids, positions, tree_mask = tree_inputs(tries, lens, p, out.last_hidden_state.dtype)
    hidden = decoder(input_ids=tree_ids.to(device), attention_mask=tree_mask.to(device),
                     position_ids=positions.to(device), use_cache=True,
                     **{cache_arg(model): cache}).last_hidden_state
    # A target node is predicted by its parent's row, or (column ``width``, appended) by the
    # head's last position.
    width = hidden.shape[1]
    rows, cols, tokens, owner = [], [], [], []
    where: dict[int, int] = {}  # example -> its answer's row in ``pick``
    n_examples = 0
    for r, trie in enumerate(tries):
        for path in trie.targets:
            answer = answers[n_examples]
            for j, node in enumerate(path):
                if answer is not None and j == answer[0]:
                    where[n_examples] = len(rows)
                parent = trie.parents[node]
                rows.append(r)
                cols.append(trie.column(parent) if parent >= 0 else width)
                tokens.append(trie.tokens[node])
                owner.append(n_examples)
            n_examples += 1
    last = out.last_hidden_state[torch.arange(len(lens), device=device),
                                 torch.tensor(lens, device=device) - 1]
    states = torch.cat([hidden, last[:, None]], dim=1)
    pick = states[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = lm_head(pick).float()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens, device=device),
                                           reduction="none")
    who = torch.tensor(owner, device=device)
    losses = (ce.new_zeros(n_examples).index_add(0, who, ce)
              / torch.bincount(who, minlength=n_examples).clamp(min=1))
    margins = ce.new_full((n_examples,), float("nan"))
    if where:
        idx = torch.tensor(list(where), device=device)
        at = torch.tensor(list(where.values()), device=device)
        watch = torch.tensor([answers[i][1] for i in where], device=device)
        skip = torch.tensor([answers[i][2] for i in where], device=device)
        margins = margins.index_put((idx,), logits[at, watch] - logits[at, skip])
    per_page, per_margins, start = [], [], 0
    for trie in tries:
        per_page.append(losses[start:start + len(trie.targets)])
        per_margins.append(margins[start:start + len(trie.targets)])
        start += len(trie.targets)
    return per_page, sum(lens) + sum(t.width for t in tries), per_margins


def _head_chunks(groups: Sequence[Sequence[Example]]) -> list[list[int]]:
    """Consecutive page indices whose padded heads fit ``_HEAD_TOKENS`` (by character count,
    ~4 per token, so no page is tokenised twice)."""
    chunks: list[list[int]] = []
    widest = 0
    for i, group in enumerate(groups):
        size = sum(len(s) for s in group[0].segments[:2]) // 4 + 1
        if chunks and max(widest, size) * (len(chunks[-1]) + 1) <= _HEAD_TOKENS:
            chunks[-1].append(i)
            widest = max(widest, size)
        else:
            chunks.append([i])
            widest = size
    return chunks


def packed_losses(model, tokenizer, examples: Sequence[Example], max_len: int,
                  pack: bool = True, detach_head: bool = False) -> Packed:
    """Mean target-token cross-entropy per example, in ``examples``' order, with each page's
    shared head computed once; also the number of token positions pushed through the model.
    Examples that share nothing (or all, when ``pack`` is off) go through one padded batch.

    ``detach_head`` computes the shared heads without gradient: the losses are the same
    numbers, but the weights learn only through the tails and targets (the cue line that
    restates an item's numbers sits in its tail), and a head costs one forward instead of a
    forward and a backward (truncated backpropagation at the page boundary)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses: list[torch.Tensor | None] = [None] * len(examples)
    margins: list[torch.Tensor | None] = [None] * len(examples)
    alone: list[int] = []
    tokens = 0
    shared: list[list[int]] = []
    for group in units(examples) if pack else [[i] for i in range(len(examples))]:
        if len(group) > 1:
            shared.append(group)
        else:
            alone += group
    for chunk in _head_chunks([[examples[i] for i in g] for g in shared]):
        groups = [shared[c] for c in chunk]
        values, pushed, margin = _pages_losses(model, tokenizer,
                                               [[examples[i] for i in g] for g in groups],
                                               max_len, detach_head)
        tokens += pushed
        for group, vals, ms in zip(groups, values, margin, strict=True):
            for i, v, m in zip(group, vals, ms, strict=True):
                losses[i], margins[i] = v, m
    if alone:
        batch = collate([tokenize(tokenizer, examples[i], max_len) for i in alone], pad)
        tokens += int(batch["attention_mask"].sum())
        for i, v in zip(alone, example_losses(model, {k: t.to(device) for k, t in batch.items()}),
                        strict=True):
            losses[i] = v
    out = torch.stack([v for v in losses if v is not None])
    nan = out.new_tensor(float("nan"))
    # Examples scored alone have no page to rank within (a slot line always has one).
    return Packed(out, tokens, torch.stack([nan if m is None else m for m in margins]))
