"""What `alignuser simulate` tells a team: per-recommender outcomes as a table and a PNG, and
which recommender the population would ship, with its CIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from alignuser.cli import main


def test_simulate_says_which_recommender_it_would_ship(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    run = tmp_path / "run"
    assert main(["simulate", "--policy", "popularity", "--agents", "8", "--recommenders",
                 "pop,itemknn", "--pages", "4", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    likes = {rec: [sum(r >= 4 for p in s["pages"] for r in p["watched"].values())
                   / len(s["pages"]) for s in sessions if s["recommender"] == rec]
             for rec in ("pop", "itemknn")}
    means = {rec: float(np.mean(v)) for rec, v in likes.items()}
    ship = metrics["would_ship"]
    best, other = sorted(means, key=means.get, reverse=True)
    assert means[best] > means[other]  # these agents like one recommender's pages more
    assert ship["recommender"] == best and ship["runner_up"] == other
    assert ship["mean"] == pytest.approx(means[best])
    assert ship["lead"] == pytest.approx(means[best] - means[other])
    assert ship["ci"][0] <= ship["mean"] <= ship["ci"][1]
    assert ship["lead_ci"][0] <= ship["lead"] <= ship["lead_ci"][1]
    assert 0.0 <= ship["p_first"] <= 1.0 and ship["n_users"] == 8
    assert f"would ship {best}" in out
    for rec in ("pop", "itemknn"):
        rows = [s for s in sessions if s["recommender"] == rec]
        assert metrics["per_recommender"][rec]["exit_share"] == pytest.approx(
            np.mean([s["end"] == "exit" for s in rows]))
    assert (run / "sessions_by_recommender.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    link = metrics["satisfaction_vs_likes"]  # each session's answer against its likes per page
    sats = [s["satisfaction"] for s in sessions]
    per_page = [sum(r >= 4 for p in s["pages"] for r in p["watched"].values()) / len(s["pages"])
                for s in sessions]
    assert link["rho"] == pytest.approx(spearmanr(sats, per_page).statistic)
    assert link["n"] == 16 and link["rho"] > 0  # without a model it answers from likes per page
    assert link["ci"][0] <= link["rho"] <= link["ci"][1] and "satisfaction vs likes" in out


def test_one_recommender_ships_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["simulate", "--policy", "random", "--agents", "2", "--recommenders", "pop",
                 "--pages", "2", "--output", str(run)]) == 0
    assert "would_ship" not in json.loads((run / "metrics.json").read_text())
    assert (run / "sessions_by_recommender.png").is_file()


def test_an_llm_run_records_what_it_cost_the_model(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from agents.llm import tiny_lm

    lm = tiny_lm(seed=2)
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    run = tmp_path / "run"
    assert main(["simulate", "--policy", "zero_shot", "--model", str(tmp_path / "tiny"),
                 "--no-memory", "--agents", "2", "--recommenders", "pop", "--pages", "2",
                 "--device", "cpu", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    cost = json.loads((run / "manifest.json").read_text())["scoring"]
    pages = sum(len(json.loads(line)["pages"])
                for line in (run / "sessions.jsonl").read_text().splitlines())
    assert cost["pages"] == pages >= 2
    assert 0 < cost["forwards"] < cost["token_positions"]
    assert cost["token_positions_per_page"] == pytest.approx(cost["token_positions"] / pages)
    assert f"{cost['forwards']:,} forwards for {pages:,} pages" in out
    # the two agents' scorer calls met in lockstep batches, each waiting for both
    lock = cost["lockstep"]
    assert 0 < lock["batches"] < lock["requests"]
    assert lock["flushed_before_every_agent_waited"] == 0
    assert (f"{lock['requests']:,} scorer requests in {lock['batches']:,} lockstep batches"
            in " ".join(out.split()))  # the console may wrap the line
    random_run = tmp_path / "random"
    assert main(["simulate", "--policy", "random", "--agents", "2", "--recommenders", "pop",
                 "--output", str(random_run)]) == 0
    assert json.loads((random_run / "manifest.json").read_text())["scoring"] is None
