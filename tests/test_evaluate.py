"""`alignuser evaluate` end to end on the quick preset with a tiny random LM, and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agents.llm import tiny_lm
from agents.scorer import Scorer
from alignuser.cli import main
from evaluation.micro import AgentVariant, _threshold, state_fields
from evaluation.report import SECTIONS
from evaluation.run import EvalConfig, evaluate
from graph.world import load_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    world = load_world()
    scorer = Scorer(tiny_lm())
    agents = {"zero-shot": AgentVariant("zero-shot", scorer, memory=True, world_model=False),
              "AlignUSER": AgentVariant("AlignUSER", scorer, memory=True, world_model=True)}
    out = tmp_path_factory.mktemp("eval")
    metrics = evaluate(world, agents, "AlignUSER", EvalConfig.quick(), out,
                       {"dataset": "ml-100k", "seed": 0}, log=lambda m: None)
    return metrics, out


def test_report_has_every_section(quick_run: tuple[dict, Path]) -> None:
    metrics, out = quick_run
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for title in SECTIONS:
        assert title in html and title in md
    assert "not run" not in md, "the quick preset runs every section"
    assert html.count("data:image/png;base64,") >= 3
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"discrimination", "rating", "next_action", "world_model",
                          "distributions", "discriminator", "judge", "selection", "paired",
                          "explain"}


def test_every_method_answers_every_ratio(quick_run: tuple[dict, Path]) -> None:
    metrics, _ = quick_run
    rows = metrics["discrimination"]["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"random", "popularity", "itemknn", "bpr", "feature regression",
                       "zero-shot", "AlignUSER"}
    for r in rows:
        assert r["m"] in ("1:1", "1:9")
        assert 0.0 <= r["f1"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
    rating = {r["method"]: r for r in metrics["rating"]["rows"]}
    assert "biased MF (ALS, 50)" in rating and rating["AlignUSER"]["rmse"] > 0
    sel = metrics["selection"]
    tau = sel["simulated_vs_human"]["kendall_tau"]
    if len(set(sel["simulated_mean"].values())) == 1 or len(set(sel["truth_mean"].values())) == 1:
        assert math.isnan(tau), "a constant ranking has no rank correlation"
    else:
        assert -1.0 <= tau <= 1.0
    assert set(sel["truth_mean"]) == {"pop", "itemknn"}


def test_threshold_maximises_accuracy() -> None:
    import numpy as np

    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    cut = _threshold(scores, labels)
    assert np.mean((scores >= cut) == labels) == 0.75
    assert _threshold(np.array([0.0, 1.0]), np.array([0, 1])) == 0.5


def test_next_state_fields_ignore_the_action_copy() -> None:
    from agents.text import NextState

    ns = NextState(ratings={2: 4}, ends=True, titles=["A (1990)"], genres=["Drama"])
    assert state_fields(ns) == {("rating", 2, 4), ("title", "A (1990)"), ("genre", "Drama")}


def test_unknown_method_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--preset", "quick", "--methods", "zero_shot,telepathy"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) telepathy" in err and err.count("\n") == 1


def test_missing_checkpoint_is_one_clear_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--preset", "quick", "--methods", "sft",
                 "--sft-checkpoint", str(tmp_path / "nope")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_empty_test_split_is_one_clear_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "two"
    d.mkdir()
    (d / "two.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                 "1\t1\t4\t10\n1\t2\t3\t20\n2\t1\t5\t30\n")
    (d / "two.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\t"
                                "class:token_seq\n1\tA\t1990\tDrama\n2\tB\t1991\tComedy\n")
    code = main(["evaluate", "--preset", "quick", "--dataset", str(d), "--methods", ""])
    assert code == 2
    assert "test split is empty" in capsys.readouterr().err


def test_a_distribution_one_side_lacks_is_reported_not_dropped() -> None:
    from evaluation.macro import compare_sessions

    def session(n_pages: int, last: str) -> dict:
        pages = [{"page": p, "items": [1, 2], "watched": {"1": 4},
                  "then": last if p == n_pages else "next"} for p in range(1, n_pages + 1)]
        return {"user": 1, "recommender": "pop", "pages": pages}

    human = [session(n, "exit") for n in (1, 2, 3, 4)]
    sim = [session(5, "next") for _ in range(4)]  # every agent ran to the page limit
    rows = {r["distribution"]: r for r in compare_sessions(human, sim, seed=0)["rows"]}
    assert set(rows) == {"pages per session", "watches per page", "ratings", "exit page"}
    assert rows["exit page"]["n_sim"] == 0 and "not compared" in rows["exit page"]["note"]
    assert rows["pages per session"]["w1"] == pytest.approx(2.5)
