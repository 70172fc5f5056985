"""Grouped-query attention on the CPU: transformers' ``sdpa`` (key/value heads repeated per
query head) against ``agents.attention`` (heads passed grouped to PyTorch's kernel).

(a) the attention kernel alone at a batched page's shape; (b) the same 20-item 1:1 lists
through the decision engine under each, alternated ``--rounds`` times so both see the same
machine load, with the largest score difference between them.

    python bench/bench_attention.py [--lists 8] [--rounds 2] [--adapter DIR] [--no-world-model]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from agents.attention import NAME, use_grouped_attention
from agents.browse import list_scores
from agents.llm import load_lm
from agents.scorer import Scorer
from agents.world import load_world


def kernel(batch: int = 16, prefix: int = 640, tree: int = 190, reps: int = 10) -> dict:
    """Seconds per SDPA call, SmolLM2-135M's heads (9 query, 3 key/value, dim 64), bf16."""
    f = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(batch, 9, tree, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 3, prefix + tree, 64, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.zeros(batch, 1, tree, prefix + tree, dtype=torch.bfloat16)
    mask[..., prefix:] = torch.triu(torch.full((tree, tree), -1e4, dtype=torch.bfloat16), 1)

    def repeated(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(3, dim=1)

    calls = {"sdpa": lambda: f(q, repeated(k), repeated(v), attn_mask=mask),
             NAME: lambda: f(q, k, v, attn_mask=mask, enable_gqa=True)}
    out = {}
    for name, call in calls.items():
        call()
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        out[name] = (time.perf_counter() - t0) / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lists", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--world-model", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    console = Console()
    k = kernel()
    console.print(f"kernel, 16 pages x 190 scored on 640 cached positions: sdpa "
                  f"{k['sdpa'] * 1e3:.1f} ms, {NAME} {k[NAME] * 1e3:.1f} ms "
                  f"({k['sdpa'] / k[NAME]:.2f}x)")
    world = load_world()
    rows = [(u, items) for u, items, _ in world.lists("test", 1, None, 0)[:args.lists]]
    lm = load_lm(adapter=args.adapter, device="cpu")
    seconds: dict[str, list[float]] = {"sdpa": [], NAME: []}
    scores: dict[str, list[np.ndarray]] = {}
    tokens = 0
    for _ in range(args.rounds):
        for name in seconds:
            if name == NAME:
                use_grouped_attention(lm.model)
            else:
                lm.model.set_attn_implementation("sdpa")
            scorer = Scorer(lm, cache_size=4096)
            t0 = time.perf_counter()
            scores[name] = list_scores(scorer, world.perceiver, world.personas,
                                       world.histories, rows, world_model=args.world_model)
            seconds[name].append((time.perf_counter() - t0) / len(rows))
            tokens = scorer.stats.tokens
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*scores.values(), strict=True))
    table = Table(title=f"{len(rows)} lists in lockstep, {tokens / len(rows):,.0f} tokens/list, "
                        f"{lm.dtype}, {torch.get_num_threads()} threads")
    for col in ("attention", "s/list per round", "mean s/list"):
        table.add_column(col, justify="right")
    for name, s in seconds.items():
        table.add_row(name, " / ".join(f"{x:.2f}" for x in s), f"{np.mean(s):.2f}")
    console.print(table)
    console.print(f"largest watch log-odds difference between the two: {diff:.4f}")


if __name__ == "__main__":
    main()
