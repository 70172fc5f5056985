"""Faster populations: lockstep batching across agents, merged LoRA weights, the device flag and
the progress bar. Batching and merging are speed-ups only: the same seed gives the same
trajectories, and scores agree within float round-off."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.batching import BatchingScorer
from agents.llm import LM, load_lm, tiny_lm
from agents.scorer import Scorer
from alignuser.cli import build_parser, simulate_config
from alignuser.config import SimulateConfig, World
from alignuser.simulate import build_runtimes
from graph import engine
from graph.graph import build_graph
from graph.runner import run_population
from memory.store import NoMemory

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFIX = "You are a 30-year-old engineer who likes Sci-Fi.\nPage 1:\n[1] Alien (1979)\n"
REQUESTS = [(PREFIX + f"[2] Movie {k}\n" * k, [("Answer: ", "watch"), ("Answer: ", "skip"),
                                               ("", f"[{k}] rated 4")]) for k in range(1, 7)]
# Padded batched forwards sum in another order than one request alone: fp32 round-off only.
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def lm() -> LM:
    return tiny_lm(seed=1)


def test_batching_scorer_merges_concurrent_callers(lm: LM) -> None:
    alone = [Scorer(lm).score_many([r])[0] for r in REQUESTS]
    batcher = BatchingScorer(Scorer(lm), max_wait=5.0)  # only "everyone waits" may flush
    got: dict[int, list[float]] = {}
    batcher.enter(len(REQUESTS))

    def call(k: int) -> None:
        try:
            got[k] = batcher.score(*REQUESTS[k])
        finally:
            batcher.leave()

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert batcher.batches.flushes == 1 and batcher.batches.requests == len(REQUESTS)
    assert batcher.batches.timeouts == 0
    for k, scores in enumerate(alone):
        assert got[k] == pytest.approx(scores, abs=SCORE_TOL)


def test_batching_scorer_alone_and_errors(lm: LM) -> None:
    batcher = BatchingScorer(Scorer(lm))
    got, want = batcher.score_many(REQUESTS[:2]), Scorer(lm).score_many(REQUESTS[:2])
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=SCORE_TOL)
    assert batcher.batches.flushes == 1  # no participants: flushed at once, no waiting
    with pytest.raises(ValueError, match="empty target"):
        batcher.score(PREFIX, [("ctx", "")])
    assert batcher.score(*REQUESTS[0]) == pytest.approx(
        Scorer(lm).score(*REQUESTS[0]), abs=SCORE_TOL)  # a failed batch leaves it usable


class _Recorder:
    """An inner scorer that records each call's requests and scores them by their text."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def score_many(self, requests: list[Any]) -> list[list[float]]:
        self.calls.append([(p, tuple(o)) for p, o in requests])
        return [[float(len(p) + k) for k, _ in enumerate(o)] for p, o in requests]


