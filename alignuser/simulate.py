"""`alignuser simulate`: a population of agents browses each recommender; one run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from alignuser.checks import check_adapter
from alignuser.config import LLM_POLICIES, SimulateConfig, World, world_for
from evaluation.macro import per_user_outcome, satisfaction_link
from evaluation.metrics import best_choice
from evaluation.plots import plot_session_outcomes
from evaluation.report import png_bytes
from graph.build import policy_scorer
from graph.context import settings_deps
from graph.deps import AgentDeps
from graph.graph import build_graph
from graph.runner import run_population, session_metrics, thread_id
from graph.trace import open_checkpointer
from memory.store import make_memory
from simulator.custom import recommender_label
from simulator.runs import (
    check_run_dir,
    check_unfinished,
    discard_unfinished,
    resume_target,
    run_path,
    staged_run_dir,
    staging_dirs,
    update_manifest,
    write_atomic,
    write_manifest,
)
from simulator.sessions import SessionLog, SessionRecord

PARTIAL = "sessions.partial.jsonl"
"""Sessions committed while a run is in progress; a resumed run keeps them."""


def check_options(cfg: SimulateConfig, output: str | Path | None, *, resume: bool = False,
                  overwrite: bool = False) -> None:
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
    path = None if output is None else Path(output).expanduser()
    if resume:
        resume_target(output, "simulate")
        return
    if path is not None and not overwrite:
        if path.is_dir() and any(path.iterdir()):
            raise FileExistsError(f"run directory {output} is not empty; pass another --output, "
                                  "or --overwrite to replace the run there once the new one "
                                  "completes")
        check_unfinished(output, "simulate")
    if not (overwrite and path is not None and path.is_dir()):
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
    from agents.batching import BatchingScorer
    from graph.engine import LLM_CONCURRENCY

    # Agents in flight share one scorer whose calls meet in lockstep batches; the prefix cache
    # holds every in-flight agent's page prefix between its world-model and decision calls.
    flight = cfg.concurrency or LLM_CONCURRENCY
    scorer = policy_scorer(cfg.policy, cfg.model, cfg.checkpoint, device=cfg.device,
                           hint="pass --checkpoint DIR (train one with `alignuser train`) or "
                           "use --policy zero_shot", cache_size=max(16, 2 * flight))
    return BatchingScorer(scorer), scorer.lm.name


def build_runtimes(cfg: SimulateConfig, world: World, users: list[int], scorer: Any,
                   memory: Any) -> dict[str, AgentDeps]:
    chat = chat_policy(cfg) if cfg.policy == "chat" else None
    return {world.recommender(rec, reactive=cfg.reactive, seed=cfg.seed).name:
            settings_deps(world, rec, cfg, cfg.policy, scorer, memory, chat=chat, users=users)
            for rec in cfg.recommenders}


def chat_policy(cfg: SimulateConfig) -> Any:
    """One ``ChatPolicy`` for every recommender's runtime: one model, one rate limit."""
    from agents.chat import chat_model
    from agents.chat_policy import ChatPolicy

    return ChatPolicy(chat_model(cfg.chat_model, rps=cfg.chat_rps), retries=cfg.chat_retries,
                      max_concurrency=cfg.chat_concurrency)


