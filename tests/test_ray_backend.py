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
