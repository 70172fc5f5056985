"""One evaluation run: every method on the same held-out users, one metrics dict, one report.

The run is two halves: ``build_bundle`` gathers what the agents are shown, ``method_outputs``
(``evaluation.outputs``) gets every LLM method's answers in batched passes, and ``score`` turns
answers into metrics beside the baselines. The halves meet in files, so the answers can come
from another machine (``--prepare-only`` / ``--outputs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, field_validator

from agents.browse import pages_of
from evaluation import macro, micro
from evaluation.metrics import LIST_SIZES, explain_scores, paired_diff_ci, rank_agreement
from evaluation.outputs import METHODS, EvalBundle
from evaluation.plots import (
    plot_distributions,
    plot_method_bars,
    plot_ranking,
    plot_session_outcomes,
)
from evaluation.report import write_report
from graph.world import World
from simulator.custom import SPEC_HELP, check_recommenders
from training.rollout import transitions


class EvalConfig(BaseModel):
    preset: Literal["quick", "standard", "full"] = Field(
        "full", description="the sizes below as a named set (see PRESETS); explicit values win")
    users: int = Field(200, ge=1, description="held-out users every method is scored on")
    ms: list[int] = Field([1, 9], description="1:m ratios of preference discrimination "
                          "(from 1, 2, 3, 9; every list is 20 items, 5 pages of decisions)")
    next_action_users: int = Field(200, ge=0, description="users whose held-out pages are "
                                   "replayed")
    next_action_pages: int = Field(600, ge=0, description="most held-out pages replayed")
    next_state: int = Field(300, ge=0, description="held-out transitions for world-model F1")
    recommenders: list[str] = Field(["pop", "itemknn", "userknn", "als", "bpr"],
                                    description="recommenders ranked by the simulation: "
                                    + SPEC_HELP)
    sim_users: int = Field(50, ge=1, description="agents per recommender for sessions and "
                           "selection")
    judge_sessions: int = Field(8, ge=0, description="human and simulated sessions the judge "
                                "scores")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples for confidence intervals")
    ab_results: str | None = Field(None, description="CSV experiment,variant,value to rank "
                                   "recommenders against instead of held-out interactions")
    seed: int = Field(0, ge=0, description="seeds user samples, lists and simulations")

    _recommenders = field_validator("recommenders")(check_recommenders)

    @classmethod
    def of_preset(cls, preset: str, **kw: Any) -> EvalConfig:
        """A preset's sizes, with explicit values on top."""
        return cls(**{**PRESETS[preset], "preset": preset, **kw})

    @classmethod
    def quick(cls, **kw: Any) -> EvalConfig:
        return cls.of_preset("quick", **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # A smoke run: every section on a handful of users (tests).
    "quick": dict(users=2, ms=[1, 9], next_action_users=1, next_action_pages=4, next_state=1,
                  recommenders=["pop", "itemknn"], sim_users=2, judge_sessions=2, n_boot=50),
    # The default: every section and every shipped method in minutes on a 2-core CPU; too few
    # users for tight CIs, so its report shows how wide they are.
    "standard": dict(users=6, ms=[1, 9], next_action_users=6, next_action_pages=12,
                     next_state=12, recommenders=["pop", "itemknn", "bpr"], sim_users=6,
                     judge_sessions=4, n_boot=500),
    # The field defaults: 200 users, the published protocol's sizes (hours on a CPU).
    "full": {},
}


# Seconds per item decision on a 2-core CPU (bf16 SmolLM2-135M + LoRA), measured by the
# standard preset's run (`alignuser evaluate`, per-method seconds in its report's cost section
# over the decisions below), and the fixed cost of loading data and fitting the baselines.
SECONDS_PER_DECISION = {"policy": 1.0, "world_model": 2.5}
SETUP_SECONDS = 90.0
SESSION_PAGES = 5


def expected_seconds(cfg: EvalConfig, methods: Sequence[str]) -> float:
    """A rough wall time for ``cfg`` on a 2-core CPU, printed before a run starts."""
    total = SETUP_SECONDS
    pages = min(cfg.next_action_pages, cfg.next_action_users * 3)  # ~3 held-out pages a user
    for name in methods:
        spec = METHODS[name]
        decisions = (cfg.users * sum(sum(LIST_SIZES[m]) for m in cfg.ms) + pages * 4)
        if name == "full":
            decisions += cfg.sim_users * len(cfg.recommenders) * SESSION_PAGES * 4
            decisions += cfg.next_state * 8  # a generated next state costs about 8 decisions
        total += decisions * SECONDS_PER_DECISION[
            "world_model" if spec.world_model else "policy"]
    return total


