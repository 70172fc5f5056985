"""`--backend ray` shards agents over Ray actors and writes the run the local backend writes:
same sessions in the same order, metrics, traces and memories."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignuser import cli
from simulator.data import Dataset
from tests.test_cli_errors import write_folder

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")

RUN = ["simulate", "--policy", "popularity", "--agents", "6", "--pages", "2",
       "--recommenders", "pop,itemknn"]


@pytest.fixture
def local_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _threads(run: Path) -> dict[str, int]:
    with sqlite3.connect(run / "traces.sqlite") as conn:
        rows = conn.execute("SELECT thread_id, count(*) FROM checkpoints GROUP BY thread_id")
        return dict(rows.fetchall())


def test_ray_runs_the_same_sessions_as_local(tiny_dataset: Dataset, tmp_path: Path,
                                             local_cluster: None) -> None:
    data = ["--dataset", str(write_folder(tiny_dataset, tmp_path / "tiny"))]
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli.main([*RUN, *data, "--output", str(local)]) == 0
    assert cli.main([*RUN, *data, "--backend", "ray", "--concurrency", "2",
                     "--output", str(remote)]) == 0
    assert ray.is_initialized()  # joined the running cluster, left it running
    sessions = (remote / "sessions.jsonl").read_text()
    assert sessions == (local / "sessions.jsonl").read_text() and len(sessions.splitlines()) == 12
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (local, remote)]
    assert [m["per_recommender"] for m in metrics] == [metrics[0]["per_recommender"]] * 2
    assert _threads(remote) == _threads(local) and len(_threads(local)) == 12
    from memory.store import ChromaMemory

    memories = [ChromaMemory(run / "memory") for run in (local, remote)]
    thread = json.loads(sessions.splitlines()[0])["thread"]
    assert memories[1].count() == memories[0].count() > 0
    assert memories[1].count(thread) == memories[0].count(thread) > 0


def _tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> str:
    """A tiny random LM saved where a command can load it, in fp32 on one thread here (the
    ``fp32_cluster`` actors load it so too)."""
    from agents.llm import tiny_lm

    monkeypatch.setenv("ALIGNUSER_DTYPE", "fp32")
    monkeypatch.setenv("ALIGNUSER_THREADS", "1")
    lm = tiny_lm(seed=seed)
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def _evaluate_argv(small_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   ms: str) -> list[str]:
    """A quick zero-shot evaluation of the tiny LM on ``small_world``, its lists and pages."""
    from tests.test_evaluate_sections import _write_atomic_dataset

    return ["evaluate", "--preset", "quick", "--ms", ms, "--next-action-pages", "2",
            "--methods", "zero_shot", "--sections", "discrimination,next_action,cost",
            "--model", _tiny_model(tmp_path, monkeypatch, seed=1),
            "--dataset", str(_write_atomic_dataset(small_world, tmp_path / "ml40"))]


def _decisions(run: Path) -> list[tuple]:
    """What each session did, page by page, and its watch scores (to compare with a tolerance)."""
    rows = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    return [(r["thread"], r["end"], [(p["items"], p["watched"], p["then"]) for p in r["pages"]],
             [s for p in r["pages"] for s in p["watch_scores"].values()]) for r in rows]


def test_llm_agents_on_ray_run_in_lockstep_and_repeat(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      fp32_cluster: None) -> None:
    """LLM agents run in chunks of agents in flight on each actor, their scorer calls batched
    as locally: the local run's decisions (fp32: scores within round-off), and two Ray runs
    write the same sessions byte for byte, whichever actor ran which chunk."""
    import numpy as np

    argv = ["simulate", "--policy", "zero_shot", "--model",
            _tiny_model(tmp_path, monkeypatch, seed=2),
            "--no-memory", "--agents", "5", "--recommenders", "pop,itemknn", "--pages", "2",
            "--device", "cpu"]
    assert cli.main([*argv, "--output", str(tmp_path / "local")]) == 0
    for name in ("ray1", "ray2"):
        assert cli.main([*argv, "--backend", "ray", "--concurrency", "2",
                         "--output", str(tmp_path / name)]) == 0
    assert ((tmp_path / "ray1" / "sessions.jsonl").read_bytes()
            == (tmp_path / "ray2" / "sessions.jsonl").read_bytes())
    got, want = _decisions(tmp_path / "ray1"), _decisions(tmp_path / "local")
    assert len(got) == 10 and [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([s for g in got for s in g[3]], [s for w in want for s in w[3]],
                               atol=1e-4)
    assert _threads(tmp_path / "ray1") == _threads(tmp_path / "local")
    # the actors' scorer calls met in lockstep batches, each waiting for the chunk's agents
    lock = json.loads((tmp_path / "ray1" / "manifest.json").read_text())["scoring"]["lockstep"]
    assert 0 < lock["batches"] < lock["requests"] and lock["flushed_before_every_agent_waited"] == 0


# --- evaluate --backend ray ---------------------------------------------------------------------

@pytest.fixture
def fp32_cluster() -> Iterator[None]:
    """A local two-CPU cluster whose actors load models in fp32, as the local side does here."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"ALIGNUSER_DTYPE": "fp32", "ALIGNUSER_THREADS": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_answers_what_the_local_run_answers(quick_bundle, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                fp32_cluster: None) -> None:
    """Every part of two methods, cut into one-row blocks over two actors, joined in order:
    the local run's answers (fp32, so only round-off of other batches differs), each part
    committed once it is whole."""
    import numpy as np

    from evaluation.distributed import blocks_of, ray_runners
    from evaluation.outputs import all_outputs
    from tests.test_evaluate import _cut

    model = _tiny_model(tmp_path, monkeypatch, seed=1)
    cut = _cut(quick_bundle)
    cut.lists = {m: [(u, items[:8], labels[:8]) for u, items, labels in rows[:2]]
                 for m, rows in quick_bundle.lists.items()}
    cut.sessions = {r: [(u, pages[:2]) for u, pages in s[:2]]
                    for r, s in quick_bundle.sessions.items()}
    one = {"lists": 1, "pages": 1, "sessions": 1}
    assert len(blocks_of(cut, [("lists", 1), ("pages", None), ("next_state", None)], one)) == 5
    assert [b[1:] for b in blocks_of(cut, [("lists", 1)], spread=2)] == [(0, 1), (1, 2)]
    assert [b[1:] for b in blocks_of(cut, [("lists", 1)], spread=3)] == [(0, 1), (1, 2)]
    methods = ["zero_shot", "full"]
    local = all_outputs(cut, methods, {}, model=model, device="cpu", log=lambda m: None)
    committed: list[tuple[str, list]] = []
    with ray_runners(cut, model, "cpu", None, 2, rows=one) as runners:
        remote = all_outputs(cut, methods, {}, model=model, device="cpu", log=lambda m: None,
                             runners=runners, commit_part=lambda name, out: committed.append(
                                 (name, sorted(k for k in ("pages", "next_state", "sessions")
                                               if k in out))))
    assert ray.is_initialized()  # joined the running cluster, left it running
    for name in methods:
        got, ref = remote[name], local[name]
        assert got["lists"].keys() == ref["lists"].keys() == cut.lists.keys()
        for m in cut.lists:
            assert [len(x) for x in got["lists"][m]] == [8, 8]
            np.testing.assert_allclose(np.concatenate(got["lists"][m]),
                                       np.concatenate(ref["lists"][m]), atol=1e-4)
        assert [p["watched"] for p in got["pages"]] == [p["watched"] for p in ref["pages"]]
        assert [p["then"] for p in got["pages"]] == [p["then"] for p in ref["pages"]]
        assert len(got["ratings"]) == len(cut.pages) and got["tokens"] > 0
        for a, b in zip(got["ratings"], ref["ratings"], strict=True):
            assert a.keys() == b.keys()
            np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-3)
    assert remote["full"]["next_state"] == local["full"]["next_state"]
    assert remote["full"]["sessions"] == local["full"]["sessions"]
    assert list(remote["full"]["sessions"]) == list(cut.sessions)
    assert "sessions" not in remote["zero_shot"]
    # zero-shot: 2 list ratios and the pages; full: those, its next states and 2 recommenders
    assert [n for n, _ in committed] == ["zero_shot"] * 3 + ["full"] * 6
    assert committed[-1] == ("full", ["next_state", "pages", "sessions"])


