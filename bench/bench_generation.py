"""Cost of the world model's generated next pages (evaluation's next-state section): each
held-out transition's prompt decoded alone, one prompt at a time, against all of them in
batches of any prompt lengths (``Scorer.generate_many``), and how many outputs agree; then
the batch again on a scorer that holds each prompt's start, with fresh prompts (the default)
and with the cached KV reused.

    python bench/bench_generation.py [--prompts 16] [--adapter DIR] [--max-new-tokens 96]
                                     [--warm-tokens 300]
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from agents import prompts, text
from agents.llm import encode, load_lm
from agents.scorer import Scorer
from agents.world import load_world
from evaluation.sections import held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--users", type=int, default=8, help="held-out users the pages come from")
    ap.add_argument("--adapter", default="checkpoints/alignuser-ml100k")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--warm-tokens", type=int, default=300,
                    help="leading tokens of each prompt cached before the warm-cache rows")
    args = ap.parse_args()
    if args.warm_tokens < 1:
        ap.error(f"--warm-tokens {args.warm_tokens}: at least 1")
    world = load_world()
    users = [u for u, _, _ in world.lists("test", 1, None, 0)][:args.users]
    _, trs = held_out(world, users)
    gen = [tr.prefix + prompts.world_model_tail(text.render_wm_action(
        len(tr.items), sorted(tr.ratings), tr.then)) for tr in trs[:args.prompts]]
    if not gen:
        ap.error("no held-out transition to decode: --prompts and --users must be at least 1")
    lm = load_lm(adapter=args.adapter)
    table = Table(title=f"{len(gen)} next-state generations, up to {args.max_new_tokens} new "
                  f"tokens, {lm.device} {lm.dtype}")
    for col in ("decoding", "forwards", "tokens pushed", "s/prompt", "same text as alone"):
        table.add_column(col, justify="right")
    scorer = Scorer(lm, cache_size=4096)
    t0 = time.perf_counter()
    alone = []
    for p in gen:  # alone: nothing of the prompts before is reused
        scorer.clear()
        alone.append(scorer.generate(p, max_new_tokens=args.max_new_tokens))
    dt = time.perf_counter() - t0
    table.add_row("one prompt at a time", f"{scorer.stats.forwards:,}",
                  f"{scorer.stats.tokens:,}", f"{dt / len(gen):.2f}", "-")
    scorer = Scorer(lm, cache_size=4096)
    t0 = time.perf_counter()
    batched = scorer.generate_many(gen, max_new_tokens=args.max_new_tokens)
    dt = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(alone, batched, strict=True))
    table.add_row(f"batched ({scorer.max_rows} rows)", f"{scorer.stats.forwards:,}",
                  f"{scorer.stats.tokens:,}", f"{dt / len(gen):.2f}", f"{same}/{len(gen)}")
    # What evaluation meets: a scorer still holding the start of each prompt (the persona of
    # the pages it decided before). Reusing that KV would change texts; fresh prompts do not.
    tok = lm.tokenizer
    for fresh in (True, False):
        scorer = Scorer(lm, cache_size=4096)
        for p in gen:
            start = tok.decode(encode(tok, [p])[:args.warm_tokens])
            scorer.prefixes({start: encode(tok, [start])})
        scorer.stats.reset()
        t0 = time.perf_counter()
        warm = scorer.generate_many(gen, max_new_tokens=args.max_new_tokens, fresh=fresh)
        dt = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(warm, batched, strict=True))
        table.add_row(f"batched, warm cache, {'fresh prompts' if fresh else 'cached KV reused'}",
                      f"{scorer.stats.forwards:,}", f"{scorer.stats.tokens:,}",
                      f"{dt / len(gen):.2f}", f"{same}/{len(gen)} of batched")
    Console().print(table)


if __name__ == "__main__":
    main()