def _pick(pool: Sequence[int], n: int, seed: int) -> list[int]:
    pool = list(pool)
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[i] for i in idx)


def _trs(world: World, users: Sequence[int], part: str = "test"):
    """Held-out visits on the training pages' construction (the exposure mixture)."""
    trajs = world.trajectories(part, users=list(users), progress=False)
    return trajs, transitions(trajs, world.perceiver, world.persona_at, world.split.train,
                              full_history=True)


def static_pages(world: World, recommender: str, users: Sequence[int], seed: int,
                 n: int = 20) -> list[tuple[int, list[list[int]]]]:
    """Each user's first ``n`` items of the recommender's static ranking (train items
    masked), in pages of 4: what a session on that recommender shows."""
    rec = world.recommender(recommender, reactive=False, seed=seed)
    return [(u, pages_of(rec.rank(u, n, exclude=set(world.histories.get(u, {})))))
            for u in users]


def build_bundle(world: World, cfg: EvalConfig) -> EvalBundle:
    eligible = [u for u, _, _ in micro.lists_for(world, "test", 1, None, cfg.seed)]
    if not eligible:
        raise ValueError("no user has 10 held-out test ratings: the split is too small")
    users = _pick(eligible, cfg.users, cfg.seed)
    _, trs = _trs(world, users[:cfg.next_action_users])
    pages = _pick(range(len(trs)), cfg.next_action_pages, cfg.seed)
    sim_users = users[:cfg.sim_users]
    return EvalBundle(
        perceiver=world.perceiver, personas=world.personas, histories=world.histories,
        lists={m: micro.lists_for(world, "test", m, users, cfg.seed) for m in cfg.ms},
        pages=[trs[i] for i in pages], transitions=[trs[i] for i in pages[:cfg.next_state]],
        sessions={world.recommender(r, reactive=False, seed=cfg.seed).name:
                  static_pages(world, r, sim_users, cfg.seed) for r in cfg.recommenders},
        meta={"users": users, "sim_users": sim_users})


def _agent_scorer(lists: Mapping[int, list], scores: Mapping[int, list]) -> micro.ItemScorer:
    table = {(u, tuple(items)): np.asarray(s) for m, rows in lists.items()
             for (u, items, _), s in zip(rows, scores[m], strict=True)}
    return lambda user, items: table[(user, tuple(items))]