def _jittered_agents(batcher: BatchingScorer, agents: int, steps: int, seed: int
                     ) -> dict[int, list[list[float]]]:
    """``agents`` threads, each asking ``steps`` questions with random work between them."""
    rng = [random.Random(seed * 100 + a) for a in range(agents)]
    got: dict[int, list[list[float]]] = {a: [] for a in range(agents)}
    batcher.enter(agents)

    def agent(a: int) -> None:
        try:
            for k in range(steps):
                time.sleep(rng[a].uniform(0, 0.12))  # perception, memory, ...
                got[a].append(batcher.score(f"agent {a} page {k}: ", [("", "watch")] * (a + 1)))
        finally:
            batcher.leave()

    threads = [threading.Thread(target=agent, args=(a,)) for a in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got


def test_lockstep_batches_do_not_depend_on_thread_timing() -> None:
    """Each batch holds every agent's next request, in text order, however late an agent is:
    in bf16 what shares a padded forward changes the scores."""
    runs = []
    for seed in (1, 2):
        inner = _Recorder()
        batcher = BatchingScorer(inner, max_requests=3)
        got = _jittered_agents(batcher, agents=4, steps=5, seed=seed)
        assert batcher.batches.flushes == 5 and batcher.batches.timeouts == 0
        assert all(len(v) == 5 for v in got.values())
        runs.append(inner.calls)
    assert runs[0] == runs[1]
    # 4 requests a batch, at most 3 a scorer call, sorted by their text
    assert [len(c) for c in runs[0]] == [3, 1] * 5
    flat = [r for c in runs[0] for r in c]
    assert flat == sorted(flat, key=lambda r: (int(r[0].split()[3][:-1]), r[0]))
    # a timed flush does not wait for the late agent: the batches follow the timing
    timed = BatchingScorer(_Recorder(), max_wait=0.01)
    _jittered_agents(timed, agents=4, steps=5, seed=1)
    assert timed.batches.timeouts > 0


def _population(world: World, scorer: Any, concurrency: int, users: list[int]
                ) -> list[dict[str, Any]]:
    cfg = SimulateConfig(policy="zero_shot", recommenders=["pop"], memory="none",
                         pages=3, temperature=1.0, seed=7, checkpoint=None)
    runtimes = build_runtimes(cfg, world, users, scorer, NoMemory())
    return run_population(build_graph("none", "on"), runtimes, users, progress=False,
                          concurrency=concurrency)


def test_batched_population_gives_the_same_trajectories(small_world: World, lm: LM) -> None:
    users = small_world.sample_users(4, seed=0)
    plain = _population(small_world, Scorer(lm), 1, users)
    batcher = BatchingScorer(Scorer(lm, cache_size=32))
    batched = _population(small_world, batcher, 4, users)
    # 4 sessions x (predict + watch + rest per page + interview) calls met in fewer flushes.
    assert batcher.batches.requests > 2 * batcher.batches.flushes
    assert [s.thread for s in batched] == [s.thread for s in plain]
    for a, b in zip(plain, batched, strict=True):
        assert [(p.items, p.watched, p.then) for p in a.pages] == \
            [(p.items, p.watched, p.then) for p in b.pages]
        assert (a.end, a.satisfaction) == (b.end, b.satisfaction)
        for pa, pb in zip(a.pages, b.pages, strict=True):
            assert pb.watch_scores == pytest.approx(pa.watch_scores, abs=SCORE_TOL)
    assert sum(len(s.pages) for s in plain) > len(plain)  # agents browsed past page 1


class _LateAgents(BatchingScorer):
    """Agents that reach the scorer after random work elsewhere, as real ones do."""

    def __init__(self, inner: Any, seed: int) -> None:
        super().__init__(inner)
        self._rng, self._lock = random.Random(seed), threading.Lock()

    def score_many(self, requests: Any) -> list[list[float]]:
        with self._lock:
            delay = self._rng.uniform(0, 0.08)
        time.sleep(delay)
        return super().score_many(requests)


def test_bf16_population_repeats_exactly_with_agents_in_flight(small_world: World) -> None:
    """In bf16 a slot's score depends on the batch it was padded into; batches that wait for
    every agent make a population with agents in flight repeat bit for bit."""
    lm = tiny_lm(seed=1)
    lm.model.to(torch.bfloat16)
    users = small_world.sample_users(4, seed=0)
    runs = [_population(small_world, _LateAgents(Scorer(lm, cache_size=32), seed), 4, users)
            for seed in (1, 2)]
    for a, b in zip(*runs, strict=True):
        assert [(p.items, p.watched, p.then, p.watch_scores) for p in a.pages] == \
            [(p.items, p.watched, p.then, p.watch_scores) for p in b.pages]
        assert (a.end, a.satisfaction) == (b.end, b.satisfaction)


def test_progress_bar_shows_decisions_per_second(small_world: World,
                                                 capsys: pytest.CaptureFixture) -> None:
    cfg = SimulateConfig(policy="random", recommenders=["pop"], memory="none",
                         world_model="off", pages=2, checkpoint=None)
    users = small_world.sample_users(3, seed=0)
    runtimes = build_runtimes(cfg, small_world, users, None, NoMemory())
    sessions = run_population(build_graph("none", "off"), runtimes, users)
    err = capsys.readouterr().err
    assert len(sessions) == 3 and "3/3" in err and "decisions/s" in err


@pytest.mark.parametrize("concurrency", [1, 3])
def test_heap_is_trimmed_after_every_agent(small_world: World, concurrency: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    real = engine.trim_heap
    monkeypatch.setattr(engine, "trim_heap", lambda: trims.append(1) or real())
    cfg = SimulateConfig(policy="random", recommenders=["pop"], memory="none",
                         world_model="off", pages=2, checkpoint=None)
    users = small_world.sample_users(4, seed=0)
    runtimes = build_runtimes(cfg, small_world, users, None, NoMemory())
    sessions = run_population(build_graph("none", "off"), runtimes, users, progress=False,
                              concurrency=concurrency)
    assert len(sessions) == len(trims) == 4
    assert isinstance(real(), bool)  # glibc trims (True); elsewhere it is a no-op (False)


def test_merged_lora_scores_like_the_adapter(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny = tiny_lm(seed=5)
    tiny.model.save_pretrained(base_dir)
    tiny.tokenizer.save_pretrained(base_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                      init_lora_weights=False)
    get_peft_model(load_lm(base_dir, dtype="fp32").model, lora).save_pretrained(adapter_dir)
    merged = load_lm(base_dir, adapter=adapter_dir, dtype="fp32")
    unmerged = load_lm(base_dir, adapter=adapter_dir, dtype="fp32", merge=False)
    base = load_lm(base_dir, dtype="fp32")
    assert isinstance(unmerged.model, PeftModel) and not isinstance(merged.model, PeftModel)
    assert merged.name == unmerged.name == "base+adapter"
    a, b = Scorer(merged).score_many(REQUESTS), Scorer(unmerged).score_many(REQUESTS)
    c = Scorer(base).score_many(REQUESTS)
    for x, y, z in zip(a, b, c, strict=True):
        assert x == pytest.approx(y, abs=SCORE_TOL)  # fp32: W + BA folded, round-off only
        assert max(abs(p - q) for p, q in zip(x, z, strict=True)) > 1e-2  # the LoRA matters


def test_simulate_device_and_concurrency_flags() -> None:
    args = build_parser().parse_args(["simulate", "--device", "cpu", "--concurrency", "3"])
    cfg = simulate_config(args)
    assert (cfg.device, cfg.concurrency) == ("cpu", 3)
    default = simulate_config(build_parser().parse_args(["simulate"]))
    assert (default.device, default.concurrency) == ("auto", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--device", "tpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_decide_alike(small_world: World, lm: LM) -> None:
    users = small_world.sample_users(3, seed=0)
    cuda = LM(tiny_lm(seed=1).model.to("cuda"), lm.tokenizer, lm.name)
    cpu_s = _population(small_world, Scorer(lm), 1, users)
    gpu_s = _population(small_world, Scorer(cuda), 1, users)
    for a, b in zip(cpu_s, gpu_s, strict=True):
        assert [(p.watched, p.then) for p in a.pages] == [(p.watched, p.then) for p in b.pages]
        for pa, pb in zip(a.pages, b.pages, strict=True):
            assert pb.watch_scores == pytest.approx(pa.watch_scores, abs=1e-3)


def test_chunked_decisions_equal_one_call_and_report_every_page(small_world: World) -> None:
    """Evaluation and calibration decide in chunks to bound the cached prompts; the chunks
    must not change a decision, and the progress callback must count every page once."""
    from agents import text
    from agents.decide import Calibration, decide, decide_chunked
    from agents.policy import DecisionInput

    users = sorted(small_world.histories)[:3]
    inputs = []
    for k, u in enumerate(users):
        unseen = [i for i in sorted(small_world.ds.items) if i not in small_world.histories[u]]
        for p in (1, 2):
            items = unseen[8 * k + 4 * p: 8 * k + 4 * p + 4]
            views = small_world.perceiver.page(items, small_world.histories[u])
            inputs.append(DecisionInput(user=u, page=p, items=items,
                                        persona_text=small_world.personas[u],
                                        page_text=text.page_prompt(p, 5, views), seed=1))
    cal = Calibration(watch_offset=0.3, then_offset=-0.2)
    whole = decide(Scorer(tiny_lm(seed=5)), inputs, calibration=cal)
    seen: list[int] = []
    chunked = decide_chunked(Scorer(tiny_lm(seed=5)), inputs, chunk=4, calibration=cal,
                             progress=seen.append)
    assert seen == [4, 2]
    assert [d.action for d in chunked] == [d.action for d in whole]
    for a, b in zip(chunked, whole, strict=True):
        assert a.watch_scores.keys() == b.watch_scores.keys()
        for s in a.watch_scores:
            assert a.watch_scores[s] == pytest.approx(b.watch_scores[s], abs=SCORE_TOL)


def test_browse_chunks_do_not_change_a_session(small_world: World) -> None:
    """``browse`` decides ``chunk`` sessions per call (memory); the chunk size must not change
    any session's decisions, exits included."""
    from agents.browse import browse, pages_of

    users = sorted(small_world.histories)[:5]
    sessions = []
    for k, u in enumerate(users):
        unseen = [i for i in sorted(small_world.ds.items) if i not in small_world.histories[u]]
        sessions.append((u, pages_of(unseen[12 * k: 12 * k + 12])))
    kw = dict(world_model=False, exits=True)
    one = browse(Scorer(tiny_lm(seed=6)), small_world.perceiver, small_world.personas,
                 small_world.histories, sessions, chunk=64, **kw)
    two = browse(Scorer(tiny_lm(seed=6)), small_world.perceiver, small_world.personas,
                 small_world.histories, sessions, chunk=2, **kw)
    assert [[d.action for d in run] for run in one] == [[d.action for d in run] for run in two]
    assert [len(run) for run in one] == [len(run) for run in two]
    for ra, rb in zip(one, two, strict=True):
        for a, b in zip(ra, rb, strict=True):
            for s in a.watch_scores:
                assert a.watch_scores[s] == pytest.approx(b.watch_scores[s], abs=SCORE_TOL)
