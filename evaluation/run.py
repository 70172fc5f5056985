"""One evaluation run: every method on the same held-out users, one metrics dict, one report."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from evaluation import macro, micro
from evaluation.metrics import explain_scores, paired_diff_ci, rank_agreement, rmse_mae
from evaluation.report import plot_distributions, plot_method_bars, plot_ranking, write_report
from graph.world import World
from training.rollout import transitions


class EvalConfig(BaseModel):
    preset: Literal["quick", "full"] = Field("full", description="quick: a smoke run for tests")
    users: int = Field(6, description="held-out users every method is scored on")
    ms: list[int] = Field([1, 2, 3, 9], description="1:m ratios of preference discrimination "
                          "(1, 2, 3 and 9; every list is 20 items, 5 pages of LLM decisions)")
    next_action_users: int = Field(8, description="users whose held-out pages are replayed")
    next_action_pages: int = Field(20, description="most held-out pages replayed per method")
    next_state: int = Field(10, description="held-out transitions for world-model F1")
    recommenders: list[str] = Field(["pop", "itemknn", "userknn", "als", "bpr"],
                                    description="recommenders ranked by the simulation")
    sim_users: int = Field(5, description="agents per recommender for sessions and selection")
    judge_sessions: int = Field(8, description="human and simulated sessions the judge scores")
    n_boot: int = Field(1000, description="bootstrap resamples for confidence intervals")
    ab_results: str | None = Field(None, description="CSV experiment,variant,value to rank "
                                   "recommenders against instead of held-out interactions")
    seed: int = Field(0, description="seeds user samples, lists and simulations")

    @classmethod
    def quick(cls, **kw: Any) -> EvalConfig:
        base = dict(preset="quick", users=2, ms=[1, 9], next_action_users=1, next_action_pages=4,
                    next_state=1, recommenders=["pop", "itemknn"], sim_users=2,
                    judge_sessions=2, n_boot=50)
        return cls(**{**base, **kw})


def _pick(pool: Sequence[int], n: int, seed: int) -> list[int]:
    pool = list(pool)
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[i] for i in idx)


def _trs(world: World, users: Sequence[int], part: str = "test"):
    trajs = world.trajectories(part, "itemknn", users=list(users), progress=False)
    return trajs, transitions(trajs, world.perceiver, world.persona_at, world.split.train,
                              full_history=True)


def evaluate(world: World, agents: Mapping[str, micro.AgentVariant], full_name: str | None,
             cfg: EvalConfig, out_dir: Path, setup: Mapping[str, Any],
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section; ``full_name`` names the agent used for sessions, WM and selection."""
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"setup": dict(setup)}
    plots: dict[str, Any] = {}
    full = agents.get(full_name) if full_name else None

    log("preference discrimination")
    # Users with enough held-out items for every ratio (1:1 needs 10), sampled once for all.
    eligible = [u for u, _, _ in micro.lists_for(world, "test", 1, None, cfg.seed)]
    if not eligible:
        raise ValueError("no user has 10 held-out test ratings: the split is too small")
    users = _pick(eligible, cfg.users, cfg.seed)
    valid_all = micro.lists_for(world, "valid", 1, None, cfg.seed)
    valid_lists = [valid_all[i] for i in _pick(range(len(valid_all)), cfg.users, cfg.seed + 1)]
    test_lists = {m: micro.lists_for(world, "test", m, users, cfg.seed) for m in cfg.ms}
    methods = dict(micro.baseline_scorers(world, valid_lists, cfg.seed))
    methods |= {name: micro.agent_item_scores(a, world) for name, a in agents.items()}
    rows, per_user = micro.discrimination(methods, valid_lists, test_lists,
                                          fixed={name: 0.0 for name in agents})
    metrics["discrimination"] = {"rows": rows, "note": f"{len(users)} held-out users sampled; "
                                 "baseline thresholds tuned on validation 1:1 lists; agents "
                                 "say watch when log P(watch) > log P(skip)"}
    by_m = pd.DataFrame(rows).assign(m=lambda f: f["m"].str.split(":").str[1].astype(int))
    for metric in ("f1", "auc"):
        plots[f"discrimination/{metric}"] = plot_method_bars(by_m, metric)

    write_report(metrics, out_dir, plots)  # partial reports: a late failure keeps these
    log("paired differences")
    paired = []
    for m, name, base in product(cfg.ms, agents, ("popularity", "bpr", "feature regression")):
        common = sorted(set(per_user[name][m]) & set(per_user[base][m]))
        for metric in ("f1", "auc"):
            a = [per_user[name][m][u][metric] for u in common]
            b = [per_user[base][m][u][metric] for u in common]
            paired.append({"method": name, "versus": base, "metric": f"{metric} 1:{m}",
                           **paired_diff_ci(a, b, cfg.n_boot, cfg.seed)})
    metrics["paired"] = {"rows": paired}

    log("next action and ratings on held-out pages")
    na_users = users[:cfg.next_action_users]
    trajs, trs = _trs(world, na_users)
    trs = trs[:cfg.next_action_pages]
    from simulator.offline import rating_predictions

    pairs = pd.DataFrame([(tr.user, tr.items[s - 1]) for tr in trs for s in tr.ratings],
                         columns=["user", "item"])
    mf = rating_predictions(world.split.train, pairs) if len(pairs) else {}
    y = [r for tr in trs for r in tr.ratings.values()]
    rating_rows = [{"method": k, **rmse_mae(y, v)} for k, v in mf.items()]
    counts = world.split.train["item"].value_counts()
    top = float(np.quantile(counts.to_numpy(), 0.9))
    na_rows = [{"method": "popularity",
                **micro.baseline_actions(trs, lambda tr: {s for s, i in enumerate(tr.items, 1)
                                                          if counts.get(i, 0) >= top},
                                         lambda tr, s: float(np.clip(
                                             world.similarity.mean_rating(tr.items[s - 1])
                                             or 3.5, 1, 5)))}]
    explained = None
    for name, a in agents.items():
        res, scored = micro.next_action(a, trs)
        na_rows.append({"method": name, **res})
        rating_rows.append({"method": name, "rmse": res.get("rmse"), "mae": res.get("mae"),
                            "n": res.get("n")})
        if name == full_name and scored:
            frame = pd.DataFrame(scored)
            explained = explain_scores(frame["score"].to_numpy(), frame.drop(columns=[
                "score", "watched"]), {"popularity": ["popularity"],
                                       "mean rating": ["mean_rating"],
                                       "personal evidence": ["n_evidence", "evidence_rating",
                                                             "max_similarity"]})
    metrics["next_action"] = {"rows": na_rows, "note": f"{len(trs)} held-out pages of "
                              f"{len(na_users)} users (itemknn pages, human session given)"}
    metrics["rating"] = {"rows": rating_rows, "note": "raw 1-5 held-out ratings of watched items"}
    if explained is not None:
        metrics["explain"] = {"rows": explained.to_dict("records"),
                              "note": f"regression of {full_name}'s watch scores on what it "
                                      "perceived"}

    write_report(metrics, out_dir, plots)
    if full is not None and cfg.next_state:
        log("world model next-state F1")
        sample = trs[:cfg.next_state]
        user_mean = world.split.train.groupby("user")["rating"].mean().to_dict()
        metrics["world_model"] = micro.next_state(full.scorer, sample, user_mean)

    if full is not None:
        log("simulated sessions and recommender selection")
        sim_users = users[:cfg.sim_users]
        sessions = macro.simulate(world, "aligned", full.scorer, sim_users, cfg.recommenders,
                                  full.world_model, full.memory, cfg.seed)
        human = macro.human_sessions(_trs(world, sim_users)[0])
        sim_knn = [s for s in sessions if s["recommender"] == "itemknn"] or sessions
        cmp = macro.compare_sessions(human, sim_knn, cfg.seed)
        metrics["distributions"] = {"rows": cmp["rows"]}
        metrics["discriminator"] = cmp["discriminator"]
        plots["distributions"] = plot_distributions(cmp["human"], cmp["sim"])
        titles = {i: it.title for i, it in world.ds.items.items()}
        n = cfg.judge_sessions
        base = agents.get("zero-shot")
        judge = base.scorer if base else full.scorer
        metrics["judge"] = {
            "human": float(np.mean(macro.judge(judge, human[:n], world.personas, titles))),
            "simulated": float(np.mean(macro.judge(judge, sim_knn[:n], world.personas, titles))),
            "judge": "local SmolLM2-135M (untrained)" if base else "local model (agent weights)",
            "local": True,
            "n_sessions": min(n, len(human), len(sim_knn))}
        sel = macro.selection(world, sessions, cfg.recommenders, sim_users, cfg.n_boot,
                              cfg.seed)
        if cfg.ab_results:
            from evaluation.metrics import read_ab_results

            ab = read_ab_results(cfg.ab_results)
            sel["simulated_vs_ab"] = rank_agreement(ab, sel["simulated_mean"], cfg.n_boot,
                                                    cfg.seed)
        metrics["selection"] = sel
        plots["selection/ranking"] = plot_ranking(sel["truth_mean"], sel["simulated_mean"])
    metrics["setup"]["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_report(metrics, out_dir, plots)
    return metrics
