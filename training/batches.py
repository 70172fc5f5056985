"""Training batches: tokenised examples, and examples that share a page in one forward of it.

A page yields one watch/skip example per slot, one next/exit + ratings example, its world-model
example and sometimes a counterfactual one: all start with the same persona and page blocks
(``Example.segments[:2]``, ~450 tokens) and differ only in a short tail and target (~10 tokens).
Training each alone pushes the page through the model a dozen times; here the page goes through
once, its KV cache is shared by every tail (exactly as ``agents.scorer`` scores them at run time),
and gradients flow back through the shared cache. Each example's loss is the same number as
when it is trained alone (``tests/test_training.py`` checks losses and gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from agents.llm import cache_arg, encode, output_cache
from agents.scorer import expanded_cache
from agents.transition import Example

IGNORE = -100


def tokenize(tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """Input ids and labels (prompt masked); the prompt is cut from the left to fit."""
    prompt = encode(tokenizer, list(ex.segments))
    target = encode(tokenizer, [ex.target])
    if tokenizer.eos_token_id is not None:
        target = target + [tokenizer.eos_token_id]
    target = target[:max_len - 1]
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


def _branch(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """Tail + target ids after the head, labels masking the tail (as ``tokenize`` does)."""
    context = encode(tokenizer, list(ex.segments[2:]))
    target = encode(tokenizer, [ex.target])
    if tokenizer.eos_token_id is not None:
        target = target + [tokenizer.eos_token_id]
    return context + target, [IGNORE] * len(context) + target


def _shared_losses(model, tokenizer, group: Sequence[Example], max_len: int
                   ) -> tuple[torch.Tensor, int]:
    """Per-example losses of one page's examples from one head forward; also tokens pushed."""
    device = next(model.parameters()).device
    branches = [_branch(tokenizer, ex) for ex in group]
    width = max(len(ids) for ids, _ in branches)
    head_ids = encode(tokenizer, list(group[0].segments[:2]))
    head_ids = head_ids[max(0, len(head_ids) - max(1, max_len - width)):]
    p, n = len(head_ids), len(branches)
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    out = decoder(input_ids=torch.tensor([head_ids], device=device), use_cache=True)
    kv = tuple((k, v) for k, v, *_ in output_cache(out))
    ids = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, p + width), dtype=torch.long)
    mask[:, :p] = 1
    for r, (i, lab) in enumerate(branches):
        ids[r, :len(i)] = torch.tensor(i)
        labels[r, :len(lab)] = torch.tensor(lab)
        mask[r, p:p + len(i)] = 1
    cache = expanded_cache(model.config, kv, n)
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                     position_ids=torch.arange(p, p + width, device=device).expand(n, -1),
                     use_cache=True, **{cache_arg(model): cache}).last_hidden_state
    # Branch token j is predicted by branch position j - 1, and token 0 by the head's last one.
    first = out.last_hidden_state[:, -1:].expand(n, 1, -1)
    pred = torch.cat([first, hidden[:, :-1]], dim=1)
    labels = labels.to(device)
    sel = labels != IGNORE
    logits = lm_head(pred[sel]).float()
    ce = torch.nn.functional.cross_entropy(logits, labels[sel], reduction="none")
    sums = ce.new_zeros(n).index_add(0, sel.nonzero()[:, 0], ce)
    return sums / sel.sum(1).clamp(min=1), p + sum(len(i) for i, _ in branches)


def packed_losses(model, tokenizer, examples: Sequence[Example], max_len: int,
                  pack: bool = True) -> tuple[torch.Tensor, int]:
    """Mean target-token cross-entropy per example, in ``examples``' order, with each page's
    shared head computed once; also the number of token positions pushed through the model.
    Examples that share nothing (or all, when ``pack`` is off) go through one padded batch."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses: list[torch.Tensor | None] = [None] * len(examples)
    alone: list[int] = []
    tokens = 0
    for group in units(examples) if pack else [[i] for i in range(len(examples))]:
        if len(group) < 2:
            alone += group
            continue
        values, pushed = _shared_losses(model, tokenizer, [examples[i] for i in group], max_len)
        tokens += pushed
        for i, v in zip(group, values, strict=True):
            losses[i] = v
    if alone:
        batch = collate([tokenize(tokenizer, examples[i], max_len) for i in alone], pad)
        tokens += int(batch["attention_mask"].sum())
        for i, v in zip(alone, example_losses(model, {k: t.to(device) for k, t in batch.items()}),
                        strict=True):
            losses[i] = v
    return torch.stack([v for v in losses if v is not None]), tokens
