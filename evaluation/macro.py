"""Session-level fidelity and recommender selection.

Simulated sessions (agents browsing live recommenders) are compared with held-out human sessions
(the same users' test-period visits rebuilt on the same recommender): distributions, a
discriminator, and a judge. Recommenders are ranked by simulated outcomes and compared with
their ranking by held-out human interactions, beside a classical offline metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from langchain_core.language_models import BaseChatModel

from agents import prompts
from agents.policy import OptionScorer, expected_value
from agents.text import describe_session
from agents.world import World
from evaluation.metrics import (
    best_choice,
    discriminator_auc,
    distribution_distance,
    rank_agreement_boot,
    spearman_ci,
)
from simulator.sessions import PageRecord, SessionRecord
from simulator.trajectories import Trajectory


def human_sessions(trajs: Sequence[Trajectory]) -> list[dict[str, Any]]:
    """Held-out human visits in the same (JSON) shape as simulated sessions."""
    return [SessionRecord(user=t.user, recommender=t.recommender, end=t.end,
                          pages=[PageRecord(page=s.page, items=s.items, then=s.then,
                                            watched=s.watched) for s in t.steps]
                          ).json_form(full=False) for t in trajs]


def distributions(sessions: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    pages = [len(s["pages"]) for s in sessions]
    watches = [len(p["watched"]) for s in sessions for p in s["pages"]]
    ratings = [r for s in sessions for p in s["pages"] for r in p["watched"].values()]
    exits = [len(s["pages"]) for s in sessions if s["pages"] and s["pages"][-1]["then"] == "exit"]
    return {"pages per session": np.asarray(pages, float),
            "watches per page": np.asarray(watches, float),
            "ratings": np.asarray(ratings, float), "exit page": np.asarray(exits, float)}


def rates(human: Sequence[Mapping[str, Any]], sim: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Watch ratio and share of sessions ending by exit, human beside simulated."""
    def watch_ratio(ss):
        shown = sum(4 for s in ss for _ in s["pages"])
        return sum(len(p["watched"]) for s in ss for p in s["pages"]) / max(shown, 1)

    def exit_share(ss):
        return float(np.mean([bool(s["pages"]) and s["pages"][-1]["then"] == "exit"
                              for s in ss])) if ss else float("nan")

    return [{"distribution": "watch ratio", "human": round(watch_ratio(human), 4),
             "sim": round(watch_ratio(sim), 4)},
            {"distribution": "sessions ending by exit", "human": round(exit_share(human), 4),
             "sim": round(exit_share(sim), 4)}]


def by_recommender(sessions: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict]:
    """Per recommender: watch ratio, likes per page, pages per session, exit share."""
    rows = []
    for rec, ss in sessions.items():
        pages = [len(s["pages"]) for s in ss]
        ratings = [r for s in ss for p in s["pages"] for r in p["watched"].values()]
        rows.append({"recommender": rec, "sessions": len(ss),
                     "watch_ratio": len(ratings) / max(4 * sum(pages), 1),
                     "likes_per_page": sum(r >= 4 for r in ratings) / max(sum(pages), 1),
                     "pages_per_session": float(np.mean(pages)) if pages else 0.0,
                     "exit_share": float(np.mean([s["end"] == "exit" for s in ss]))
                     if ss else 0.0})
    return rows


def satisfaction_link(sessions: Sequence[SessionRecord], seed: int = 0) -> dict[str, Any] | None:
    """Whether the interview's satisfaction follows what the session held: Spearman's rho of
    each session's satisfaction with its likes per page, with a bootstrap CI over sessions;
    None when fewer than 3 sessions were interviewed or either side is constant."""
    rows = [(s.satisfaction, sum(p.liked() for p in s.pages) / len(s.pages))
            for s in sessions if s.satisfaction is not None and s.pages]
    if not rows:
        return None
    sat, likes = zip(*rows, strict=True)
    return spearman_ci(sat, likes, seed=seed)


def session_features(sessions: Sequence[Mapping[str, Any]]) -> np.ndarray:
    rows = []
    for s in sessions:
        ratings = [r for p in s["pages"] for r in p["watched"].values()]
        n = max(len(s["pages"]), 1)
        rows.append([len(s["pages"]), len(ratings) / n, np.mean(ratings) if ratings else 0.0,
                     np.std(ratings) if ratings else 0.0, sum(r >= 4 for r in ratings) / n,
                     float(bool(s["pages"]) and s["pages"][-1]["then"] == "exit")])
    return np.asarray(rows, float)