def simulate(cfg: SimulateConfig, output: str | Path | None = None,
             console: Console | None = None, *, resume: bool = False,
             overwrite: bool = False) -> Path:
    """Run the population into a staged run folder, committing each session as it ends.

    ``resume=True`` continues the killed run ``output`` (its path or run id) in its staged folder:
    committed sessions are kept, the other agents run again from a clean thread and memory, so
    the result equals an uninterrupted run. ``overwrite=True`` replaces an existing run at
    ``output`` once the new one is complete."""
    console = console or Console()
    check_options(cfg, output, resume=resume, overwrite=overwrite)
    t0 = time.perf_counter()
    if cfg.policy not in LLM_POLICIES and cfg.world_model == "on":
        cfg = cfg.model_copy(update={"world_model": "off"})
        console.print("[dim]world_model=off: the world model needs an LLM policy[/dim]")
    world = world_for(cfg.data)
    check_agents(cfg, world)
    users = world.sample_users(cfg.agents, cfg.seed)
    if resume:
        final = resume_target(output, "simulate")
    elif overwrite and output is not None:
        final = Path(output).expanduser()
        discard_unfinished(final)
    else:
        final = run_path(output, "simulate")
    log_of = lambda folder: SessionLog(folder / PARTIAL)  # noqa: E731
    with staged_run_dir(final, "simulate", resume=resume, overwrite=overwrite,
                        keep_if=lambda folder: log_of(folder).has_commits()) as run_dir:
        log = log_of(run_dir)
        if resume:
            finished = resumed_sessions(run_dir, cfg, users, log)
            console.print(f"resuming {final}: {len(finished)} of "
                          f"{len(cfg.recommenders) * len(users)} sessions already done")
        else:
            finished = {}
            write_manifest(run_dir, "simulate", cfg.model_dump(mode="json"),
                           dataset=world.ds.name,
                           split={"protocol": world.split.config.describe(),
                                  **{p: world.split.fingerprint(p)
                                     for p in ("train", "valid", "test")}},
                           users=users,
                           recommender_specs={recommender_label(r): r for r in cfg.recommenders})
        sessions, model_name, scorer = run_sessions(cfg, world, users, run_dir, finished,
                                                    log.commit)
        write_atomic(run_dir / "sessions.jsonl", "".join(s.line() + "\n" for s in sessions))
        metrics = {"per_recommender": session_metrics(sessions), "wall_seconds":
                   round(time.perf_counter() - t0, 1), "model": model_name}
        if (choice := ship_choice(sessions, cfg.seed)) is not None:
            metrics["would_ship"] = choice
        if (link := satisfaction_link(sessions, cfg.seed)) is not None:
            metrics["satisfaction_vs_likes"] = link
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_atomic(run_dir / "sessions_by_recommender.png", png_bytes(plot_session_outcomes(
            [{"recommender": rec, **m, "pages_per_session": m["exit_page"]}
             for rec, m in metrics["per_recommender"].items()])))
        cost = scoring_cost(scorer, [s for s in sessions
                                     if thread_id(s.recommender, s.user) not in finished])
        update_manifest(run_dir, wall_seconds=metrics["wall_seconds"], model=model_name,
                        scoring=cost)
        log.path.unlink(missing_ok=True)
    console.print(metrics_table(metrics["per_recommender"], f"{cfg.policy} agents"))
    if "would_ship" in metrics:
        console.print(ship_line(metrics["would_ship"]))
    if "satisfaction_vs_likes" in metrics:
        link = metrics["satisfaction_vs_likes"]
        console.print(f"satisfaction vs likes per page over {link['n']:,} sessions: Spearman "
                      f"{link['rho']:.2f} [{link['ci'][0]:.2f}, {link['ci'][1]:.2f}]")
    if cost is not None:
        console.print(f"scored {cost['token_positions']:,} token positions in "
                      f"{cost['forwards']:,} forwards for {cost['pages']:,} pages "
                      f"({cost['token_positions_per_page']:,.0f} and "
                      f"{cost['forwards_per_page']:.1f} a page)"
                      + (f"; {cost['lockstep']['requests']:,} scorer requests in "
                         f"{cost['lockstep']['batches']:,} lockstep batches"
                         if "lockstep" in cost else ""))
    console.print(f"run directory: {final}  ({metrics['wall_seconds']} s)")
    return final


def run_sessions(cfg: SimulateConfig, world: World, users: list[int], run_dir: Path,
                 finished: dict[str, SessionRecord], commit: Callable[[SessionRecord], None]
                 ) -> tuple[list[SessionRecord], str | None, Any]:
    """Every session in job order, on the configured backend, with the model's name and the
    scorer whose counters say what the sessions cost (on Ray the actors' counters summed; None
    without an LLM); new sessions are committed as they end. Unfinished agents' traces and
    memories are cleared first, so they start afresh."""
    if cfg.backend == "ray":
        from alignuser.ray_backend import run_on_ray

        return run_on_ray(cfg, users, run_dir, finished, commit)
    scorer, model_name = load_scorer(cfg)
    memory = make_memory(cfg.memory, run_dir / "memory" if cfg.memory == "chroma" else None)
    runtimes = build_runtimes(cfg, world, users, scorer, memory)
    with open_checkpointer(run_dir) as saver:
        for rec in runtimes:
            for user in users:
                if thread_id(rec, user) not in finished:
                    saver.delete_thread(thread_id(rec, user))
                    memory.reset(thread_id(rec, user))
        app = build_graph(cfg.memory, cfg.world_model, checkpointer=saver)
        sessions = run_population(app, runtimes, users, concurrency=cfg.concurrency,
                                  finished=finished, on_done=commit)
    return sessions, model_name, scorer


