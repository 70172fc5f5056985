"""The report shows every section, says "not run" where data is missing, and opens in a browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from evaluation.plots import (
    plot_distributions,
    plot_method_bars,
    plot_ranking,
    plot_session_outcomes,
)
from evaluation.report import NOT_RUN, SECTIONS, TITLE, rerender, write_report

CHROMIUM = Path("/usr/bin/chromium")
_VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


def _metrics() -> dict[str, Any]:
    """Every section but the world model, in plain JSON types so metrics.json can round-trip."""
    return {
        "setup": {"machine": "ci box (2 cores)", "command": "alignuser eval --dataset ml-100k",
                  "wall_time_s": 42.5, "dataset": "ml-100k", "split": "leave-last-20%",
                  "seed": 0, "checkpoints": {"full": "runs/ckpt-1"}},
        "discrimination": [{"method": m, "m": r, "accuracy": 0.7, "precision": 0.71,
                            "recall": 0.69, "f1": 0.7} for m in ("popularity", "alignuser")
                           for r in (1, 2, 3, 9)],
        "rating": [{"method": "MF", "rmse": 0.93, "mae": 0.74},
                   {"method": "alignuser", "rmse": 1.01, "mae": 0.8}],
        "next_action": [{"method": "alignuser", "exact": 0.31, "jaccard": 0.45,
                         "balanced_accuracy": 0.62}],
        "distributions": {"rows": [{"distribution": "pages per session", "w1": 0.4, "ks": 0.12,
                                    "ks_p": 0.003}], "note": "Human sessions from the test split."},
        "discriminator": {"auc": 0.64, "auc_std": 0.03, "n_folds": 5},
        "judge": {"judge_model": "qwen2.5-1.5b-instruct", "local": True, "mean_score": 3.4},
        "explain": [{"group": "all features", "r2_alone": 0.96, "dominant": False},
                    {"group": "popularity", "r2_alone": 0.94, "r2_drop": 0.5, "dominant": True}],
        "selection": {"kendall_tau": 0.6, "spearman_rho": 0.8, "tau_ci": [0.2, 1.0],
                      "rho_ci": [0.4, 1.0], "offline": {"kendall_tau": 0.2},
                      "answer": {"simulation": {"recommender": "itemknn", "mean": 0.42,
                                                "ci": [0.35, 0.5], "p_first": 0.91,
                                                "runner_up": "bpr", "lead": 0.05,
                                                "lead_ci": [-0.01, 0.1], "n_users": 50},
                                 "offline metric": {"recommender": "bpr", "mean": 0.2,
                                                    "ci": [0.15, 0.25], "p_first": 0.6,
                                                    "n_users": 50}}},
        "paired": [{"comparison": "alignuser - agent4rec", "metric": "f1", "mean_diff": 0.05,
                    "lo": 0.02, "hi": 0.08, "n": 300}],
    }


def _plots() -> dict[str, Figure]:
    rng = np.random.default_rng(0)
    table = pd.DataFrame(_metrics()["discrimination"]).assign(f1_lo=0.65, f1_hi=0.75)
    return {"distributions": plot_distributions({"pages per session": rng.integers(1, 6, 50)},
                                                {"pages per session": rng.integers(1, 6, 40)}),
            "discrimination": plot_method_bars(table, "f1"),
            "selection/ranking": plot_ranking({"pop": 1.0, "mf": 2.0}, {"pop": 1.1, "mf": 2.2},
                                              {"mf": (1.9, 2.4)})}


def _section(page: str, key: str) -> str:
    match = re.search(rf'<section id="{key}">(.*?)</section>', page, flags=re.S)
    assert match, f"no section {key}"
    return match.group(1)


@pytest.fixture
def report(tmp_path: Path) -> dict[str, Path]:
    return write_report(_metrics(), tmp_path / "out", _plots())


def test_every_section_in_html_and_md(report: dict[str, Path]) -> None:
    page = report["report.html"].read_text()
    md = report["report.md"].read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
        assert f"## {title}" in md
    assert TITLE in page and TITLE in md


def test_missing_section_says_not_run(report: dict[str, Path]) -> None:
    page = report["report.html"].read_text()
    assert NOT_RUN in _section(page, "world_model")
    assert NOT_RUN not in _section(page, "rating")
    md = report["report.md"].read_text()
    world = md.split("## World model", 1)[1].split("## ", 1)[0]
    assert NOT_RUN in world


def test_empty_metrics_invent_nothing(tmp_path: Path) -> None:
    paths = write_report({}, tmp_path)
    page = paths["report.html"].read_text()
    for key in ("setup", "discrimination", "rating", "world_model", "selection", "paired"):
        assert NOT_RUN in _section(page, key)
    assert "<td>" not in page and "data:image" not in page


def test_images_embedded_as_data_uris(report: dict[str, Path]) -> None:
    page = report["report.html"].read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 3
    assert all(base64.b64decode(u).startswith(b"\x89PNG") for u in uris)
    assert "data:image/png" in _section(page, "distributions")
    assert "data:image/png" in _section(page, "selection")
    assert not re.search(r'(src|href)="(https?:|//)', page)  # self-contained
    assert report["distributions.png"].read_bytes().startswith(b"\x89PNG")
    assert "![distributions](distributions.png)" in report["report.md"].read_text()


def test_metrics_json_round_trips(report: dict[str, Path]) -> None:
    stored = json.loads(report["metrics.json"].read_text())
    assert stored.pop("plots") == {"distributions": "distributions.png",
                                   "discrimination": "discrimination.png",
                                   "selection/ranking": "selection_ranking.png"}
    assert stored == _metrics()


def test_report_opens_with_the_answer(report: dict[str, Path]) -> None:
    page = report["report.html"].read_text()
    assert page.index('<section id="answer">') < page.index('<section id="setup">')
    answer = _section(page, "answer")
    assert "The simulation would ship itemknn; neither" in answer
    assert "ship itemknn (mean 0.420, 95% CI [0.350, 0.500]; first in 91% of resamples; " \
           "lead over bpr 0.050, CI [-0.010, 0.100])" in answer
    assert "offline metric: ship bpr" in answer


def test_a_tie_is_not_a_choice(tmp_path: Path) -> None:
    tied = {"recommender": "pop", "mean": 0.0, "ci": [0.0, 0.0], "p_first": 0.0,
            "runner_up": "bpr", "lead": 0.0, "lead_ci": [0.0, 0.0], "n_users": 3}
    page = write_report({"selection": {"answer": {"simulation": tied}}},
                        tmp_path)["report.html"].read_text()
    assert "The simulation cannot choose: pop and bpr tie" in _section(page, "answer")


def test_rerender_reproduces_the_report_without_recomputing(report: dict[str, Path]) -> None:
    out = report["report.html"].parent
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    report["report.html"].write_text("stale")
    rerender(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    report["discrimination.png"].unlink()
    with pytest.raises(FileNotFoundError, match="discrimination.png"):
        rerender(out)
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        rerender(out / "nowhere")


def test_json_handles_numpy_nan_and_frames(tmp_path: Path) -> None:
    frame = pd.DataFrame({"group": ["a"], "r2_alone": [np.float64(0.5)]})
    metrics = {"discriminator": {"auc": np.float32(0.5), "n": np.int64(3), "bad": float("nan")},
               "explain": frame}
    out = json.loads(write_report(metrics, tmp_path)["metrics.json"].read_text())
    assert out == {"plots": {}, "discriminator": {"auc": 0.5, "n": 3, "bad": None},
                   "explain": [{"group": "a", "r2_alone": 0.5}]}


def test_warnings_come_from_the_data(tmp_path: Path) -> None:
    page = write_report(_metrics(), tmp_path / "a")["report.html"].read_text()
    assert "small local model" in _section(page, "judge")
    assert "One cue explains &gt;90%" in _section(page, "explain")
    assert "MF baseline" not in _section(page, "rating")
    metrics = _metrics() | {"judge": {"judge_model": "big-judge", "judge_params_b": 70,
                                      "mean_score": 4.0},
                            "rating": [{"method": "alignuser", "rmse": 1.0, "mae": 0.8}],
                            "explain": [{"group": "taste", "r2_alone": 0.3, "dominant": False}]}
    page = write_report(metrics, tmp_path / "b")["report.html"].read_text()
    assert "small local model" not in _section(page, "judge")
    assert f"MF baseline: {NOT_RUN}" in _section(page, "rating")
    assert "No single cue group" in _section(page, "explain")


class _Balance(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_html5_structure(report: dict[str, Path]) -> None:
    page = report["report.html"].read_text()
    assert page.startswith("<!doctype html>")
    assert re.search(r"<title>[^<]+</title>", page)
    assert '<meta charset="utf-8">' in page
    parser = _Balance()
    parser.feed(page)
    assert parser.errors == [] and parser.stack == []


def test_plot_helpers() -> None:
    fig = plot_distributions({"a": [1, 2], "b": [0.5, 1.5]}, {"a": [2, 3], "c": []})
    assert len(fig.axes) == 3
    bars = plot_method_bars(pd.DataFrame({"method": ["x", "y"], "auc": [0.6, 0.7],
                                          "auc_std": [0.05, 0.02]}), "auc")
    assert isinstance(bars, Figure)
    with pytest.raises(ValueError, match="no column"):
        plot_method_bars(pd.DataFrame({"method": ["x"], "auc": [0.6]}), "f1")
    assert isinstance(plot_ranking({"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 1.0}, None), Figure)
    outcomes = plot_session_outcomes([
        {"recommender": "pop", "watch_ratio": 0.2, "likes_per_page": 0.5,
         "pages_per_session": 3.0, "exit_share": 0.4},
        {"recommender": "bpr", "watch_ratio": 0.3, "likes_per_page": 0.7,
         "pages_per_session": 4.0, "exit_share": 0.2}])
    assert [ax.get_title() for ax in outcomes.axes] == [
        "watch ratio", "likes per page", "pages per session", "exit share"]
    assert [b.get_height() for b in outcomes.axes[1].patches] == [0.5, 0.7]


def _chromium(page: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--dump-dom", page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _console_problems(stderr: str) -> list[str]:
    """Console output, which a page without scripts should never produce."""
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or "console error" in line.lower() or ":CONSOLE" in line]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
def test_report_loads_in_headless_chromium(report: dict[str, Path], tmp_path: Path) -> None:
    assert shutil.which(str(CHROMIUM))
    run = _chromium(report["report.html"], tmp_path / "profile")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"<title>{TITLE}: ml-100k</title>" in run.stdout
    assert "<h2>Recommender selection</h2>" in run.stdout
    assert _console_problems(run.stderr) == []
    bad = tmp_path / "bad.html"  # the console check must catch a real script error
    bad.write_text("<!doctype html><title>x</title><script>throw new Error('boom')</script>")
    assert _console_problems(_chromium(bad, tmp_path / "profile2").stderr)
