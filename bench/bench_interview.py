"""Does the interview's satisfaction follow what a session held? Each wording of the question
scored on a run's sessions by an adapter (and with ``--base`` the base model): the mean and
spread of the expected score and its Spearman rho (95% bootstrap CI over sessions) with the
session's likes per page, its mean rating and how many movies it watched.

    python bench/bench_interview.py RUN [RUN ...] [--adapter DIR] [--base]

A RUN is a simulate run (``sessions.jsonl``) or an evaluate run (its full agent's sessions,
``parts/outputs-full.pkl``). ``now`` is what the agent is asked (``agents.prompts.SATISFACTION``
on ``agents.text.session_summary``); ``before`` what it replaced (the reason's question, digits
as answers, every rating listed).
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from agents import prompts
from agents.llm import load_lm
from agents.policy import expected_value
from agents.scorer import Scorer
from agents.text import session_summary
from agents.world import load_world


def listed(n_pages: int, ratings: list[int]) -> str:
    """The session as the interview showed it before: every rating listed."""
    return (f"You saw {n_pages} page(s) and watched {len(ratings)} movie(s)"
            + (f", rated {', '.join(map(str, ratings))}." if ratings else "."))


HEAD = "{persona}\nYou just finished browsing a movie recommender.\n{session}\n"
DIGITS = [str(k) for k in range(1, 11)]
NOW = [prompts.satisfaction_option(k) for k in range(1, 11)]
# name: (question, answer stem, answers, session summary)
WORDINGS = {
    # the reason's question (``prompts.INTERVIEW``), as the score was asked until it was split
    "before": (prompts.INTERVIEW, "Satisfaction (1-10): ", DIGITS, listed),
    "k/10": (prompts.INTERVIEW, "Satisfaction: ", [f"{k}/10" for k in range(1, 11)], listed),
    "words (1-5)": (HEAD + "How satisfied are you with the recommendations?\n", "Answer: I am ",
                    ["very dissatisfied", "dissatisfied", "neutral", "satisfied",
                     "very satisfied"], listed),
    "now's question, ratings listed": (prompts.SATISFACTION, prompts.SATISFACTION_TAIL, NOW,
                                       listed),
    "now": (prompts.SATISFACTION, prompts.SATISFACTION_TAIL, NOW, session_summary),
}


def sessions_of(run: Path) -> list[dict]:
    if (run / "sessions.jsonl").is_file():
        return [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    out = pickle.loads((run / "parts" / "outputs-full.pkl").read_bytes())
    return [s for rows in out["sessions"].values() for s in rows]


def rho_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 1000) -> tuple[float, float, float]:
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    rng = np.random.default_rng(0)
    boots = [spearmanr(x[i], y[i])[0] for i in rng.integers(0, len(x), (n_boot, len(x)))]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return float(spearmanr(x, y)[0]), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--adapter", default="checkpoints/alignuser-ml100k")
    ap.add_argument("--base", action="store_true", help="also the base model, no adapter")
    args = ap.parse_args()
    world = load_world()
    console = Console()
    scorers = {"adapter": Scorer(load_lm(adapter=args.adapter, device="cpu"))}
    if args.base:
        scorers["base"] = Scorer(load_lm(device="cpu"))
    for run in args.runs:
        rows = [s for s in sessions_of(run) if s["pages"]]
        watched = [[r for p in s["pages"] for r in p["watched"].values()] for s in rows]
        likes = np.array([sum(r >= 4 for r in w) / len(s["pages"])
                          for s, w in zip(rows, watched, strict=True)])
        mean_rating = np.array([np.mean(w) if w else np.nan for w in watched])
        count = np.array([len(w) for w in watched], dtype=float)
        table = Table(title=f"{run}: {len(rows)} sessions")
        for col in ("model", "wording", "mean", "sd", "rho with likes/page",
                    "rho with mean rating", "rho with movies watched"):
            table.add_column(col)
        for label, scorer in scorers.items():
            for name, (question, tail, answers, summary) in WORDINGS.items():
                reqs = [(question.format(persona=world.personas[s["user"]],
                                         session=summary(len(s["pages"]), w)),
                         [(tail, a) for a in answers]) for s, w in zip(rows, watched,
                                                                        strict=True)]
                sat = np.array([expected_value(lp, range(1, len(answers) + 1))
                                for lp in scorer.score_many(reqs)])
                cells = ["{:+.3f} [{:+.3f}, {:+.3f}]".format(*rho_ci(sat, y))
                         for y in (likes, mean_rating, count)]
                table.add_row(label, name, f"{sat.mean():.2f}", f"{sat.std():.2f}", *cells)
        console.print(table)


if __name__ == "__main__":
    main()