def scoring_cost(scorer: Any, sessions: list[SessionRecord]) -> dict[str, Any] | None:
    """What this process's sessions cost the model: forwards and token positions pushed (the
    compute-bound part on a CPU), in all and per page; None without a local LLM scorer."""
    stats = getattr(scorer, "stats", None)
    if stats is None:
        return None
    pages = sum(len(s.pages) for s in sessions)
    cost = {"forwards": stats.forwards, "token_positions": stats.tokens, "pages": pages,
            "forwards_per_page": stats.forwards / pages if pages else 0.0,
            "token_positions_per_page": stats.tokens / pages if pages else 0.0,
            "note": "sessions run by this process (a resumed run's earlier ones not counted)"}
    batches = getattr(scorer, "batches", None)  # agents.batching.BatchStats
    if batches is not None:
        cost["lockstep"] = {"batches": batches.flushes, "requests": batches.requests,
                            "flushed_before_every_agent_waited": batches.timeouts}
    return cost


def recorded_config(run: str | Path) -> dict[str, Any]:
    """The config a killed simulate run recorded in its staged manifest (for ``--resume``)."""
    staged = staging_dirs(resume_target(run, "simulate"))[0]
    manifest = _manifest(staged)
    if manifest.get("kind") != "simulate" or "config" not in manifest:
        raise ValueError(f"--resume {run}: {staged} is not a simulate run (its manifest is "
                         f"{'missing' if not manifest else 'a ' + str(manifest.get('kind'))})")
    return manifest["config"]


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):  # killed before its manifest was written, or mid-write
        return {}
    return data if isinstance(data, dict) else {}


def resumed_sessions(run_dir: Path, cfg: SimulateConfig, users: list[int],
                     log: SessionLog) -> dict[str, SessionRecord]:
    """The sessions a killed run committed, once its manifest is checked against ``cfg``."""
    manifest = _manifest(run_dir)
    if manifest.get("config") != cfg.model_dump(mode="json"):
        raise ValueError(f"--resume: {run_dir} recorded another config; resume it with the "
                         "config in its manifest.json")
    if manifest.get("users") != users:
        raise ValueError(f"--resume: {run_dir} sampled other users than this data gives "
                         f"({manifest.get('users')} vs {users}); has the dataset changed?")
    return log.read()


def metrics_table(per_rec: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    for col in ("recommender", "sessions", "watch ratio", "likes/page", "exit page",
                "mean rating", "satisfaction"):
        table.add_column(col, justify="right")
    for rec, m in per_rec.items():
        table.add_row(rec, str(m["sessions"]), f"{m['watch_ratio']:.3f}",
                      f"{m['likes_per_page']:.2f}", f"{m['exit_page']:.2f}",
                      f"{m['mean_rating']:.2f}", f"{m['satisfaction']:.2f}")
    return table


def ship_choice(sessions: list[SessionRecord], seed: int) -> dict[str, Any] | None:
    """The recommender this population would ship on likes per page, with the CI of its mean,
    its lead over the runner-up (the same agents browse every recommender, so paired) and how
    often it stays first when the agents are resampled, as ``alignuser evaluate``'s report
    opens; None with one recommender or fewer than 2 agents."""
    per_user = per_user_outcome([s.json_form() for s in sessions])
    if per_user.shape[1] < 2 or len(per_user) < 2:
        return None
    return best_choice(per_user, seed=seed)


def ship_line(choice: dict[str, Any]) -> str:
    lo, hi = choice["ci"]
    lead_lo, lead_hi = choice["lead_ci"]
    return (f"would ship {choice['recommender']}: likes/page {choice['mean']:.2f} "
            f"[{lo:.2f}, {hi:.2f}] (mean over agents), {choice['lead']:+.2f} "
            f"[{lead_lo:+.2f}, {lead_hi:+.2f}] over "
            f"{choice['runner_up']}, first in {choice['p_first']:.0%} of resamples of the "
            f"{choice['n_users']} agents (95% bootstrap CIs)")
