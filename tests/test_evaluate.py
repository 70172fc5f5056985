"""`alignuser evaluate` in its two halves: ``build_bundle`` (what the agents are shown, held-out
data only), ``method_outputs``/``all_outputs`` (the LLM methods' answers, here from a tiny random
LM) and ``score`` (metrics and the report from answers alone), plus the CLI's errors.

The bundle is built on the 40-user ml-100k world (``small_world``): the 6-user tiny dataset has
about one test rating a user, and 1:m lists need 10. ``score`` runs on answers from a hashed
pseudo-scorer so the whole report is produced in seconds; the tiny LM answers a cut bundle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from agents.browse import list_scores
from agents.decide import Calibration
from agents.llm import tiny_lm
from agents.scorer import Scorer, ScorerStats
from agents.world import World
from alignuser.cli import main
from evaluation.micro import _threshold, state_fields
from evaluation.outputs import METHODS, EvalBundle, all_outputs, method_outputs, shown_pages
from evaluation.report import SECTIONS
from evaluation.run import EvalConfig, build_bundle, score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASELINES = {"random", "popularity", "itemknn", "bpr", "ease", "feature regression"}


class HashScorer:
    """Deterministic pseudo log-probs from a hash of each (prefix, context, target): no model,
    so the scoring half runs in seconds while every decision still varies by item and page."""

    def __init__(self) -> None:
        self.stats = ScorerStats()

    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        self.stats.calls += 1
        return [-(zlib.crc32(f"{prefix}|{c}|{t}".encode()) % 1000) / 250 for c, t in options]

    def score_many(self, requests: Sequence[tuple[str, Sequence[tuple[str, str]]]]
                   ) -> list[list[float]]:
        return [self.score(p, o) for p, o in requests]

    def generate_many(self, prompts: Sequence[str], max_new_tokens: int = 64,
                      batch: int = 64, stop: str | None = None) -> list[str]:
        out = "[1] rated 4\nnext page: none, the session ends\n"
        return [out.split(stop)[0] if stop else out for _ in prompts]


def _pairs(frame) -> set[tuple[int, int]]:
    return {(int(u), int(i)) for u, i in zip(frame["user"], frame["item"], strict=True)}


def _cut(b: EvalBundle) -> EvalBundle:
    """One 8-item list per ratio, two held-out pages, one transition and two-page sessions of
    one user: enough for every code path of ``method_outputs`` at tiny-LM speed."""
    return EvalBundle(
        perceiver=b.perceiver, personas=b.personas, histories=b.histories,
        lists={m: [(u, items[:8], labels[:8]) for u, items, labels in rows[:1]]
               for m, rows in b.lists.items()},
        pages=b.pages[:2], transitions=b.transitions[:1],
        sessions={r: [(u, pages[:2]) for u, pages in s[:1]] for r, s in b.sessions.items()},
        meta=dict(b.meta))


@pytest.fixture(scope="module")
def cfg() -> EvalConfig:
    return EvalConfig.quick()


@pytest.fixture(scope="module")
def bundle(quick_bundle: EvalBundle) -> EvalBundle:
    return quick_bundle


@pytest.fixture(scope="module")
def scored(small_world: World, bundle: EvalBundle, cfg: EvalConfig,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    hashed = HashScorer()
    outputs = {name: method_outputs(METHODS[name], hashed, Calibration(), bundle,
                                    full=name == "full") for name in ("zero_shot", "full")}
    out = tmp_path_factory.mktemp("eval")
    metrics = score(small_world, bundle, outputs, cfg, out, {"dataset": "ml-100k-40", "seed": 0},
                    judge_scorer=hashed, log=lambda m: None)
    return metrics, outputs, out


# --- build_bundle -------------------------------------------------------------------------------

def test_bundle_holds_held_out_test_data_only(small_world: World, bundle: EvalBundle,
                                              cfg: EvalConfig) -> None:
    split = small_world.split
    train, valid, test = _pairs(split.train), _pairs(split.valid), _pairs(split.test)
    users = bundle.meta["users"]
    assert len(users) == cfg.users and bundle.meta["sim_users"] == users[:cfg.sim_users]
    assert set(bundle.lists) == set(cfg.ms)
    for rows in bundle.lists.values():
        assert [u for u, _, _ in rows] == users
        for u, items, labels in rows:
            assert len(items) == 20 and len(set(items)) == 20
            for i, y in zip(items, labels, strict=True):
                assert ((u, i) in test) == bool(y)
                assert (u, i) not in train | valid  # negatives were never rated
    assert 0 < len(bundle.pages) <= cfg.next_action_pages
    assert {tr.user for tr in bundle.pages} <= set(users[:cfg.next_action_users])
    for tr in bundle.pages:
        assert len(tr.items) == 4
        for s, item in enumerate(tr.items, 1):
            # Watched slots are held-out test ratings; fillers were never rated in any part.
            if s in tr.ratings:
                assert (tr.user, item) in test
            else:
                assert (tr.user, item) not in train | valid | test
    assert bundle.transitions == bundle.pages[:cfg.next_state]
    assert set(bundle.sessions) == set(cfg.recommenders)
    for sessions in bundle.sessions.values():
        assert [u for u, _ in sessions] == bundle.meta["sim_users"]
        for u, pages in sessions:
            assert len(pages) == 5 and all(len(p) == 4 for p in pages)
            assert not {(u, i) for p in pages for i in p} & train  # train items masked


def test_bundle_is_seeded(small_world: World, bundle: EvalBundle, cfg: EvalConfig) -> None:
    again = build_bundle(small_world, cfg)
    assert again.meta == bundle.meta and again.lists == bundle.lists
    assert again.sessions == bundle.sessions
    assert [(t.user, t.page, t.items) for t in again.pages] == [
        (t.user, t.page, t.items) for t in bundle.pages]


# --- method_outputs / all_outputs ---------------------------------------------------------------

def _assert_outputs(out: dict, b: EvalBundle, full: bool) -> None:
    assert set(out["lists"]) == set(b.lists)
    for m, rows in b.lists.items():
        assert [len(s) for s in out["lists"][m]] == [len(items) for _, items, _ in rows]
        assert all(np.isfinite(x) for s in out["lists"][m] for x in s)
    assert len(out["pages"]) == len(b.pages) == len(out["ratings"])
    for tr, page, ratings in zip(b.pages, out["pages"], out["ratings"], strict=True):
        assert set(page["watched"]) <= set(range(1, len(tr.items) + 1))
        assert page["then"] in ("next", "exit") and sorted(page["watch_scores"]) == [1, 2, 3, 4]
        # Expected ratings are given for the human's watched slots (held-out ratings).
        assert sorted(ratings) == sorted(tr.ratings)
        assert all(1.0 <= r <= 5.0 for r in ratings.values())
    assert out["calibration"] == Calibration().model_dump()
    if not full:
        assert "next_state" not in out and "sessions" not in out
        return
    assert len(out["next_state"]) == len(b.transitions)
    assert all(isinstance(t, str) for t in out["next_state"])
    assert set(out["sessions"]) == set(b.sessions)
    for rec, records in out["sessions"].items():
        assert [r["user"] for r in records] == [u for u, _ in b.sessions[rec]]
        for r, (_, pages) in zip(records, b.sessions[rec], strict=True):
            assert r["recommender"] == rec and 1 <= len(r["pages"]) <= len(pages)
            assert r["end"] == ("exit" if r["pages"][-1]["then"] == "exit" else "max_pages")
            # A session stops at its first exit.
            assert all(p["then"] == "next" for p in r["pages"][:-1])
            for p, shown in zip(r["pages"], pages, strict=False):
                assert {int(i) for i in p["watched"]} <= set(shown)
                assert all(1 <= v <= 5 for v in p["watched"].values())


def test_method_outputs_of_a_tiny_model(bundle: EvalBundle) -> None:
    cut = _cut(bundle)
    scorer = Scorer(tiny_lm(), cache_size=256)
    out = method_outputs(METHODS["full"], scorer, Calibration(), cut, full=True)
    _assert_outputs(out, cut, full=True)
    assert out["tokens"] == scorer.stats.tokens > 0 and out["seconds"] >= 0


def test_sessions_browse_as_simulate_does(bundle: EvalBundle) -> None:
    """Simulated sessions sample at the simulator's temperature, seeded: the same seed gives
    the same sessions, another seed or greedy browsing other ones; lists and page replays are
    greedy whatever the temperature."""
    from agents.policy import DEFAULT_TEMPERATURE
    from evaluation.run import EvalConfig

    assert EvalConfig().temperature == DEFAULT_TEMPERATURE > 0
    cut = _cut(bundle)
    cut.lists = {1: cut.lists[1]}
    scorer = Scorer(tiny_lm(), cache_size=256)

    def run(**kw: float) -> dict:
        return method_outputs(METHODS["full"], scorer, Calibration(), cut, full=True,
                              needs=("lists", "pages", "sessions"), **kw)

    sampled, again, other, greedy = run(seed=0), run(seed=0), run(seed=1), run(temperature=0.0)
    assert sampled["sessions"] == again["sessions"]
    assert sampled["sessions"] != other["sessions"] and sampled["sessions"] != greedy["sessions"]
    for out in (other, greedy):
        assert out["lists"] == sampled["lists"] and out["pages"] == sampled["pages"]


def test_all_outputs_loads_each_weight_set_once(bundle: EvalBundle, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``all_outputs`` loads the weights from disk and gives what ``method_outputs`` gives on
    the same weights in memory (fp32, so the numbers agree)."""
    monkeypatch.setenv("ALIGNUSER_DTYPE", "fp32")
    lm = tiny_lm(seed=1)
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    cut = _cut(bundle)
    cut.lists = {1: cut.lists[1]}
    logged: list[str] = []
    got = all_outputs(cut, ["zero_shot"], {}, model=str(tmp_path / "tiny"), device="cpu",
                      log=logged.append)
    assert set(got) == {"zero_shot"} and any("zero-shot" in m for m in logged)
    _assert_outputs(got["zero_shot"], cut, full=False)
    ref = method_outputs(METHODS["zero_shot"], Scorer(lm), Calibration(), cut)
    np.testing.assert_allclose(np.concatenate(got["zero_shot"]["lists"][1]),
                               np.concatenate(ref["lists"][1]), atol=1e-3)
    assert [p["watched"] for p in got["zero_shot"]["pages"]] == [
        p["watched"] for p in ref["pages"]]