def score(world: World, bundle: EvalBundle, outputs: Mapping[str, Any], cfg: EvalConfig,
          out_dir: Path, setup: Mapping[str, Any], judge_scorer=None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Metrics of every method from its answers, beside the baselines."""
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"setup": dict(setup)}
    plots: dict[str, Any] = {}
    labels = {name: METHODS[name].label for name in outputs}
    full = "full" if "full" in outputs else None
    users = bundle.meta["users"]

    log("preference discrimination")
    valid_all = micro.lists_for(world, "valid", 1, None, cfg.seed)
    valid_lists = [valid_all[i] for i in _pick(range(len(valid_all)), cfg.users, cfg.seed + 1)]
    methods = dict(micro.baseline_scorers(world, valid_lists, cfg.seed))
    methods |= {labels[n]: _agent_scorer(bundle.lists, o["lists"]) for n, o in outputs.items()}
    rows, per_user = micro.discrimination(methods, valid_lists, bundle.lists,
                                          fixed={labels[n]: 0.0 for n in outputs})
    metrics["discrimination"] = {"rows": rows, "note": f"{len(users)} held-out users; baseline "
                                 "thresholds tuned on validation 1:1 lists; agents say watch "
                                 "when their calibrated log-odds > 0 (offset fitted on "
                                 "validation lists when the checkpoint was trained)"}
    by_m = pd.DataFrame(rows).assign(m=lambda f: f["m"].str.split(":").str[1].astype(int))
    for metric in ("f1", "auc"):
        plots[f"discrimination/{metric}"] = plot_method_bars(by_m, metric)
    metrics["paired"] = {"rows": _paired(per_user, labels, full, cfg)}
    write_report(metrics, out_dir, plots)

    log("next action and ratings on held-out pages")
    metrics |= micro.page_metrics(world, bundle.pages, {labels[n]: o for n, o in
                                                         outputs.items()},
                                  labels.get(full or ""))
    if full:
        log("world model next-state F1")
        user_mean = world.split.train.groupby("user")["rating"].mean().to_dict()
        metrics["world_model"] = micro.next_state(outputs[full]["next_state"],
                                                  bundle.transitions, user_mean)
        log("simulated sessions and recommender selection")
        metrics |= _sessions(world, bundle, outputs[full]["sessions"], cfg, plots,
                             judge_scorer)
    metrics["calibration"] = {labels[n]: o.get("calibration") for n, o in outputs.items()}
    metrics["cost"] = {labels[n]: {"seconds": o.get("seconds"), "tokens": o.get("tokens")}
                       for n, o in outputs.items()}
    metrics["setup"]["scoring_wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_report(metrics, out_dir, plots)
    return metrics


def _paired(per_user, labels: Mapping[str, str], full: str | None, cfg: EvalConfig) -> list:
    """Each agent against the classical scorers, and each ablation against the full agent."""
    pairs = [(labels[n], base) for n in labels
             for base in ("popularity", "itemknn", "bpr", "feature regression")]
    if full:
        pairs += [(labels[n], labels[full]) for n in labels if n != full]
    rows = []
    for m, (name, base) in product(cfg.ms, pairs):
        common = sorted(set(per_user[name][m]) & set(per_user[base][m]))
        for metric in ("f1", "auc"):
            a = [per_user[name][m][u][metric] for u in common]
            b = [per_user[base][m][u][metric] for u in common]
            rows.append({"method": name, "versus": base, "metric": f"{metric} 1:{m}",
                         **paired_diff_ci(a, b, cfg.n_boot, cfg.seed)})
    return rows


def _sessions(world: World, bundle: EvalBundle, sessions: Mapping[str, list], cfg: EvalConfig,
              plots: dict, judge_scorer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sim_users = bundle.meta["sim_users"]
    human = macro.human_sessions(_trs(world, sim_users)[0])
    flat = [s for rec in sessions.values() for s in rec]
    sim_knn = sessions.get("itemknn") or flat
    cmp = macro.compare_sessions(human, sim_knn, cfg.seed)
    out["distributions"] = {"rows": cmp["rows"] + macro.rates(human, sim_knn),
                            "note": "held-out human visits (exposure-mixture pages) vs the "
                                    "agent's sessions on ItemKNN's static pages"}
    out["discriminator"] = cmp["discriminator"]
    plots["distributions"] = plot_distributions(cmp["human"], cmp["sim"])
    if judge_scorer is not None and cfg.judge_sessions:
        titles = {i: it.title for i, it in world.ds.items.items()}
        n = cfg.judge_sessions
        out["judge"] = {
            "human": float(np.nanmean(macro.judge(judge_scorer, human[:n], world.personas,
                                               titles))),
            "simulated": float(np.nanmean(macro.judge(judge_scorer, sim_knn[:n], world.personas,
                                                   titles))),
            **macro.judge_label(judge_scorer), "n_sessions": n}
    sel = macro.selection(world, flat, cfg.recommenders, sim_users, cfg.n_boot, cfg.seed)
    if cfg.ab_results:
        from evaluation.metrics import read_ab_results

        sel["simulated_vs_ab"] = rank_agreement(read_ab_results(cfg.ab_results),
                                                sel["simulated_mean"], cfg.n_boot, cfg.seed)
    out["selection"] = sel
    out["sessions_by_recommender"] = {"rows": macro.by_recommender(sessions)}
    plots["sessions_by_recommender"] = plot_session_outcomes(
        out["sessions_by_recommender"]["rows"])
    plots["selection/ranking"] = plot_ranking(sel["truth_mean"], sel["simulated_mean"])
    return out


def explain(scored: Sequence[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(scored)
    return explain_scores(frame["score"].to_numpy(), frame.drop(columns=["score", "watched"]),
                          {"popularity": ["popularity"], "mean rating": ["mean_rating"],
                           "collaborative match": ["match", "close_watched", "close_rating"],
                           "similar titles": ["n_evidence", "evidence_rating",
                                              "max_similarity"]})
