"""Why the agent's watch ratio on held-out test pages fell below the humans' although its
greedy watch offset matched them on validation pages.

Two candidate causes, measured on the evaluated users (evaluation's pick). The pages' age: the
offset is fitted on validation pages, which come right after the train ratings perception
reads, while test pages come after the validation period. The people: the evaluated users
have longer histories than the calibration pages' sample. Per set of pages: the humans' watch
ratio; a logistic regression on the agent's perceived numbers (``evaluation.micro
.slot_features``) fitted on the users' validation pages and cut where it watches as much as
the humans there, as the offset is; the agent's greedy ratio (``--agent-pages`` of each set
decided here, with ``--adapter``'s calibration; ``--run``: the test pages' answers of an
evaluate run); how well the watched slots match the history. The last set perceives the test
pages with the history through the validation period: not the protocol (perception reads the
train split only), the check on the pages' age.

    python bench/bench_watch_shift.py [--run runs/evalX-200] [--agent-pages 600]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from bench_population import table
from rich.console import Console
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from agents.decide import Calibration, decide_chunked
from agents.transition import Transition, transitions
from agents.world import World, load_world
from evaluation.micro import slot_features
from evaluation.run import EvalConfig, held_out_pages


def frame(trs: list[Transition]) -> pd.DataFrame:
    return pd.DataFrame([{**f, "label": int(k in tr.ratings)} for tr in trs
                         for k, f in enumerate(slot_features(tr), 1)])


def agent_ratio(scorer, pages: list[Transition], cal: Calibration) -> float:
    """The greedy watch ratio on ``pages`` (world model on, the adapter's calibration)."""
    decisions = decide_chunked(scorer, [tr.decision_input() for tr in pages], world_model=True,
                               calibration=cal)
    return sum(len(d.action.watched) for d in decisions) / sum(len(tr.items) for tr in pages)


def run_ratio(run: Path, pages: list[Transition], users: list[int]) -> float:
    """The full agent's greedy watch ratio on the same test pages in an evaluate run."""
    if json.loads((run / "manifest.json").read_text())["users"] != users:
        raise SystemExit(f"{run} evaluated other users than this pick")
    answers = pickle.loads((run / "parts" / "outputs-full.pkl").read_bytes())["pages"]
    if len(answers) != len(pages):
        raise SystemExit(f"{run} replayed {len(answers)} pages, this pick {len(pages)}")
    return sum(len(a["watched"]) for a in answers) / sum(len(tr.items) for tr in pages)


def through_valid(world: World) -> World:
    split = world.split
    merged = dataclasses.replace(split, train=pd.concat([split.train, split.valid],
                                                        ignore_index=True),
                                 valid=split.valid.iloc[:0])
    return World(ds=world.ds, split=merged, trajectory_config=world.trajectory_config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=200, help="evaluated users")
    ap.add_argument("--pages", type=int, default=600, help="held-out pages of each part")
    ap.add_argument("--run", type=Path, help="an evaluate run on these users (its full "
                    "agent's test-page answers)")
    ap.add_argument("--agent-pages", type=int, default=0, help="pages of each set the agent "
                    "(--adapter, its calibration) decides here (0: none; minutes on a CPU)")
    ap.add_argument("--adapter", default="checkpoints/alignuser-ml100k")
    args = ap.parse_args()
    cfg = EvalConfig.of_preset("full", users=args.users, next_action_users=args.users,
                               next_action_pages=args.pages)
    world = load_world()
    users, test = held_out_pages(world, cfg)
    _, valid = held_out_pages(world, cfg, "valid")
    # the same pages (their fillers drawn as evaluation drew them), perceived anew
    trajs = world.trajectories("test", users=users[:cfg.next_action_users], progress=False)
    again = {(tr.user, tr.page, tr.items): tr
             for tr in transitions(trajs, through_valid(world), full_history=True)}
    later = [again[(tr.user, tr.page, tr.items)] for tr in test]
    sets = {"validation pages": valid, "test pages": test,
            "test pages, history through validation": later}
    frames = {k: frame(v) for k, v in sets.items()}
    fit = frames["validation pages"]
    cols = [c for c in fit.columns if c != "label"]
    lr = LogisticRegression(max_iter=3000).fit(fit[cols], fit["label"])
    cut = np.quantile(lr.decision_function(fit[cols]), 1 - fit["label"].mean())
    agent: dict[str, float] = {}
    if args.agent_pages:
        from agents.llm import load_lm
        from agents.scorer import Scorer

        scorer = Scorer(load_lm(adapter=args.adapter, device="cpu"), cache_size=2048)
        cal = Calibration.of_checkpoint(args.adapter)
        for name, pages in sets.items():
            agent[name] = agent_ratio(scorer, pages[:args.agent_pages], cal)
            scorer.clear()
    before = {"test pages": run_ratio(args.run, test, users)} if args.run else {}
    rows = []
    for name, f in frames.items():
        score, watched = lr.decision_function(f[cols]), f[f["label"] == 1]
        rows.append([name, f"{len(sets[name])}", f"{f['label'].mean():.3f}",
                     f"{(score > cut).mean():.3f}", f"{roc_auc_score(f['label'], score):.3f}",
                     *(f"{x[name]:.3f}" if name in x else "-" for x in (agent, before)),
                     f"{watched['match'].mean():.1f}", f"{watched['close_watched'].mean():.2f}"])
    decided = f"agent on {args.agent_pages} of them" if args.agent_pages else "no agent run"
    Console().print(table(
        f"{len(users)} evaluated users; regression fitted on their validation pages ({decided})",
        ["pages", "n", "humans' watch ratio", "regression's ratio", "regression slot AUC",
         "agent's ratio", f"agent's ratio in {args.run.name if args.run else '-'}",
         "match of watched slots", "close watched of watched slots"], rows))


if __name__ == "__main__":
    main()
