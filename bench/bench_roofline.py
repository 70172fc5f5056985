"""What bounds the engine on this machine: the rate the linear layers run at (a dense matmul of the
model's own shapes), the fused attention kernel's rate at a page's shapes, the model's forward
rate on a page (its prefix, then the scored lines on the prefix's cache), and, given run
directories, the token positions a second each run pushed against that ceiling.

    python bench/bench_roofline.py [--threads N] [RUN ...]

A page's FLOPs are not only the weights' (2 per parameter a token): each position also attends
to every earlier one (4 x context x hidden a layer), about a fifth of the total at a page's
~800-token context, and that part runs on a kernel several times slower than a matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from agents.llm import cache_arg, load_lm, output_cache

# A page as the decision step pushes it: batched page prefixes, then each page's scored lines
# (packed as one token tree) on its prefix's cache; shapes from a profiled 1:1 list run.
BATCH, PREFIX, TAIL = 8, 640, 190


def _seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def linear_gflops(hidden: int, inner: int, dtype: torch.dtype, rows: int = 512) -> float:
    """Dense matmul rate at the model's MLP shape (the bulk of its weights)."""
    x, w = torch.randn(rows, hidden, dtype=dtype), torch.randn(inner, hidden, dtype=dtype)
    return 2 * rows * hidden * inner / _seconds(lambda: F.linear(x, w), 20) / 1e9


def attention_gflops(heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """The fused attention kernel's rate for a page's scored lines over their context."""
    ctx = PREFIX + TAIL
    q = torch.randn(BATCH, heads, TAIL, head_dim, dtype=dtype)
    k, v = (torch.randn(BATCH, heads, ctx, head_dim, dtype=dtype) for _ in range(2))
    mask = torch.zeros(BATCH, 1, TAIL, ctx, dtype=dtype)
    sec = _seconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 10)
    return 4 * BATCH * heads * TAIL * ctx * head_dim / sec / 1e9


def page_forward(model: torch.nn.Module, reps: int = 3) -> float:
    """Token positions a second for BATCH page prefixes, then their scored lines on the cache."""
    prefix = torch.randint(100, 40000, (BATCH, PREFIX))
    tail = torch.randint(100, 40000, (BATCH, TAIL))

    def page() -> None:
        out = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
        model(input_ids=tail, use_cache=True, **{cache_arg(model): output_cache(out)})

    with torch.inference_mode():
        return BATCH * (PREFIX + TAIL) / _seconds(page, reps)


@dataclass
class Bound:
    """A page's per-token FLOPs in two parts and the rate each part runs at on this machine."""

    lin: float  # GFLOP/s of the weights' matmuls
    att: float  # GFLOP/s of the attention kernel
    lin_flop: float
    att_flop: float
    mean_ctx: float

    @property
    def tokens_per_s(self) -> float:
        return 1 / (self.lin_flop / (self.lin * 1e9) + self.att_flop / (self.att * 1e9))


def page_bound(model: torch.nn.Module, dtype: torch.dtype) -> Bound:
    """Per token: the weights at the matmul rate, attention over the mean context of a page's
    positions (prefix positions see half the prefix on average, scored lines all of it)."""
    cfg = model.config
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    mean_ctx = (PREFIX * PREFIX / 2 + TAIL * (PREFIX + TAIL / 2)) / (PREFIX + TAIL)
    return Bound(lin=linear_gflops(hidden, cfg.intermediate_size, dtype),
                 att=attention_gflops(cfg.num_attention_heads, hidden // cfg.num_attention_heads,
                                      dtype),
                 lin_flop=2 * weights, att_flop=4 * mean_ctx * hidden * layers,
                 mean_ctx=mean_ctx)


def run_rate(run: Path) -> tuple[float, int] | None:
    """(token positions a second, pages) of a simulate run, from its manifest."""
    manifest = json.loads((run / "manifest.json").read_text())
    scoring, wall = manifest.get("scoring"), manifest.get("wall_seconds")
    if not scoring or not wall:
        return None
    return scoring["token_positions"] / wall, scoring["pages"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="simulate run directories to place")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_lm()
    b = page_bound(lm.model, lm.dtype)
    lin, att, lin_flop, att_flop, mean_ctx = b.lin, b.att, b.lin_flop, b.att_flop, b.mean_ctx
    dtype, bound = lm.dtype, b.tokens_per_s
    measured = page_forward(lm.model)
    con = Console()
    t = Table(title=f"this machine, {torch.get_num_threads()} torch threads, {dtype}, "
                    f"load average {os.getloadavg()[0]:.2f}")
    for col in ("part", "GFLOP a token", "rate GFLOP/s", "tokens/s alone"):
        t.add_column(col, justify="right")
    t.add_row("weights (matmul, MLP shape)", f"{lin_flop / 1e9:.3f}", f"{lin:.0f}",
              f"{lin * 1e9 / lin_flop:,.0f}")
    t.add_row(f"attention (fused kernel, mean context {mean_ctx:.0f})", f"{att_flop / 1e9:.3f}",
              f"{att:.0f}", f"{att * 1e9 / att_flop:,.0f}")
    t.add_row("both: the bound", f"{(lin_flop + att_flop) / 1e9:.3f}", "", f"{bound:,.0f}")
    t.add_row(f"the model's forward on {BATCH} pages ({PREFIX} + {TAIL} tokens)", "", "",
              f"{measured:,.0f} ({100 * measured / bound:.0f}% of the bound)")
    con.print(t)
    if args.runs:
        r = Table(title="simulate runs against the page forward's rate")
        for col in ("run", "pages", "tokens/s (all its wall time)", "% of the page forward"):
            r.add_column(col, justify="right")
        for run in args.runs:
            got = run_rate(run)
            if got is None:
                r.add_row(str(run), "", "no scoring recorded", "")
                continue
            tps, pages = got
            r.add_row(str(run), f"{pages:,}", f"{tps:,.0f}", f"{100 * tps / measured:.0f}%")
        con.print(r)


if __name__ == "__main__":
    main()