def test_a_method_cut_short_keeps_its_finished_parts(bundle: EvalBundle) -> None:
    """Each list ratio and the held-out pages are committed as they finish; answers resumed
    from the first commit equal the uninterrupted ones, and the kept ratio is not rescored."""
    cut, commits = _cut(bundle), []
    whole = method_outputs(METHODS["zero_shot"], HashScorer(), Calibration(), cut,
                           commit=commits.append)
    assert [(sorted(c["lists"]), "pages" in c) for c in commits] == [
        ([1], False), ([1, 9], False), ([1, 9], True)]
    assert commits[0]["seconds"] >= 0 and commits[0]["tokens"] == 0
    fresh, resumed = HashScorer(), HashScorer()
    method_outputs(METHODS["zero_shot"], fresh, Calibration(), cut)
    got = method_outputs(METHODS["zero_shot"], resumed, Calibration(), cut, kept=commits[0])
    assert 0 < resumed.stats.calls < fresh.stats.calls
    for out in (got, whole):
        out.pop("seconds"), out.pop("tokens")
    assert got == whole
    # answers of a run that did not ask for the pages hold them empty: they are computed
    got = method_outputs(METHODS["zero_shot"], HashScorer(), Calibration(), cut,
                         kept={**commits[1], "pages": [], "ratings": []})
    got.pop("seconds"), got.pop("tokens")
    assert got["pages"] and got == whole


