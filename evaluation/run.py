"""One evaluation run: every method on the same held-out users, one metrics dict, one report.

The run is two halves: ``build_bundle`` gathers what the agents are shown, ``method_outputs``
(``evaluation.outputs``) gets every LLM method's answers in batched passes, and ``score`` turns
answers into metrics beside the baselines. The halves meet in files, so the answers can come
from another machine (``--prepare-only`` / ``--outputs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, Field, field_validator, model_validator

from agents.browse import LIST_VIEWS, pages_of
from agents.policy import DEFAULT_TEMPERATURE
from agents.transition import Transition
from agents.world import World
from evaluation.metrics import explain_scores
from evaluation.outputs import METHODS, OUTPUT_KINDS, EvalBundle
from evaluation.parts import Parts
from evaluation.report import png_bytes, write_report
from evaluation.sections import REGISTRY, Context, held_out, pick, select
from simulator.custom import SPEC_HELP, check_recommenders
from simulator.env import MAX_PAGES
from simulator.lists import LIST_SIZES
from simulator.recommenders import SELECTION


class EvalConfig(BaseModel):
    preset: Literal["quick", "standard", "full"] = Field(
        "full", description="the sizes below as a named set (PRESETS), explicit values win: "
        "quick: a smoke test; standard: every section and shipped method in minutes on a CPU; "
        "full: 200 users, the README table (hours on a CPU; its expected time is printed first)")
    users: int = Field(200, ge=1, description="held-out users every method is scored on")
    ms: list[int] = Field([1, 9], description="1:m ratios of preference discrimination "
                          "(from 1, 2, 3, 9; every list is 20 items, 5 pages of decisions)")
    list_views: int = Field(1, ge=min(LIST_VIEWS), le=max(LIST_VIEWS),
                            description="times each 1:m list is shown to an LLM agent: 1, or "
                            "2 to show it reversed too and average each item's two watch "
                            "log-odds (twice the lists' time)")
    next_action_users: int = Field(200, ge=0, description="users whose held-out pages are "
                                   "replayed")
    next_action_pages: int = Field(600, ge=0, description="most held-out pages replayed")
    next_state: int = Field(300, ge=0, description="held-out transitions for world-model F1")
    recommenders: list[str] = Field(list(SELECTION),
                                    description="recommenders ranked by the simulation: "
                                    + SPEC_HELP)
    session_pages: int = Field(MAX_PAGES, ge=1, description="most pages of a simulated session (4 "
                               "items each, from the recommender's static ranking)")
    simulator: Literal["full", "wm_policy", "sft"] = Field(
        "full", description="the agent whose sessions the session and selection sections "
        "simulate and that ablations are paired against (its method must be in --methods)")
    sim_users: int = Field(50, ge=1, description="agents per recommender for sessions and "
                           "selection")
    judge_sessions: int = Field(8, ge=0, description="human and simulated sessions the judge "
                                "scores")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples for confidence intervals")
    ab_results: str | None = Field(None, description="CSV experiment,variant,value to rank "
                                   "recommenders against instead of held-out interactions")
    seed: int = Field(0, ge=0, description="seeds user samples, lists and simulations")
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, allow_inf_nan=False,
                               description="sampling temperature of the simulated sessions, as "
                               "`simulate` browses (seeded by --seed; 0 = greedy); 1:m lists and "
                               "held-out page replays are always greedy")

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
    "standard": dict(users=3, ms=[1, 9], next_action_users=3, next_action_pages=6,
                     next_state=3, recommenders=["pop", "itemknn", "bpr"], sim_users=3,
                     session_pages=2, judge_sessions=3, n_boot=500),
    # The field defaults: 200 users, the published protocol's sizes (hours on a CPU).
    "full": {},
}


class EvaluateRunConfig(BaseModel):
    """What an evaluate run loads and where its answers come from, beside the sizes in
    ``EvalConfig``. Lists stay comma-separated strings, as run manifests record them, so a
    resumed run compares them as given."""

    model: str = Field("default", description="base causal LM")
    checkpoint: str | None = Field(None, description="full AlignUSER adapter (default: the "
                                   "shipped checkpoint)")
    sft_checkpoint: str | None = Field(None, description="policy-only (SFT) adapter (default: "
                                       "the shipped one)")
    wm_policy_checkpoint: str | None = Field(None, description="world model + policy adapter "
                                             "(default: the shipped one)")
    methods: str = Field(",".join(METHODS), description="LLM methods to run, from "
                         f"{', '.join(METHODS)}; baselines always run")
    sections: str | None = Field(
        None, description=f"report sections to compute, comma-separated, from "
        f"{', '.join(REGISTRY)}; only the answers they read are computed, the others show as "
        "not run (default: all)")
    judge_model: str | None = Field(
        None, description="a chat model as the human-likeness judge, PROVIDER:MODEL or "
        "pkg.module:factory (as --chat-model); default: the local base model")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (CUDA when "
                                                   "present), cpu or cuda")
    backend: Literal["local", "ray"] = Field(
        "local", description="where the methods' answers are computed: local (this process) "
        "or ray (blocks of lists, pages and sessions on --concurrency Ray actors, each with a "
        "copy of the model; needs the 'ray' extra)")
    address: str | None = Field(None, description="backend ray: the cluster to join "
                                "(ray://HOST:10001, auto, or an address); default: a local "
                                "cluster started for the run")
    concurrency: int | None = Field(None, ge=1, description="backend ray: actors (default: "
                                    "one per free CPU of the cluster, or per free GPU where "
                                    "the model runs on CUDA)")
    prepare_only: str | None = Field(
        None, description="write what the agents are shown to FILE and stop; answer it "
        "anywhere with python -m evaluation.outputs FILE OUT")
    outputs: str | None = Field(None, description="the methods' answers computed elsewhere "
                                "(python -m evaluation.outputs)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: str) -> str:
        unknown = [m for m in value.split(",") if m and m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: "
                             f"{', '.join(METHODS)}")
        return value

    @field_validator("sections")
    @classmethod
    def _known_sections(cls, value: str | None) -> str | None:
        select(value)  # one error naming every unknown section
        return value

    @model_validator(mode="after")
    def _ray_only(self) -> EvaluateRunConfig:
        if self.backend != "ray" and (self.address is not None or self.concurrency is not None):
            raise ValueError("--address and --concurrency place the answers on a Ray cluster: "
                             "add --backend ray")
        return self

    def method_names(self) -> list[str]:
        return [m for m in self.methods.split(",") if m]


# Seconds per decision on a 2-core CPU (bf16 SmolLM2-135M, merged LoRA, options packed as token
# trees, pages in lockstep), fitted on the methods' times in `alignuser evaluate --preset full`
# (runs/evalX-200, commit 3efa35d; each method 8,000 list and 2,400 held-out page decisions):
# policy-only methods 912-1,187 s, world-model methods 1,433-1,639 s, and the full agent, with
# its 5,000 session and 450 next-state decisions besides, 2,564 s. Plus loading the data,
# fitting the baselines, building the users' held-out pages and scoring: about 100 s for that
# run's 200 users, 24 s for the standard preset's 3 (runs/evalD).
LIST_SECONDS = {False: 0.075, True: 0.135}  # by whether the method runs the world model
SECONDS_PER_DECISION = 0.19
# One held-out transition's next state, generated (up to 96 tokens, every transition in one
# batch): 12 min 52 s and 13 min 20 s for the full preset's 300 with the data set up around
# them (runs/wmT-200, runs/wmG-200), about 2.2 s each; 1.5 decisions (0.3 s) before.
NEXT_STATE_SECONDS = 2.2
SETUP_SECONDS = 20.0
SETUP_SECONDS_PER_USER = 0.4


def setup_seconds(cfg: EvalConfig) -> float:
    return SETUP_SECONDS + SETUP_SECONDS_PER_USER * max(cfg.users, cfg.next_action_users)


def expected_seconds(cfg: EvalConfig, methods: Sequence[str],
                     needs: Collection[str] = OUTPUT_KINDS) -> float:
    """A rough wall time for ``cfg`` on a 2-core CPU, printed before a run starts; ``needs``
    (``evaluation.sections.needs``) leaves out the answers no chosen section reads."""
    total = setup_seconds(cfg)
    pages = min(cfg.next_action_pages, cfg.next_action_users * 3)  # ~3 held-out pages a user
    for name in methods:
        spec = METHODS[name]
        if "lists" in needs:
            total += (cfg.users * sum(sum(LIST_SIZES[m]) for m in cfg.ms) * cfg.list_views
                      * LIST_SECONDS[spec.world_model])
        decisions = pages * 4 if "pages" in needs else 0
        if name == cfg.simulator:
            if "sessions" in needs:
                decisions += cfg.sim_users * len(cfg.recommenders) * cfg.session_pages * 4
            if spec.world_model and "next_state" in needs:
                total += cfg.next_state * NEXT_STATE_SECONDS
        total += decisions * SECONDS_PER_DECISION
    return total


def static_pages(world: World, recommender: str, users: Sequence[int], seed: int,
                 n: int = 20) -> list[tuple[int, list[list[int]]]]:
    """Each user's first ``n`` items of the recommender's static ranking (train items
    masked), in pages of 4: what a session on that recommender shows."""
    rec = world.recommender(recommender, reactive=False, seed=seed)
    return [(u, pages_of(rec.rank(u, n, exclude=set(world.histories.get(u, {})))))
            for u in users]


def held_out_pages(world: World, cfg: EvalConfig, part: str = "test"
                   ) -> tuple[list[int], list[Transition]]:
    """The evaluated users and the held-out pages replayed for them (``part``'s visits; the
    validation part gives the same users' pages where the offsets are fitted)."""
    eligible = [u for u, _, _ in world.lists("test", 1, None, cfg.seed)]
    if not eligible:
        raise ValueError("no user has 10 held-out test ratings: the split is too small")
    users = pick(eligible, cfg.users, cfg.seed)
    _, trs = held_out(world, users[:cfg.next_action_users], part)
    return users, [trs[i] for i in pick(range(len(trs)), cfg.next_action_pages, cfg.seed)]


def build_bundle(world: World, cfg: EvalConfig) -> EvalBundle:
    users, pages = held_out_pages(world, cfg)
    sim_users = users[:cfg.sim_users]
    return EvalBundle(
        perceiver=world.perceiver, personas=world.personas, histories=world.histories,
        lists={m: world.lists("test", m, users, cfg.seed) for m in cfg.ms},
        pages=pages, transitions=pages[:cfg.next_state],
        sessions={world.recommender(r, reactive=False, seed=cfg.seed).name:
                  static_pages(world, r, sim_users, cfg.seed, 4 * cfg.session_pages)
                  for r in cfg.recommenders},
        meta={"users": users, "sim_users": sim_users}, list_views=cfg.list_views)


def score(world: World, bundle: EvalBundle, outputs: Mapping[str, Any], cfg: EvalConfig,
          out_dir: Path, setup: Mapping[str, Any], judge_scorer=None,
          log: Callable[[str], None] = print, *, sections: Sequence[str] | None = None,
          parts: Parts | None = None, make_judge: Callable[[], Any] | None = None,
          started: float | None = None) -> dict[str, Any]:
    """Metrics of every method from its answers, beside the baselines: one registered section
    (``evaluation.sections``) after another, the report rewritten as each finishes. With
    ``parts``, each section is committed there and one already committed is read back instead
    of computed (a resumed run). ``started`` (a ``time.perf_counter`` reading) records the
    invocation's wall time, answers included (a resumed run counts only its own)."""
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"setup": dict(setup)}
    plots: dict[str, Any] = {}
    ctx = Context(world, bundle, outputs, cfg, make_judge or (lambda: judge_scorer), log)
    for name in select(sections):
        result = parts.section(name) if parts is not None else None
        if result is not None:
            log(f"{name}: kept from the interrupted run")
        else:
            result = REGISTRY[name].run(ctx)
            if parts is not None:
                result = parts.save_section(name, result)
        metrics |= result.metrics
        plots |= {key: png_bytes(fig) for key, fig in result.plots.items()}  # rendered once
        write_report(metrics, out_dir, plots)
    metrics["setup"]["scoring_wall_time_s"] = round(time.perf_counter() - t0, 1)
    if started is not None:
        metrics["setup"]["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_report(metrics, out_dir, plots)
    return metrics


def explain(scored: Sequence[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(scored)
    return explain_scores(frame["score"].to_numpy(), frame.drop(columns=["score", "watched"]),
                          {"popularity": ["popularity"], "mean rating": ["mean_rating"],
                           "collaborative match": ["match", "close_watched", "close_rating"],
                           "similar titles": ["n_evidence", "evidence_rating",
                                              "max_similarity"],
                           "other items on the page": ["page_mates_match"]})
