"""`alignuser trace RUN --from-step N`: branch a recorded agent into a run folder of its own.

The replay writes new checkpoints and memories; done in the recorded run it would change that
run's ``traces.sqlite`` and ``memory/`` for good. So the branch copies both into a new run
folder and replays there: the recorded run stays byte-identical, even when the replay fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from alignuser.config import SimulateConfig
from graph.trace import TRACE_FILE
from simulator.runs import run_path, staged_run_dir, write_manifest


def branch(run: Path, thread: str, manifest: dict[str, Any], cfg: SimulateConfig, step: int,
           policy: str | None, output: str | None) -> tuple[Path, list[dict[str, Any]]]:
    """Replay ``thread`` from checkpoint ``step`` into a new run folder; its folder and pages."""
    from alignuser.config import world_for
    from alignuser.simulate import build_runtimes, load_scorer
    from graph.graph import build_graph
    from graph.trace import history, open_checkpointer, replay_from
    from memory.store import make_memory

    if policy:
        cfg = cfg.model_copy(update={"policy": policy})
    final = run_path(output, "trace")
    with staged_run_dir(final, "trace") as out:
        for name in (TRACE_FILE, f"{TRACE_FILE}-wal"):
            if (run / name).exists():
                shutil.copy2(run / name, out / name)
        if cfg.memory == "chroma" and (run / "memory").is_dir():
            shutil.copytree(run / "memory", out / "memory")
        write_manifest(out, "trace", cfg.model_dump(mode="json"), source=str(run),
                       thread=thread, from_step=step, users=manifest["users"],
                       **{k: manifest[k] for k in ("dataset", "recommender_specs")
                          if k in manifest})
        with open_checkpointer(out) as saver:
            app = build_graph(cfg.memory, cfg.world_model, checkpointer=saver)
            n_steps = len(history(app, thread))
            if not 0 <= step < n_steps:  # refused before any data or model loads
                raise IndexError(f"--from-step {step}: {thread} has steps 0..{n_steps - 1}")
            world = world_for(cfg.data)
            scorer, _ = load_scorer(cfg)
            memory = make_memory(cfg.memory, out / "memory" if cfg.memory == "chroma" else None)
            rec = thread.rsplit(":", 1)[0]  # the recommender's shown name, then the user
            spec = manifest.get("recommender_specs", {}).get(rec, rec)
            deps = build_runtimes(cfg.model_copy(update={"recommenders": [spec]}), world,
                                  manifest["users"], scorer, memory)[rec]
            state = replay_from(app, thread, step, deps)
        pages = [{k: p[k] for k in ("page", "watched", "then")} for p in state["pages"]]
        (out / "branch.json").write_text(json.dumps(
            {"thread": thread, "from_step": step, "policy": cfg.policy, "pages": pages},
            indent=1))
    return final, pages
