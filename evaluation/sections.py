"""The evaluation's sections as registered units.

Each ``Section`` names the method answers it reads (``needs``, from ``OUTPUT_KINDS``) and turns
them into its metrics and plots. ``evaluation.run.score`` is a loop over the chosen sections, so
a run can compute a subset (``alignuser evaluate --sections discrimination,selection``), skip the
answers no chosen section reads, and commit each section as it finishes (``evaluation.parts``).
A section that has nothing to score (e.g. sessions without the simulating agent) returns no metrics,
and the report says "not run".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import product
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from agents.transition import transitions
from evaluation import macro, micro
from evaluation.metrics import paired_diff_ci, rank_agreement
from evaluation.outputs import METHODS, EvalBundle
from evaluation.plots import (
    plot_distributions,
    plot_method_bars,
    plot_ranking,
    plot_session_outcomes,
)

if TYPE_CHECKING:
    from agents.world import World
    from evaluation.run import EvalConfig

NO_PAIRS = "fewer than two users answered: no paired CI"
BASELINE_PAIRS = ("popularity", "itemknn", "bpr", "ease", "feature regression")


@dataclass
class Context:
    """What every section may read; ``judge`` is built on first use, so a run that resumes
    past the sessions section never loads a judge model."""

    world: World
    bundle: EvalBundle
    outputs: Mapping[str, Mapping[str, Any]]
    cfg: EvalConfig
    make_judge: Callable[[], Any] | None = None
    log: Callable[[str], None] = print

    @cached_property
    def labels(self) -> dict[str, str]:
        return {name: METHODS[name].label for name in self.outputs}

    @property
    def simulator(self) -> str | None:
        """The simulating agent (``EvalConfig.simulator``) when it is in the run."""
        return self.cfg.simulator if self.cfg.simulator in self.outputs else None

    @property
    def explained(self) -> str | None:
        """Whose decisions the attribution explains: the most trained agent in the run."""
        return next((n for n in ("full", "wm_policy", "sft") if n in self.outputs), None)

    @cached_property
    def judge(self) -> Any:
        return self.make_judge() if self.make_judge is not None else None


@dataclass
class Result:
    """A section's metrics (top-level keys of metrics.json) and plots (figures or PNG bytes,
    keyed as ``evaluation.report.write_report`` places them)."""

    metrics: dict[str, Any]
    plots: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    name: str
    needs: frozenset[str]
    run: Callable[[Context], Result]
    help: str


def pick(pool: Sequence[int], n: int, seed: int) -> list[int]:
    pool = list(pool)
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[i] for i in idx)


def validation_lists(world: World, users: int, seed: int) -> list:
    """The validation 1:1 lists the discrimination section fits the baselines' cuts on."""
    pool = world.lists("valid", 1, None, seed)
    return [pool[i] for i in pick(range(len(pool)), users, seed + 1)]


def held_out(world: World, users: Sequence[int], part: str = "test"):
    """Held-out visits on the training pages' construction (the exposure mixture)."""
    trajs = world.trajectories(part, users=list(users), progress=False)
    return trajs, transitions(trajs, world, full_history=True)


def agent_scorer(lists: Mapping[int, list], scores: Mapping[int, list]) -> micro.ItemScorer:
    """An agent's answers on the lists (per ratio, in the lists' order) as an item scorer."""
    table = {(u, tuple(items)): np.asarray(s) for m, rows in lists.items()
             for (u, items, _), s in zip(rows, scores[m], strict=True)}
    return lambda user, items: table[(user, tuple(items))]


