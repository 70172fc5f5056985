"""Stepping through and replaying an agent's recorded super-steps."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver

from graph.deps import AgentDeps
from graph.runner import recursion_limit, run_context

TRACE_FILE = "traces.sqlite"


@contextmanager
def open_checkpointer(run_dir: Path) -> Iterator[SqliteSaver]:
    conn = sqlite3.connect(str(Path(run_dir) / TRACE_FILE), check_same_thread=False)
    try:
        yield SqliteSaver(conn)
    finally:
        conn.close()


def list_threads(run_dir: Path) -> list[str]:
    path = Path(run_dir) / TRACE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {TRACE_FILE}: not a simulation run directory")
    with sqlite3.connect(str(path)) as conn:
        rows = conn.execute("SELECT DISTINCT thread_id FROM checkpoints").fetchall()
    return sorted(r[0] for r in rows)


def history(app: Any, thread: str) -> list[Any]:
    """Every checkpoint of a thread, oldest first (one per super-step)."""
    snaps = list(app.get_state_history({"configurable": {"thread_id": thread}}))
    return list(reversed(snaps))


SHOWN = ("page", "items", "page_text", "memories", "predictions", "decision", "human_action",
         "satisfaction", "interview", "end")


def describe(snapshot: Any, index: int) -> dict[str, Any]:
    """One checkpoint: the node that runs next, and the state fields a person debugs with."""
    values = snapshot.values or {}
    return {"step": index, "source": (snapshot.metadata or {}).get("source"),
            "next": list(snapshot.next), "state": {k: values[k] for k in SHOWN if k in values}}


def render(step: dict[str, Any]) -> str:
    head = f"step {step['step']}  next: {', '.join(step['next']) or 'END'}"
    body = []
    for key, val in step["state"].items():
        text = val if isinstance(val, str) else json.dumps(val, default=str)
        body.append(f"  {key}: {text.rstrip()}" if "\n" not in text
                    else f"  {key}:\n    " + text.rstrip().replace("\n", "\n    "))
    return "\n".join([head, *body])


def replay_from(app: Any, thread: str, step: int, deps: AgentDeps) -> dict[str, Any]:
    """Re-run a thread from checkpoint ``step`` (e.g. with another policy in ``deps``)."""
    snaps = history(app, thread)
    if not 0 <= step < len(snaps):
        raise IndexError(f"thread {thread} has steps 0..{len(snaps) - 1}, not {step}")
    cfg = {**snaps[step].config, "recursion_limit": recursion_limit(deps.max_pages)}
    return app.invoke(None, cfg, context=run_context(deps))