def test_evaluate_on_ray_writes_the_local_metrics(small_world, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  fp32_cluster: None) -> None:
    """`alignuser evaluate --backend ray` end to end: the metrics a local run writes, and a
    manifest that does not tie the run to a backend (it may be resumed on another)."""
    from tests.test_evaluate_sections import _comparable

    argv = _evaluate_argv(small_world, tmp_path, monkeypatch, "1")
    assert cli.main([*argv, "--output", str(tmp_path / "local")]) == 0
    assert cli.main([*argv, "--backend", "ray", "--concurrency", "2",
                     "--output", str(tmp_path / "ray")]) == 0
    got, want = _comparable(tmp_path / "ray"), _comparable(tmp_path / "local")
    assert got["discrimination"]["rows"] and got["next_action"]
    # the tokens pushed differ: each actor's calls share other prompt starts than one scorer's
    assert all(run.pop("cost")["zero-shot"]["tokens"] > 0 for run in (got, want))
    assert got["setup"].pop("answers") == "computed in this run on Ray actors (a local cluster)"
    assert want["setup"].pop("answers") == "computed in this run"
    assert got == want
    flags = json.loads((tmp_path / "ray" / "manifest.json").read_text())["flags"]
    assert flags["methods"] == "zero_shot" and not {"backend", "concurrency"} & set(flags)