def compare_sessions(human: Sequence[Mapping], sim: Sequence[Mapping], seed: int) -> dict:
    h, s = distributions(human), distributions(sim)
    rows = [{"distribution": k, **distribution_distance(h[k], s[k])} if len(h[k]) and len(s[k])
            else {"distribution": k, "n_human": len(h[k]), "n_sim": len(s[k]),
                  "note": "not compared: one side has no value (e.g. no session ended by exit)"}
            for k in h]
    disc = discriminator_auc(session_features(human), session_features(sim), seed=seed) \
        if len(human) >= 4 and len(sim) >= 4 else {"auc": None, "note": "too few sessions"}
    return {"rows": rows, "discriminator": disc, "human": h, "sim": s}


def judge(judge_model: OptionScorer | BaseChatModel, sessions: Sequence[Mapping],
          personas: Mapping[int, str], titles: Mapping[int, str]) -> list[float]:
    """Human-likeness 1–5 per session: a local scorer gives the expected score over the five
    enumerated answers; a chat model answers in structured form (``agents.chat_policy``)."""
    asks = [prompts.JUDGE.format(persona=personas[s["user"]],
                                 session=describe_session(s["pages"], titles)) for s in sessions]
    if isinstance(judge_model, BaseChatModel):
        from agents.chat_policy import chat_judge

        return chat_judge(judge_model, asks)
    return [expected_value(judge_model.score(p, [("", str(k)) for k in range(1, 6)]),
                           range(1, 6)) for p in asks]


def judge_label(judge_model: OptionScorer | BaseChatModel) -> dict[str, Any]:
    """Who judged, as the report's caveat needs it."""
    if isinstance(judge_model, BaseChatModel):
        return {"judge": f"chat model {judge_model._llm_type}", "local": False}
    return {"judge": "local SmolLM2-135M (untrained, weak)", "local": True}


def per_user_outcome(sessions: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Users × recommenders table of likes (rating >= 4) per page."""
    rows = [{"user": s["user"], "recommender": s["recommender"],
             "likes": sum(r >= 4 for p in s["pages"] for r in p["watched"].values())
             / max(len(s["pages"]), 1)} for s in sessions]
    return pd.DataFrame(rows).pivot_table(index="user", columns="recommender", values="likes")


def per_user_hits(world: World, recommenders: Sequence[str], users: Sequence[int], part: str,
                  k: int = 10, seed: int = 0) -> pd.DataFrame:
    """Users × recommenders Recall@k of the user's ``part`` items (the human ground truth for
    ``test``, a classical offline metric for ``valid``)."""
    target = world.split.part(part)
    later = {"valid": ["valid", "test"], "test": ["test"]}[part]
    exclude: dict[int, set[int]] = {}
    for p in ("valid", "test"):
        if p not in later:
            for u, items in world.split.part(p).groupby("user")["item"]:
                exclude.setdefault(int(u), set()).update(items.astype(int))
    truths = {u: set(target.loc[target["user"] == u, "item"].astype(int)) for u in users}
    truths = {u: t for u, t in truths.items() if t}
    rows = []
    for r in recommenders:
        rec = world.recommender(r, reactive=False, seed=seed)
        for u, truth in truths.items():
            top = rec.rank(u, k, exclude=exclude.get(int(u), set()))
            rows.append({"user": u, "recommender": rec.name,
                         "recall": len(truth & set(top)) / min(k, len(truth))})
    return pd.DataFrame(rows).pivot_table(index="user", columns="recommender", values="recall")


def selection(world: World, sessions: Sequence[Mapping[str, Any]], recommenders: Sequence[str],
              users: Sequence[int], n_boot: int, seed: int) -> dict:
    """Kendall τ / Spearman ρ of the simulated ranking and of the valid-split offline ranking
    against the test-period human ranking, with user-bootstrap CIs."""
    truth = per_user_hits(world, recommenders, users, "test", seed=seed)
    sim = per_user_outcome(sessions)
    offline = per_user_hits(world, recommenders, users, "valid", seed=seed)
    return {"simulated_vs_human": rank_agreement_boot(truth, sim, n_boot=n_boot, seed=seed),
            "offline_valid_vs_human": rank_agreement_boot(truth, offline, n_boot=n_boot,
                                                          seed=seed),
            "answer": {"simulation": best_choice(sim, n_boot, seed),
                       "offline metric (valid Recall@10)": best_choice(offline, n_boot, seed),
                       "held-out humans (test Recall@10)": best_choice(truth, n_boot, seed)},
            "truth_mean": truth.mean().round(4).to_dict(),
            "simulated_mean": sim.mean().round(4).to_dict(),
            "offline_mean": offline.mean().round(4).to_dict()}
