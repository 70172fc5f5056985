"""The agent graph as LangGraph's own tools run it: dependencies from the run context (no runner),
node variants chosen per run, the process-wide builder, and `langgraph dev` driven through the
SDK the way LangGraph Studio drives it (run, step, history)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import ValidationError

from agents.world import World, load_world
from graph.build import POLICIES, make_runtime
from graph.context import AgentContext, DepsBuilder
from graph.graph import build_graph, graph
from graph.runner import run_agent

ROOT = Path(__file__).resolve().parent.parent
REC = "pop"
FAST = {"policy": "popularity", "memory": "none", "world_model": "off", "pages": 2}


@pytest.fixture(scope="module")
def world() -> World:
    return load_world()


@pytest.fixture(scope="module")
def user(world: World) -> int:
    return world.sample_users(1, seed=0)[0]


def _key(pages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(p["page"], p["items"], p["watched"], p["then"]) for p in pages]


def _stream(app: Any, inp: dict[str, Any], context: dict[str, Any],
            thread: str | None = None) -> list[tuple[str, dict]]:
    config = {"configurable": {"thread_id": thread}} if thread else None
    return [next(iter(chunk.items())) for chunk in app.stream(inp, config, context=context)]


# --- in process, as a LangGraph client sends it -----------------------------------------------

def test_context_and_input_schemas_are_plain_json() -> None:
    schema = graph.get_context_jsonschema()
    assert "deps" not in schema["properties"]  # in-process only, never in a client's form
    assert schema["properties"]["policy"]["enum"] == list(POLICIES)
    assert schema["properties"]["policy"]["default"] == "popularity"
    assert graph.get_input_jsonschema()["required"] == ["user", "recommender"]
    with pytest.raises(ValidationError, match="unknown policy 'oracle'"):
        AgentContext(policy="oracle")
    with pytest.raises(ValidationError):
        AgentContext(pages=0)


def test_exported_graph_runs_from_input_and_context(world: World, user: int) -> None:
    """Only ``{user, recommender}`` and a JSON context: the same session the runner produces."""
    final = graph.invoke({"user": user, "recommender": REC}, context=dict(FAST))
    assert final["agent_id"] == f"{REC}:{user}"
    assert 1 <= len(final["pages"]) <= 2 and final["end"] in ("exit", "max_pages")
    assert 1 <= final["satisfaction"] <= 10
    deps = make_runtime(world, REC, "popularity", max_pages=2)
    expected = run_agent(build_graph("none", "off"), deps, REC, user).json_form()
    assert _key(final["pages"]) == _key(expected["pages"])
    assert final["satisfaction"] == expected["satisfaction"]


def test_exported_graph_picks_node_variants_from_context(user: int, tmp_path: Path) -> None:
    inp = {"user": user, "recommender": REC}
    app = build_graph(checkpointer=InMemorySaver())
    for thread in ("first", "second"):  # a new thread is a new session: nothing from another
        chroma = _stream(app, inp, {**FAST, "memory": "chroma", "memory_dir": str(tmp_path)},
                         thread)
        recalls = [u["memories"] for n, u in chroma if n == "recall"]
        assert len(recalls) == 2, "the popularity agent should browse both pages"
        assert recalls[0] == [] and len(recalls[1]) == 1 and recalls[1][0].startswith("Page 1:")
    plain = _stream(graph, inp, dict(FAST))
    assert [u for n, u in plain if n == "recall"] == [{"memories": []}] * 2
    with pytest.raises(ValueError, match="world_model=off"):
        graph.invoke(inp, context={**FAST, "world_model": "on"})
    with pytest.raises(ValueError, match="no persona"):
        graph.invoke({"user": -1, "recommender": REC}, context=dict(FAST))


def test_a_chat_model_policy_from_the_context(user: int) -> None:
    ctx = {**FAST, "policy": "chat", "chat_model": "tests.fake_chat:factory"}
    final = graph.invoke({"user": user, "recommender": REC}, context=ctx)
    assert len(final["pages"]) == 2  # the fake watches [1] and goes on every page
    assert all(list(p["watched"].values()) == [4] for p in final["pages"])
    with pytest.raises(ValueError, match="policy chat needs context.chat_model"):
        graph.invoke({"user": user, "recommender": REC}, context={**FAST, "policy": "chat"})


def test_builder_loads_the_world_once_and_deps_per_setting(world: World) -> None:
    loads: list[str] = []

    def load(dataset: str) -> World:
        loads.append(dataset)
        return world

    builder = DepsBuilder(load)
    first = builder.deps(AgentContext(**FAST), REC)
    assert builder.deps(AgentContext(**FAST), REC) is first
    reseeded = builder.deps(AgentContext(**FAST, seed=3), REC)
    other_rec = builder.deps(AgentContext(**FAST), "itemknn")
    assert reseeded is not first and reseeded.seed == 3 and other_rec is not first
    assert first.max_pages == 2 and first.policy.name == "popularity"
    assert loads == ["ml-100k"]


# --- `langgraph dev`, driven through the SDK ----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _absolute_config(tmp: Path) -> Path:
    """The shipped langgraph.json with its paths made absolute, so the server can run in a
    scratch folder (it keeps its state in ``.langgraph_api/`` under the working directory)."""
    spec = json.loads((ROOT / "langgraph.json").read_text())
    spec["dependencies"] = [str((ROOT / d).resolve()) for d in spec["dependencies"]]
    spec["graphs"] = {name: str((ROOT / path).resolve()) + ":" + var
                      for name, ref in spec["graphs"].items()
                      for path, var in [ref.rsplit(":", 1)]}
    (tmp / "langgraph.json").write_text(json.dumps(spec))
    return tmp / "langgraph.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cli = Path(sys.executable).with_name("langgraph")
    assert cli.is_file(), "langgraph-cli[inmem] is missing: pip install -e '.[dev]'"
    tmp = tmp_path_factory.mktemp("langgraph-dev")
    config = _absolute_config(tmp)
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY", "LANGGRAPH_CLOUD_LICENSE_KEY")}
    env |= {"PYTHONPATH": str(ROOT), "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false",
            "LANGGRAPH_NO_VERSION_CHECK": "true", "ALIGNUSER_THREADS": "1"}
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(cli), "dev", "--config", str(config), "--host", "127.0.0.1",
                                 "--port", str(port), "--no-browser", "--no-reload"],
                                cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log, timeout=180)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"langgraph dev exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"langgraph dev not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_langgraph_dev_runs_and_steps_the_agent(server: str, user: int) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    (assistant,) = client.assistants.search(graph_id="agent")
    schemas = client.assistants.get_schemas(assistant["assistant_id"])
    assert schemas["input_schema"]["required"] == ["user", "recommender"]  # Studio's input form
    assert "deps" not in schemas["context_schema"]["properties"]

    inp = {"user": user, "recommender": REC}
    thread = client.threads.create()["thread_id"]
    final = client.runs.wait(thread, "agent", input=inp, context=dict(FAST))
    assert "pages" in final, final
    assert final["agent_id"] == f"{REC}:{user}" and final["end"] in ("exit", "max_pages")
    assert 1 <= len(final["pages"]) <= 2
    local = graph.invoke(inp, context=dict(FAST))  # the server ran the same agent
    assert final["pages"] == json.loads(json.dumps(local["pages"]))

    steps = [s["next"] for s in reversed(client.threads.get_history(thread, limit=100))]
    assert steps[0] == ["__start__"] and steps[1] == ["start"] and steps[-1] == []
    assert steps.count(["act"]) == len(final["pages"]) and steps[-2] == ["interview"]

    # Stepping as Studio does: an assistant holding the context, paused before each decision.
    stepper = client.assistants.create(graph_id="agent", context=dict(FAST))["assistant_id"]
    thread = client.threads.create()["thread_id"]
    client.runs.wait(thread, stepper, input=inp, interrupt_before=["decide"])
    paused = client.threads.get_state(thread)
    assert paused["next"] == ["decide"] and paused["values"]["page"] == 1
    assert "decision" not in paused["values"] and paused["values"]["page_text"]
    resumed = client.runs.wait(thread, stepper, input=None)
    assert resumed["pages"] == final["pages"]