def discrimination(ctx: Context) -> Result:
    cfg, labels, outputs = ctx.cfg, ctx.labels, ctx.outputs
    ctx.log("preference discrimination")
    valid_lists = validation_lists(ctx.world, cfg.users, cfg.seed)
    methods = dict(micro.baseline_scorers(ctx.world, valid_lists, cfg.seed))
    methods |= {labels[n]: agent_scorer(ctx.bundle.lists, o["lists"])
                for n, o in outputs.items()}
    rows, per_user = micro.discrimination(methods, valid_lists, ctx.bundle.lists,
                                          fixed={labels[n]: 0.0 for n in outputs})
    by_m = pd.DataFrame(rows).assign(m=lambda f: f["m"].str.split(":").str[1].astype(int))
    note = (f"{len(ctx.bundle.meta['users'])} held-out users; baseline thresholds tuned on "
            "validation 1:1 lists; agents say watch when their calibrated log-odds > 0 (offset "
            "fitted on validation lists when the checkpoint was trained)"
            + ("; each list shown to the agents twice, as given and reversed, each item's two "
               "log-odds averaged" if ctx.bundle.list_views == 2 else ""))
    return Result({"discrimination": {"rows": rows, "note": note},
                   "paired": paired_table(paired(per_user, labels, ctx.simulator, cfg))},
                  {f"discrimination/{m}": plot_method_bars(by_m, m) for m in ("f1", "auc")})


def paired(per_user, labels: Mapping[str, str], main: str | None, cfg: EvalConfig) -> list:
    """Each agent against the classical scorers, and every other agent against ``main`` (the
    simulating agent: the full one by default, its ablations paired against it)."""
    pairs = [(labels[n], base) for n in labels for base in BASELINE_PAIRS]
    if main:
        pairs += [(labels[n], labels[main]) for n in labels if n != main]
    return paired_rows(per_user, pairs, {m: f" 1:{m}" for m in cfg.ms}, ("f1", "auc"), cfg)


def paired_rows(per_user, pairs: Sequence[tuple[str, str]], parts: Mapping[Any, str],
                metrics: Sequence[str], cfg: EvalConfig) -> list:
    """Paired per-user differences ``name - base`` with bootstrap CIs, per part of the answers
    (``per_user[name][part][user][metric]``; ``parts`` maps each part to its label's suffix).
    A pair with fewer than two users in common has no CI and no row."""
    rows = []
    for (part, tag), (name, base) in product(parts.items(), pairs):
        common = sorted(set(per_user[name][part]) & set(per_user[base][part]))
        if len(common) < 2:
            continue
        for metric in metrics:
            a = [per_user[name][part][u][metric] for u in common]
            b = [per_user[base][part][u][metric] for u in common]
            rows.append({"method": name, "versus": base, "metric": f"{metric}{tag}",
                         **paired_diff_ci(a, b, cfg.n_boot, cfg.seed)})
    return rows


def next_action(ctx: Context) -> Result:
    ctx.log("next action and ratings on held-out pages")
    named = {ctx.labels[n]: o for n, o in ctx.outputs.items()}
    out = micro.page_metrics(ctx.world, ctx.bundle.pages, named,
                             ctx.labels.get(ctx.explained or ""))
    main = ctx.labels.get(ctx.simulator or "")
    if main in named and len(named) > 1:  # the ablations' page answers against the full agent's
        per_user = {k: {"pages": v} for k, v in micro.page_match_by_user(ctx.bundle.pages,
                                                                          named).items()}
        rows = paired_rows(per_user, [(k, main) for k in named if k != main], {"pages": ""},
                           ("jaccard", "exact"), ctx.cfg)
        out["paired_pages"] = paired_table(
            rows, "per-user mean over the user's held-out pages of the watched set's Jaccard and "
                  "exact agreement with the human's, each agent minus the simulating one")
    return Result(out)


def paired_table(rows: list, note: str | None = None) -> dict:
    """Paired rows for the report; with none (fewer than two users), the reason instead."""
    if not rows:
        return {"rows": [], "note": NO_PAIRS}
    return {"rows": rows, "note": note} if note else {"rows": rows}


def world_model(ctx: Context) -> Result:
    if not ctx.simulator or "next_state" not in ctx.outputs[ctx.simulator]:
        return Result({})
    ctx.log("world model next-state F1")
    user_mean = ctx.world.split.train.groupby("user")["rating"].mean().to_dict()
    return Result({"world_model": micro.next_state(ctx.outputs[ctx.simulator]["next_state"],
                                                   ctx.bundle.transitions, user_mean)})


