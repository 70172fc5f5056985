"""Decisions per second of the real model: one forward per option vs a cached prefix with one
batched forward, on the prompt shape an agent actually sends (persona + page + candidates).

Run from the repository root: ``python bench/bench_decisions.py [--options 6 30]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from agents.llm import LM, bf16_supported, encode, load_lm
from agents.scorer import Scorer

PERSONA = (
    "You are user 196, a 49-year-old male writer living in a small town. You have rated 39 "
    "movies so far and you are picky: you give most films three stars and save five stars for "
    "the ones that stay with you for weeks. Your favourite genres are drama, comedy and film-noir; "
    "you rarely enjoy horror, and you avoid children's animation unless it is witty enough for "
    "adults. Movies you loved: Casablanca (1942), The Maltese Falcon (1941), Fargo (1996), "
    "Annie Hall (1977), Chinatown (1974) and The Apartment (1960). Movies you disliked: "
    "Batman Forever (1995), Jumanji (1995) and Mortal Kombat (1995). You usually watch one film "
    "in the evening, you read the plot summary before choosing, and you are drawn to classics "
    "with strong dialogue, moral ambiguity and good acting. When a page shows nothing that suits "
    "your taste you either ask for the next page or leave the site for the day. You rate what you "
    "watch honestly."
)
Options = list[tuple[str, str]]
TITLES = [
    "Toy Story (1995)", "Heat (1995)", "Sabrina (1954)", "Vertigo (1958)", "Rear Window (1954)",
    "Star Wars (1977)", "Clueless (1995)", "Se7en (1995)", "Brazil (1985)", "Psycho (1960)",
    "Babe (1995)", "Casino (1995)", "Amadeus (1984)", "Alien (1979)", "Heavy Metal (1981)",
]


def page(k: int) -> str:
    items = [TITLES[(k * 3 + i) % len(TITLES)] for i in range(4)]
    lines = "\n".join(f"{i + 1}. {title}" for i, title in enumerate(items))
    return f"Page {k + 1} of your recommendations:\n{lines}\nWhat do you do next?"


def prefix(lm: LM, k: int) -> str:
    messages = [{"role": "system", "content": PERSONA}, {"role": "user", "content": page(k)}]
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def candidates(k: int, n: int) -> Options:
    """Whole-action targets and rating targets behind a context, of mixed lengths."""
    items = [TITLES[(k * 3 + i) % len(TITLES)] for i in range(4)]
    pool: Options = [("", "I leave the site."), ("", "I go to the next page.")]
    pool += [("", f"I watch {title}.") for title in items]
    pool += [("", f"I add {title} to my watchlist.") for title in items]
    pool += [(f"I watch {title} and rate it", f" {stars} stars.") for title in items
             for stars in range(1, 6)]
    return pool[:n]


def timed(
    fn: Callable[[str, Options], list[float]], text: str, options: Options
) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = fn(text, options)
    return time.perf_counter() - start, scores


def bench(lm: LM, n: int, pages: int, naive_pages: int) -> dict[str, float]:
    """Per page, the three methods run back to back so load from other processes hits them
    alike; medians of per-decision seconds resist the remaining spikes."""
    cold, warm = Scorer(lm), Scorer(lm)
    warm.score(prefix(lm, 0), candidates(0, n))  # the agent's first page caches its persona
    warm.stats.reset()
    secs: dict[str, list[float]] = {"naive": [], "cold": [], "warm": []}
    diff = 0.0
    for k in range(1, 1 + pages):
        text, options = prefix(lm, k), candidates(k, n)
        cold.clear()
        t_cold, s_cold = timed(cold.score, text, options)
        t_warm, s_warm = timed(warm.score, text, options)
        secs["cold"].append(t_cold)
        secs["warm"].append(t_warm)
        if k <= naive_pages:
            t_naive, s_naive = timed(cold.score_naive, text, options)
            secs["naive"].append(t_naive)
            for other in (s_cold, s_warm):
                diff = max(diff, *(abs(a - b) for a, b in zip(s_naive, other, strict=True)))
    rates = {key: 1 / statistics.median(v) for key, v in secs.items()}
    return rates | {
        "forwards": warm.stats.forwards / pages,
        "reused": warm.stats.reused_tokens / pages,
        "diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", type=int, nargs="+", default=[6, 30])
    parser.add_argument("--pages", type=int, default=5, help="timed cached decisions per row")
    parser.add_argument("--naive-pages", type=int, default=2, help="timed naive decisions")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: fp32 (+bf16)")
    args = parser.parse_args()
    dtypes = args.dtypes or (["fp32", "bf16"] if bf16_supported() else ["fp32"])
    console = Console(width=150)
    console.print(f"load average before: {os.getloadavg()}")
    table = Table()
    for col in ["dtype", "options", "prefix tok", "naive/s", "cached cold/s", "cached warm/s",
                "speed-up warm", "fwd/decision", "reused tok", "max |diff|"]:
        table.add_column(col, justify="right")
    for dtype in dtypes:
        lm = load_lm(dtype=dtype)
        table.title = f"Decisions/s, {lm.name}, {torch.get_num_threads()} torch threads"
        scorer = Scorer(lm)
        scorer.score(prefix(lm, 0), candidates(0, 2))  # first call pays one-off kernel setup
        tokens = len(encode(lm.tokenizer, [prefix(lm, 1)]))
        for n in args.options:
            r = bench(lm, n, args.pages, args.naive_pages)
            table.add_row(
                dtype, str(n), str(tokens), f"{r['naive']:.3f}", f"{r['cold']:.2f}",
                f"{r['warm']:.2f}", f"{r['warm'] / r['naive']:.1f}x", f"{r['forwards']:.1f}",
                f"{r['reused']:.0f}", f"{r['diff']:.2e}",
            )
    console.print(table)
    console.print(f"load average after: {os.getloadavg()} (2 cores are shared; medians)")


if __name__ == "__main__":
    main()