def test_parts_hold_a_partial_method_until_its_answers_are_whole(tmp_path: Path) -> None:
    from evaluation.parts import Parts

    parts = Parts(tmp_path)
    parts.save_partial("sft", {"lists": {1: [[0.5]]}})
    assert parts.partial_outputs() == {"sft": {"lists": {1: [[0.5]]}}} and not parts.outputs()
    parts.save_outputs("sft", {"lists": {1: [[0.5]], 9: [[0.1]]}})
    assert parts.partial_outputs() == {} and set(parts.outputs()) == {"sft"}


def test_list_offset_shifts_the_list_scores(bundle: EvalBundle) -> None:
    """On a list's first page the offset adds to every score; later pages differ by more,
    because what the agent watched on earlier pages is its session there (browsed lists)."""
    cut = _cut(bundle)
    cut.lists = {1: [(u, items[:4], labels[:4]) for u, items, labels in cut.lists[1]]}
    hashed = HashScorer()
    base = method_outputs(METHODS["zero_shot"], hashed, Calibration(), cut)
    shifted = method_outputs(METHODS["zero_shot"], hashed,
                             Calibration(watch_offset=-7.0, list_offset=2.5), cut)
    watch = method_outputs(METHODS["zero_shot"], hashed, Calibration(watch_offset=-7.0), cut)
    b, s, w = (np.concatenate(o["lists"][1]) for o in (base, shifted, watch))
    np.testing.assert_allclose(s - b, 2.5)  # list_offset wins over watch_offset on lists
    np.testing.assert_allclose(w - b, -7.0)  # ...and watch_offset is the fallback
    assert all(not p["watched"] for p in watch["pages"])  # -7 on pages: nothing watched