class _Cluster:
    """What ``plan_actors`` reads off Ray: the free resources."""

    def __init__(self, **free: float) -> None:
        self.free = free

    def available_resources(self) -> dict[str, float]:
        return self.free


def test_actors_share_the_cluster_and_take_gpus_where_the_model_runs_on_cuda() -> None:
    from simulator.cluster import ActorPlan, plan_actors

    cpu_box, gpu_box = _Cluster(CPU=16.0), _Cluster(CPU=16.0, GPU=2.0)
    assert plan_actors(cpu_box, None, 100) == ActorPlan(16, 1, 0)
    assert plan_actors(cpu_box, 2, 100) == ActorPlan(2, 8, 0)  # each torch on 8 threads
    assert plan_actors(cpu_box, None, 3) == ActorPlan(3, 5, 0)  # never more than the jobs
    assert plan_actors(gpu_box, None, 100, "auto") == ActorPlan(2, 8, 1)
    assert plan_actors(gpu_box, None, 100, "cpu") == ActorPlan(16, 1, 0)
    assert plan_actors(gpu_box, 4, 100, "cuda") == ActorPlan(4, 4, 0.5)  # two to a GPU
    assert plan_actors(cpu_box, None, 100, "auto") == ActorPlan(16, 1, 0)
    with pytest.raises(ValueError, match="no free GPU"):
        plan_actors(cpu_box, None, 100, "cuda")


def test_a_killed_local_evaluate_resumes_on_ray(small_world, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                fp32_cluster: None) -> None:
    """SIGKILL a local evaluate once its first part is committed, then ``--resume`` it with
    ``--backend ray``: the kept part is not recomputed and the metrics are an uninterrupted
    local run's."""
    import os
    import pickle
    import subprocess

    from tests.test_evaluate_sections import ALIGNUSER, _comparable, kill_once_committed

    argv = _evaluate_argv(small_world, tmp_path, monkeypatch, "1,9")
    killed = subprocess.Popen([ALIGNUSER, *argv, "--output", str(tmp_path / "killed")],
                              cwd=tmp_path, env=dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    staging = kill_once_committed(killed, tmp_path / "killed", "partial-zero_shot.pkl")
    kept = pickle.loads((staging / "parts" / "partial-zero_shot.pkl").read_bytes())
    assert kept["lists"] and len(kept["lists"]) < 2 and not kept.get("pages")
    assert cli.main(["evaluate", "--resume", str(tmp_path / "killed"), "--backend", "ray",
                     "--concurrency", "2"]) == 0
    assert cli.main([*argv, "--output", str(tmp_path / "whole")]) == 0
    got, want = _comparable(tmp_path / "killed"), _comparable(tmp_path / "whole")
    assert got["setup"].pop("answers") != want["setup"].pop("answers")  # Ray, then local
    assert all(run.pop("cost")["zero-shot"]["tokens"] > 0 for run in (got, want))
    assert got["discrimination"]["rows"] and got == want
    answers = pickle.loads((tmp_path / "killed" / "parts" / "outputs-zero_shot.pkl").read_bytes())
    assert {m: answers["lists"][m] for m in kept["lists"]} == kept["lists"]