def sessions(ctx: Context) -> Result:
    """The simulating agent's sessions against held-out human visits: distributions, a
    discriminator, the judge and what each recommender's sessions held."""
    if not ctx.simulator:
        return Result({})
    ctx.log("simulated sessions")
    world, cfg, by_rec = ctx.world, ctx.cfg, ctx.outputs[ctx.simulator]["sessions"]
    human = macro.human_sessions(held_out(world, ctx.bundle.meta["sim_users"])[0])
    sim_knn = by_rec.get("itemknn") or [s for rec in by_rec.values() for s in rec]
    cmp = macro.compare_sessions(human, sim_knn, cfg.seed)
    out: dict[str, Any] = {
        "distributions": {"rows": cmp["rows"] + macro.rates(human, sim_knn),
                          "note": "held-out human visits (exposure-mixture pages) vs the "
                                  "agent's sessions on ItemKNN's static pages, sampled at "
                                  f"temperature {cfg.temperature:g} as simulate browses"},
        "discriminator": cmp["discriminator"],
        "sessions_by_recommender": {"rows": macro.by_recommender(by_rec)}}
    plots = {"distributions": plot_distributions(cmp["human"], cmp["sim"]),
             "sessions_by_recommender": plot_session_outcomes(
                 out["sessions_by_recommender"]["rows"])}
    if cfg.judge_sessions and ctx.judge is not None:
        titles = {i: it.title for i, it in world.ds.items.items()}
        n = cfg.judge_sessions
        out["judge"] = {
            "human": float(np.nanmean(macro.judge(ctx.judge, human[:n], world.personas,
                                                  titles))),
            "simulated": float(np.nanmean(macro.judge(ctx.judge, sim_knn[:n], world.personas,
                                                      titles))),
            **macro.judge_label(ctx.judge), "n_sessions": n}
    return Result(out, plots)


def selection(ctx: Context) -> Result:
    """Recommenders ranked by the simulated sessions, with the ship answer."""
    if not ctx.simulator:
        return Result({})
    ctx.log("recommender selection")
    cfg = ctx.cfg
    flat = [s for rec in ctx.outputs[ctx.simulator]["sessions"].values() for s in rec]
    sel = macro.selection(ctx.world, flat, cfg.recommenders, ctx.bundle.meta["sim_users"],
                          cfg.n_boot, cfg.seed)
    if cfg.ab_results:
        from evaluation.metrics import read_ab_results

        sel["simulated_vs_ab"] = rank_agreement(read_ab_results(cfg.ab_results),
                                                sel["simulated_mean"], cfg.n_boot, cfg.seed)
    return Result({"selection": sel},
                  {"selection/ranking": plot_ranking(sel["truth_mean"], sel["simulated_mean"])})


def calibration(ctx: Context) -> Result:
    return Result({"calibration": {ctx.labels[n]: o.get("calibration")
                                   for n, o in ctx.outputs.items()}})


def cost(ctx: Context) -> Result:
    return Result({"cost": {ctx.labels[n]: {"seconds": o.get("seconds"),
                                            "tokens": o.get("tokens")}
                            for n, o in ctx.outputs.items()}})


REGISTRY: dict[str, Section] = {s.name: s for s in (
    Section("discrimination", frozenset({"lists"}), discrimination,
            "1:m preference discrimination and paired differences"),
    Section("next_action", frozenset({"pages"}), next_action,
            "next action, ratings and what the decisions depend on, on held-out pages"),
    Section("world_model", frozenset({"next_state"}), world_model, "next-state F1"),
    Section("sessions", frozenset({"sessions"}), sessions,
            "session distributions, discriminator and judge"),
    Section("selection", frozenset({"sessions"}), selection,
            "recommender selection and the ship answer"),
    Section("calibration", frozenset(), calibration, "each method's calibration offsets"),
    Section("cost", frozenset(), cost, "each method's seconds and tokens"),
)}


def select(names: str | Iterable[str] | None) -> list[str]:
    """Section names in registry order; None or empty = all. Unknown names are one error."""
    if names is None:
        return list(REGISTRY)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)
              if n.strip()]
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: "
                         f"{', '.join(REGISTRY)}")
    return [n for n in REGISTRY if n in wanted] if wanted else list(REGISTRY)


def needs(names: Iterable[str]) -> frozenset[str]:
    """The method answers the sections ``names`` read (a subset of ``OUTPUT_KINDS``)."""
    return frozenset[str]().union(*(REGISTRY[n].needs for n in names))
