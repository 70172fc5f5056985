"""The LangGraph agent end to end on ml-100k with a tiny random LM: valid actions, node swaps by
name, the baseline policies, checkpoints per super-step, replay, and the CLI around it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents import prompts, text
from agents.llm import tiny_lm
from agents.policy import FixedPolicy
from agents.scorer import Scorer
from agents.text import ItemView
from alignuser.config import SimulateConfig, World, load_world, make_policy
from alignuser.simulate import build_runtimes
from graph.deps import AgentDeps
from graph.graph import build_graph
from graph.runner import run_config, run_context, thread_id
from graph.trace import history, list_threads, open_checkpointer, replay_from
from memory.store import EpisodicMemory, NoMemory, make_memory
from simulator.env import Observation, recommender_pages
from simulator.policies import RandomPolicy
from simulator.trajectories import first_visits

REC = "pop"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world() -> World:
    return load_world()


@pytest.fixture(scope="module")
def users(world: World) -> list[int]:
    return world.sample_users(3, seed=0)


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(tiny_lm())


@dataclass
class RecordingScorer:
    """Delegates to a real scorer and keeps every call, to see which prompts were scored."""

    inner: Scorer
    calls: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    @property
    def lm(self) -> Any:
        return self.inner.lm

    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        self.calls.append((prefix, list(options)))
        return self.inner.score(prefix, options)

    def world_model_requests(self) -> list[list[tuple[str, str]]]:
        """The options of every scorer call that asks the world model (one per predicted page:
        every slot's five rating endings in one call)."""
        return [list(opts) for prefix, opts in self.calls
                if prompts.NEXT_STATE in prefix or any(prompts.NEXT_STATE in ctx
                                                       for ctx, _ in opts)]

    def world_model_calls(self) -> int:
        return len(self.world_model_requests())


def _runtime(world: World, policy: Any, scorer: Any = None,
             memory: EpisodicMemory | None = None, max_pages: int = 5) -> AgentDeps:
    return AgentDeps(perceiver=world.perceiver, histories=world.histories,
                     personas=world.personas,
                     pages=recommender_pages(world.recommender(REC).rank), policy=policy,
                     scorer=scorer, memory=memory or NoMemory(), max_pages=max_pages, seed=0)


def _stream(app: Any, rt: AgentDeps, user: int) -> tuple[list[str], list[dict[str, Any]], dict]:
    """Run one agent; the node names in execution order, their updates, and the final state."""
    thread = thread_id(REC, user)
    cfg = run_config(rt, thread)
    nodes, updates, final = [], [], {}
    for mode, chunk in app.stream({"agent_id": thread, "user": user, "recommender": REC}, cfg,
                                  context=run_context(rt), stream_mode=["updates", "values"]):
        if mode == "values":
            final = chunk
            continue
        ((name, update),) = chunk.items()
        nodes.append(name)
        updates.append(update or {})
    return nodes, updates, final


def _of(nodes: list[str], updates: list[dict], node: str) -> list[dict]:
    return [u for n, u in zip(nodes, updates, strict=True) if n == node]


def _assert_valid_session(world: World, user: int, pages: list[dict], max_pages: int) -> None:
    assert 1 <= len(pages) <= max_pages
    assert [p["page"] for p in pages] == list(range(1, len(pages) + 1))
    shown = [i for p in pages for i in p["items"]]
    assert len(shown) == len(set(shown))
    assert not set(shown) & set(world.histories[user])  # the recommender masks the history
    for p in pages:
        assert len(p["items"]) == 4
        watched = {int(i): r for i, r in p["watched"].items()}
        assert set(watched) <= set(p["items"]), p
        assert all(isinstance(r, int) and 1 <= r <= 5 for r in watched.values())
        assert p["then"] in ("next", "exit")
    assert all(p["then"] == "next" for p in pages[:-1])
    assert pages[-1]["then"] == "exit" or len(pages) == max_pages


# --- the LLM agent end to end, traced -----------------------------------------------------------

@dataclass
class TracedRun:
    app: Any
    runtime: AgentDeps
    scorer: RecordingScorer
    memory: Any
    runs: dict[int, tuple[list[str], list[dict], dict]]
    snapshots: dict[int, list[Any]]


@pytest.fixture(scope="module")
def traced(world: World, users: list[int], scorer: Scorer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedRun]:
    tmp = tmp_path_factory.mktemp("traced")
    recording = RecordingScorer(scorer)
    memory = make_memory("chroma", tmp / "memory")
    rt = _runtime(world, make_policy("zero_shot", world, recording), recording, memory)
    with open_checkpointer(tmp) as saver:
        app = build_graph("chroma", "on", checkpointer=saver)
        runs = {u: _stream(app, rt, u) for u in users}
        snaps = {u: history(app, thread_id(REC, u)) for u in users}
        yield TracedRun(app, rt, recording, memory, runs, snaps)


def test_llm_agent_actions_are_valid(traced: TracedRun, world: World, users: list[int]) -> None:
    for user in users:
        nodes, updates, final = traced.runs[user]
        _assert_valid_session(world, user, final["pages"], max_pages=5)
        assert final["end"] in ("exit", "max_pages")
        assert nodes[0] == "start" and nodes[-1] == "interview"
        assert nodes.count("act") == len(final["pages"])
        assert 1 <= final["satisfaction"] <= 10
        for d in _of(nodes, updates, "decide"):
            scores = d["decision"]["watch_scores"]
            assert len(scores) == 4 and all(np.isfinite(v) for v in scores.values())
        assert final["persona_text"] == world.personas[user]


def test_world_model_on_predicts_every_page(traced: TracedRun, users: list[int]) -> None:
    slots = pages = 0
    for user in users:
        nodes, updates, _ = traced.runs[user]
        for u in _of(nodes, updates, "predict"):
            preds = u["predictions"]
            assert sorted(int(k) for k in preds) == [1, 2, 3, 4]
            assert all(1.0 <= v <= 5.0 for v in preds.values())
            slots += len(preds)
            pages += 1
    # One batched world-model call per page, holding all five rating endings of every slot.
    requests = traced.scorer.world_model_requests()
    assert pages and len(requests) == pages
    assert all(len(opts) == 5 * 4 for opts in requests) and 5 * slots == sum(map(len, requests))
    policy_prefixes = [ctx for _, opts in traced.scorer.calls for ctx, _ in opts
                       if ctx.startswith("You expect to rate:")]
    assert policy_prefixes  # the policy saw the predictions


def test_each_slot_is_decided_after_its_own_cue(traced: TracedRun, users: list[int]) -> None:
    """A slot's watch/skip line follows a line restating that item's own numbers and the
    world model's expectation for it, so the answer sits next to its evidence."""
    cues = {text.item_cue(ItemView(**v)) for u in users
            for r in _of(*traced.runs[u][:2], "recall") for v in r["views"]}
    assert any(": match " in c for c in cues)  # the sampled users have personal evidence
    decided = 0
    for _, opts in traced.scorer.calls:
        for ctx, line in opts:
            m = re.fullmatch(r"\[(\d)\] (watch|skip)\n", line)
            if not m:
                continue
            last = ctx.splitlines()[-1]
            slot_cue, _, expected = last.partition("; you expect to rate ")
            assert slot_cue.startswith(f"[{m.group(1)}] ") and expected
            assert slot_cue[len(m.group(1)) + 3:] in cues
            decided += 1
    assert decided and decided % 2 == 0


def test_memory_and_evidence_are_used(traced: TracedRun, users: list[int]) -> None:
    longest = max(users, key=lambda u: len(traced.runs[u][2]["pages"]))
    nodes, updates, final = traced.runs[longest]
    assert len(final["pages"]) >= 2, "no multi-page session among the sampled users"
    recalls = _of(nodes, updates, "recall")
    assert recalls[0]["memories"] == []  # nothing acted on before page 1
    for page, r in enumerate(recalls[1:], 2):
        assert len(r["memories"]) == min(page - 1, 3)  # every earlier page, up to k
        assert all(m.startswith("Page ") for m in r["memories"])
        assert not any(m.startswith(f"Page {page}:") for m in r["memories"])
    assert any(v["evidence"] for r in recalls for v in r["views"])
    for user in users:
        thread = thread_id(REC, user)
        assert traced.memory.count(thread) == len(traced.runs[user][2]["pages"])


def test_one_checkpoint_per_super_step(traced: TracedRun, users: list[int]) -> None:
    for user in users:
        nodes, _, final = traced.runs[user]
        snaps = traced.snapshots[user]
        meta = [s.metadata for s in snaps]
        # An input checkpoint, then one per super-step: the input being applied (step 0) and
        # each node execution (one node per super-step in this graph).
        assert [m["source"] for m in meta] == ["input"] + ["loop"] * (len(nodes) + 1)
        assert [m["step"] for m in meta] == list(range(-1, len(nodes) + 1))
        assert len(snaps) == len(nodes) + 2
        # The node due after each loop checkpoint is the node that ran next.
        assert [s.next[0] for s in snaps[1:-1]] == nodes
        assert snaps[-1].next == () and snaps[-1].values["pages"] == final["pages"]


def test_replay_from_mid_session_reproduces_the_session(traced: TracedRun,
                                                        users: list[int]) -> None:
    user = max(users, key=lambda u: len(traced.runs[u][2]["pages"]))
    thread = thread_id(REC, user)
    snaps = traced.snapshots[user]
    final = traced.runs[user][2]
    step = next(i for i, s in enumerate(snaps)
                if s.next == ("perceive",) and s.values.get("page") == 2)
    replayed = replay_from(traced.app, thread, step, traced.runtime)

    def key(pages: list[dict]) -> list[tuple]:
        return [(p["page"], p["items"], p["watched"], p["then"]) for p in pages]

    assert key(replayed["pages"]) == key(final["pages"])
    assert replayed["satisfaction"] == final["satisfaction"]
    # Step by step the replay perceived what the original did: the same memories and page text.
    after = history(traced.app, thread)[len(snaps):]
    assert after, "the replay wrote no checkpoints"

    def texts(seq: list[Any]) -> dict[int, tuple[str, list[str]]]:
        return {s.values["page"]: (s.values["page_text"], s.values.get("memories"))
                for s in seq if s.next == ("decide",)}

    again = texts(after)
    assert sorted(again) == list(range(2, len(final["pages"]) + 1))
    original = texts(snaps)
    for page, got in again.items():
        assert got == original[page]
    assert traced.memory.count(thread) == len(final["pages"])  # re-run pages were not duplicated
    with pytest.raises(IndexError):
        replay_from(traced.app, thread, 10_000, traced.runtime)


# --- registry swaps -----------------------------------------------------------------------------

def test_world_model_off_makes_no_predictions(world: World, users: list[int],
                                              scorer: Scorer) -> None:
    recording = RecordingScorer(scorer)
    rt = _runtime(world, make_policy("zero_shot", world, recording), recording)
    nodes, updates, final = _stream(build_graph("none", "off"), rt, users[0])
    _assert_valid_session(world, users[0], final["pages"], 5)
    assert all(u["predictions"] == {} for u in _of(nodes, updates, "predict"))
    assert final["predictions"] == {}
    assert recording.calls and recording.world_model_calls() == 0
    assert not any("You expect to rate" in ctx for _, opts in recording.calls for ctx, _ in opts)
    # The same runtime with the world model on does call it.
    nodes_on, updates_on, _ = _stream(build_graph("none", "on"), rt, users[0])
    predicted = [u["predictions"] for u in _of(nodes_on, updates_on, "predict")]
    assert recording.world_model_calls() == len(predicted) > 0  # one call per page
    assert all(len(p) == 4 for p in predicted)


def test_the_predict_node_asks_after_each_slots_rating_cue(world: World, users: list[int],
                                                           scorer: Scorer) -> None:
    """A world model trained with ``wm_rating_cue`` is asked each slot's rating after that
    slot's rating cue, in the graph as in ``agents.decide`` (tests/test_decisions.py)."""
    from dataclasses import replace

    from graph.build import make_runtime

    recording = RecordingScorer(scorer)
    assert not _runtime(world, make_policy("zero_shot", world, recording), recording).wm_rating_cue
    rt = replace(_runtime(world, make_policy("zero_shot", world, recording), recording),
                 wm_rating_cue=True)
    nodes, updates, _ = _stream(build_graph("none", "on"), rt, users[0])
    views = [[ItemView(**v) for v in u["views"]] for u in _of(nodes, updates, "perceive")]
    requests = recording.world_model_requests()
    assert len(requests) == len(views) > 0
    for page, opts in zip(views, requests, strict=True):
        for slot, view in enumerate(page, 1):
            ctx = opts[5 * slot - 5][0]
            assert ctx.endswith(text.cue_line(slot, text.rating_cue(view))
                                + text.rating_stem(slot))
    from agents.decide import Calibration

    cued = make_runtime(world, "pop", "zero_shot", recording,
                        calibration=Calibration(wm_rating_cue=True))
    assert cued.wm_rating_cue and not make_runtime(world, "pop", "zero_shot", recording,
                                                   calibration=Calibration()).wm_rating_cue


def test_world_model_on_without_a_scorer_is_refused(world: World, users: list[int]) -> None:
    rt = _runtime(world, make_policy("random", world))
    with pytest.raises(ValueError, match="world_model=off"):
        _stream(build_graph("none", "on"), rt, users[0])


@pytest.mark.parametrize("kind", ["chroma", "none"])
def test_memory_variants(kind: str, world: World, users: list[int], tmp_path: Path) -> None:
    never_exits = FixedPolicy(RandomPolicy(seed=1, p_exit=0.0), "random")
    memory = make_memory(kind, tmp_path / "memory" if kind == "chroma" else None)
    rt = _runtime(world, never_exits, memory=memory, max_pages=3)
    nodes, updates, final = _stream(build_graph(kind, "off"), rt, users[0])
    assert len(final["pages"]) == 3 and final["end"] == "max_pages"
    recalls = _of(nodes, updates, "recall")
    perceived = [v for u in _of(nodes, updates, "perceive") for v in u["views"]]
    assert perceived and all(v["evidence"] == [] for v in perceived)  # perception: public facts
    if kind == "chroma":
        assert [len(r["memories"]) for r in recalls] == [0, 1, 2]
        assert all(r["views"][0]["evidence"] for r in recalls)
        assert all(v["match"] is not None for r in recalls for v in r["views"])
        assert "of its 20 closest" in final["page_text"]
        assert recalls[2]["memories"][0].startswith(("Page 1:", "Page 2:"))
        assert "You remember: " in final["page_text"]
        assert memory.count(thread_id(REC, users[0])) == 3
    else:
        assert recalls == [{"memories": []}] * 3  # no evidence added, nothing recalled
        assert "You remember" not in final["page_text"]
        # Public facts only: no personal line (evidence, match) on any item.
        assert "like what you rated" not in final["page_text"]
        assert "of its 20 closest" not in final["page_text"]


def test_unknown_variant_names_raise() -> None:
    with pytest.raises(ValueError, match="unknown memory variant 'faiss'"):
        build_graph(memory="faiss")
    with pytest.raises(ValueError, match="unknown world_model variant 'maybe'"):
        build_graph(world_model="maybe")


def test_unknown_or_unsatisfied_policies_raise(world: World) -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("oracle", world)
    with pytest.raises(ValueError, match="language model"):
        make_policy("zero_shot", world, None)
    with pytest.raises(ValueError, match="trajectories"):
        make_policy("human_replay", world)
    with pytest.raises(ValueError):
        SimulateConfig(policy="oracle")


# --- baseline policies --------------------------------------------------------------------------

def test_random_policy_actions(world: World, users: list[int]) -> None:
    rt = _runtime(world, make_policy("random", world, seed=3))
    app = build_graph("none", "off")
    expected_policy = RandomPolicy(seed=3)
    for user in users[:2]:
        _, _, final = _stream(app, rt, user)
        _assert_valid_session(world, user, final["pages"], 5)
        for p in final["pages"]:
            want = expected_policy.act(Observation(user=user, page=p["page"], items=p["items"]))
            assert {int(i): r for i, r in p["watched"].items()} == want.watched
            assert p["then"] == want.then


def test_popularity_policy_actions(world: World, users: list[int]) -> None:
    train = world.split.train
    counts = train["item"].value_counts()
    threshold = float(np.quantile(counts.to_numpy(), 0.9))
    means = train.groupby("item")["rating"].mean()
    rt = _runtime(world, make_policy("popularity", world))
    app = build_graph("none", "off")
    watched_any = False
    for user in users[:2]:
        _, _, final = _stream(app, rt, user)
        _assert_valid_session(world, user, final["pages"], 5)
        for p in final["pages"]:
            want = {i: int(min(5, max(1, round(means[i])))) for i in p["items"]
                    if counts.get(i, 0) >= threshold}
            assert {int(i): r for i, r in p["watched"].items()} == want
            assert p["then"] == ("next" if want else "exit")
            watched_any |= bool(want)
    assert watched_any  # pop pages start with the most popular items


def test_human_replay_reproduces_logged_pages(world: World) -> None:
    cfg = SimulateConfig(policy="human_replay", recommenders=["itemknn"], agents=3,
                         world_model="off", memory="none")
    users = world.sample_users(cfg.agents, cfg.seed)
    rt = build_runtimes(cfg, world, users, None, NoMemory())["itemknn"]
    logged = first_visits(world.trajectories("test", "itemknn", users=users, progress=False))
    assert sorted(logged) == users
    app = build_graph("none", "off")
    for user in users:
        thread = thread_id("itemknn", user)
        final = app.invoke({"agent_id": thread, "user": user, "recommender": "itemknn"},
                           run_config(rt, thread), context=run_context(rt))
        steps = logged[user].steps
        assert [(p["page"], p["items"], {int(i): r for i, r in p["watched"].items()}, p["then"])
                for p in final["pages"]] == [(s.page, s.items, s.watched, s.then) for s in steps]
        assert final["end"] == logged[user].end  # a visit cut by the page limit says next
        for p, s in zip(final["pages"], steps, strict=True):  # the human action travels along
            assert p["human"] == {"watched": {str(i): r for i, r in s.watched.items()},
                                  "then": s.then}


# --- command line -------------------------------------------------------------------------------

def test_cli_simulate_then_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alignuser.cli import main

    run = tmp_path / "run"
    assert main(["simulate", "--policy", "random", "--agents", "2", "--recommenders", "pop",
                 "--output", str(run)]) == 0
    for name in ("manifest.json", "sessions.jsonl", "metrics.json", "traces.sqlite"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["policy"] == "random" and len(manifest["users"]) == 2
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert sorted(s["user"] for s in sessions) == manifest["users"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["per_recommender"]["pop"]["sessions"] == 2
    assert list_threads(run) == sorted(f"pop:{u}" for u in manifest["users"])

    capsys.readouterr()
    assert main(["trace", str(run), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "checkpoints" in out and "step 4" not in out

    assert main(["trace", str(tmp_path / "missing")]) == 2
    assert main(["trace", str(run), "nobody:1"]) == 2
    assert main(["trace", str(run), "--step", "10000"]) == 2


def test_the_last_allowed_page_is_marked_for_the_policy(world: World, users: list[int]) -> None:
    """The decide node tells the policy which page is the visit's last allowed one: next/exit
    there gets its own calibrated offset (``agents.decide.Calibration.last_then_offset``)."""
    seen: list[tuple[int, bool]] = []

    class Recording(FixedPolicy):
        def decide(self, inp):  # noqa: ANN001, ANN202
            seen.append((inp.page, inp.last))
            return super().decide(inp)

    policy = Recording(RandomPolicy(seed=1, p_exit=0.0), "random")
    _, _, final = _stream(build_graph("none", "off"), _runtime(world, policy, max_pages=3),
                          users[0])
    assert len(final["pages"]) == 3
    assert seen == [(1, False), (2, False), (3, True)]