def test_list_views_reach_the_agents_list_scores(bundle: EvalBundle) -> None:
    """``EvalConfig.list_views`` 2 (carried by the bundle) scores each list as given and
    reversed and averages, as ``list_scores(views=2)``; the progress bar counts both views."""
    cut = _cut(bundle)
    rows = [(u, items) for u, items, _ in cut.lists[1]]
    hashed = HashScorer()
    two = dataclasses.replace(cut, list_views=2)
    got = method_outputs(METHODS["zero_shot"], hashed, Calibration(), two,
                         needs={"lists"})["lists"][1]
    spec = METHODS["zero_shot"]
    want = list_scores(hashed, cut.perceiver, cut.personas, cut.histories, rows,
                       world_model=spec.world_model, evidence=spec.evidence, views=2)
    one = method_outputs(METHODS["zero_shot"], hashed, Calibration(), cut,
                         needs={"lists"})["lists"][1]
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want))
    assert not np.allclose(np.concatenate(got), np.concatenate(one))
    assert shown_pages(("lists", 1), cut.lists[1], 2) == 2 * shown_pages(("lists", 1),
                                                                         cut.lists[1])


# --- score and the report -----------------------------------------------------------------------

def test_report_has_every_section(scored: tuple[dict, dict, Path]) -> None:
    metrics, _, out = scored
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for title in SECTIONS:
        assert title in html and title in md
    assert "not run" not in md, "the quick preset runs every section"
    assert html.count("data:image/png;base64,") >= 3
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"discrimination", "rating", "next_action", "world_model",
                          "distributions", "discriminator", "judge", "selection", "paired",
                          "explain", "calibration", "cost", "sessions_by_recommender"}


