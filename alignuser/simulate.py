"""`alignuser simulate`: a population of agents browses each recommender; one run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from alignuser.checks import check_adapter
from alignuser.config import LLM_POLICIES, SimulateConfig, World, world_for
from graph.deps import AgentDeps
from graph.graph import build_graph
from graph.runner import run_population, session_metrics
from graph.trace import open_checkpointer
from graph.world import make_runtime
from memory.store import make_memory
from simulator.custom import recommender_label
from simulator.runs import check_run_dir, run_path, staged_run_dir, update_manifest, write_manifest


def check_options(cfg: SimulateConfig, output: str | Path | None) -> None:
    """What can be refused before data or a model loads: the adapter or chat model spec and the
    run directory.

    The numeric bounds (``--agents >= 1`` ...) are already enforced by ``SimulateConfig``."""
    if cfg.policy == "aligned":
        if cfg.checkpoint is None:
            raise FileNotFoundError("policy aligned needs --checkpoint (no default checkpoint "
                                    "found); train one with `alignuser train` or use "
                                    "--policy zero_shot")
        check_adapter(cfg.checkpoint)
    if cfg.policy == "chat":  # an unknown provider, missing package or bad factory fails here
        chat_policy(cfg)
    check_run_dir(output)


def check_agents(cfg: SimulateConfig, world: World) -> None:
    """More agents than test users used to be cut silently to the user count; refuse instead."""
    available = world.split.test["user"].nunique()
    if cfg.agents > available:
        raise ValueError(f"--agents {cfg.agents} is more than the {available} users with test "
                         f"ratings in {world.ds.name}; pass --agents {available} or fewer")


def load_scorer(cfg: SimulateConfig) -> tuple[Any, str | None]:
    """The LLM scorer the run needs (None when no node needs a language model)."""
    if cfg.policy not in LLM_POLICIES:
        return None, cfg.chat_model if cfg.policy == "chat" else None
    from agents.llm import load_lm
    from agents.scorer import Scorer

    adapter = cfg.checkpoint if cfg.policy == "aligned" else None
    if cfg.policy == "aligned" and adapter is None:
        raise FileNotFoundError("policy aligned needs --checkpoint (no default checkpoint found); "
                                "train one with `alignuser train` or use --policy zero_shot")
    lm = load_lm(cfg.model, adapter=adapter)
    return Scorer(lm), lm.name


def build_runtimes(cfg: SimulateConfig, world: World, users: list[int], scorer: Any,
                   memory: Any) -> dict[str, AgentDeps]:
    reason_model = None
    if cfg.reason and scorer is not None:
        from agents.chat import LocalTextModel

        reason_model = LocalTextModel(scorer.lm)
    from agents.decide import Calibration

    # The checkpoint's validation-fitted offsets: simulate, evaluate and trace decide alike.
    calibration = Calibration.of_checkpoint(cfg.checkpoint) if cfg.policy == "aligned" else None
    chat = chat_policy(cfg) if cfg.policy == "chat" else None
    return {world.recommender(rec, reactive=cfg.reactive, seed=cfg.seed).name:
            make_runtime(world, rec, cfg.policy, scorer, memory, users=users,
                              seed=cfg.seed, temperature=cfg.temperature, reactive=cfg.reactive,
                              page_size=cfg.page_size, max_pages=cfg.pages,
                              reason_model=reason_model, calibration=calibration, chat=chat)
            for rec in cfg.recommenders}


def chat_policy(cfg: SimulateConfig) -> Any:
    """One ``ChatPolicy`` for every recommender's runtime: one model, one rate limit."""
    from agents.chat import chat_model
    from agents.chat_policy import ChatPolicy

    return ChatPolicy(chat_model(cfg.chat_model, rps=cfg.chat_rps), retries=cfg.chat_retries,
                      max_concurrency=cfg.chat_concurrency)


def simulate(cfg: SimulateConfig, output: str | Path | None = None,
             console: Console | None = None) -> Path:
    console = console or Console()
    check_options(cfg, output)
    t0 = time.perf_counter()
    if cfg.policy not in LLM_POLICIES and cfg.world_model == "on":
        cfg = cfg.model_copy(update={"world_model": "off"})
        console.print("[dim]world_model=off: the world model needs an LLM policy[/dim]")
    world = world_for(cfg.data)
    check_agents(cfg, world)
    users = world.sample_users(cfg.agents, cfg.seed)
    final = run_path(output, "simulate")
    with staged_run_dir(final, "simulate") as run_dir:  # named only once complete
        write_manifest(run_dir, "simulate", cfg.model_dump(mode="json"), dataset=world.ds.name,
                       split={"protocol": world.split.config.describe(),
                              **{p: world.split.fingerprint(p)
                                 for p in ("train", "valid", "test")}},
                       users=users,
                       recommender_specs={recommender_label(r): r for r in cfg.recommenders})
        scorer, model_name = load_scorer(cfg)
        memory = make_memory(cfg.memory, run_dir / "memory" if cfg.memory == "chroma" else None)
        runtimes = build_runtimes(cfg, world, users, scorer, memory)
        with open_checkpointer(run_dir) as saver:
            app = build_graph(cfg.memory, cfg.world_model, checkpointer=saver)
            sessions = run_population(app, runtimes, users)
        with (run_dir / "sessions.jsonl").open("w") as fh:
            for s in sessions:
                fh.write(json.dumps(s) + "\n")
        metrics = {"per_recommender": session_metrics(sessions), "wall_seconds":
                   round(time.perf_counter() - t0, 1), "model": model_name}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        update_manifest(run_dir, wall_seconds=metrics["wall_seconds"], model=model_name)
    console.print(metrics_table(metrics["per_recommender"], f"{cfg.policy} agents"))
    console.print(f"run directory: {final}  ({metrics['wall_seconds']} s)")
    return final


def metrics_table(per_rec: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    for col in ("recommender", "sessions", "watch ratio", "likes/page", "exit page",
                "mean rating", "satisfaction"):
        table.add_column(col, justify="right")
    for rec, m in per_rec.items():
        table.add_row(rec, str(m["sessions"]), f"{m['watch_ratio']:.3f}",
                      f"{m['likes_per_page']:.2f}", f"{m['exit_page']:.2f}",
                      f"{m['mean_rating']:.2f}", f"{m['satisfaction']:.1f}")
    return table