def test_every_method_answers_every_ratio(scored: tuple[dict, dict, Path],
                                          bundle: EvalBundle) -> None:
    metrics, outputs, _ = scored
    rows = metrics["discrimination"]["rows"]
    assert {r["method"] for r in rows} == BASELINES | {"zero-shot", "AlignUSER"}
    for r in rows:
        assert r["m"] in ("1:1", "1:9")
        assert 0.0 <= r["f1"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
        if r["method"] in ("zero-shot", "AlignUSER"):
            assert r["threshold"] == 0.0  # agents keep their own cut: log-odds > 0
    rating = {r["method"]: r for r in metrics["rating"]["rows"]}
    assert "biased MF (ALS, 50)" in rating and rating["AlignUSER"]["rmse"] > 0
    actions = {r["method"] for r in metrics["next_action"]["rows"]}
    assert actions == {"popularity", "zero-shot", "AlignUSER"}
    assert metrics["world_model"]["n"] == len(bundle.transitions)
    assert metrics["calibration"] == {"zero-shot": Calibration().model_dump(),
                                      "AlignUSER": Calibration().model_dump()}
    assert set(metrics["cost"]) == {"zero-shot", "AlignUSER"}
    sel = metrics["selection"]
    tau = sel["simulated_vs_human"]["kendall_tau"]
    if len(set(sel["simulated_mean"].values())) == 1 or len(set(sel["truth_mean"].values())) == 1:
        assert math.isnan(tau), "a constant ranking has no rank correlation"
    else:
        assert -1.0 <= tau <= 1.0
    assert set(sel["truth_mean"]) == {"pop", "itemknn"}
    by_rec = {r["recommender"]: r for r in metrics["sessions_by_recommender"]["rows"]}
    assert {k: v["sessions"] for k, v in by_rec.items()} == {
        r: len(s) for r, s in outputs["full"]["sessions"].items()}


# --- small pieces -------------------------------------------------------------------------------

def test_threshold_maximises_accuracy() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    cut = _threshold(scores, labels)
    assert np.mean((scores >= cut) == labels) == 0.75
    assert _threshold(np.array([0.0, 1.0]), np.array([0, 1])) == 0.5


def test_next_state_fields_ignore_the_action_copy() -> None:
    from agents.text import NextState

    ns = NextState(ratings={2: 4}, ends=True, titles=["A (1990)"], genres=["Drama"])
    assert state_fields(ns.fields()) == {("rating", 2, 4), ("title", "A (1990)"),
                                         ("genre", "Drama")}


def test_next_state_f1_of_a_perfect_and_an_empty_world_model(bundle: EvalBundle) -> None:
    from agents.text import render_next_state
    from evaluation.micro import next_state

    trs = bundle.pages
    perfect = [render_next_state(tr.ratings, tr.next_views) for tr in trs]
    res = {r["fields"]: r for r in next_state(perfect, trs, {})["rows"]}
    assert res["all"]["world_model"] == 1.0 and res["end"]["world_model"] == 1.0
    # The baseline knows what ends a visit: an exit, or the last page the limit allows (a
    # visit cut there says next).
    assert any(tr.then == "next" and tr.next_views is None for tr in trs)
    assert res["end"]["baseline_this_page"] == 1.0
    empty = {r["fields"]: r for r in next_state([""] * len(trs), trs, {})["rows"]}
    assert empty["all"]["world_model"] == 0.0


def test_a_genre_mix_world_model_is_scored_on_what_it_names(bundle: EvalBundle) -> None:
    """A world model trained with ``--wm-format genres`` that gets ratings, end and genre mix
    right scores 1 on each of them and 0 on titles, which it never writes; what it generates
    after its next-page line is not read."""
    from agents.text import render_next_state
    from evaluation.micro import next_state

    trs = bundle.pages
    assert any(tr.next_views for tr in trs)
    right = [render_next_state(tr.ratings, tr.next_views, "genres")
             + "[1] rated 1\nnext page genres: Western\n" for tr in trs]
    res = {r["fields"]: r for r in next_state(right, trs, {})["rows"]}
    assert res["rating"]["world_model"] == res["end"]["world_model"] == 1.0
    assert res["genre"]["world_model"] == 1.0 and res["title"]["world_model"] == 0.0
    assert 0.0 < res["all"]["world_model"] < 1.0


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


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_outputs_cli_refuses_a_bad_temperature(bad: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from evaluation.outputs import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "bundle.pkl"), str(tmp_path / "out.pkl"), "--temperature", bad])
    assert exit_.value.code == 2 and "--temperature" in capsys.readouterr().err
    assert not (tmp_path / "out.pkl").exists()
