"""`alignuser evaluate` as registered sections: a chosen subset runs alone and computes only the
answers it reads; answers and sections are committed as they finish, so a run killed with
SIGKILL resumes (``--resume``) to the metrics an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from agents.decide import Calibration
from agents.llm import tiny_lm
from agents.scorer import ScorerStats
from agents.world import World
from alignuser.cli import main
from evaluation.micro import slot_features
from evaluation.outputs import METHODS, EvalBundle, method_outputs
from evaluation.parts import Parts
from evaluation.run import EvalConfig, build_bundle, score
from evaluation.sections import NO_PAIRS, REGISTRY, needs, paired_rows, paired_table, select
from simulator.data import Dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALIGNUSER = str(Path(sys.executable).with_name("alignuser"))


class HashScorer:
    """Deterministic pseudo log-probs from a hash of each (prefix, context, target)."""

    def __init__(self) -> None:
        self.stats = ScorerStats()

    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        return [-(zlib.crc32(f"{prefix}|{c}|{t}".encode()) % 1000) / 250 for c, t in options]

    def score_many(self, requests):
        return [self.score(p, o) for p, o in requests]

    def generate_many(self, prompts, max_new_tokens: int = 64, batch: int = 64,
                      stop: str | None = None) -> list[str]:
        out = "[1] rated 4\nnext page: none, the session ends\n"
        return [out.split(stop)[0] if stop else out for _ in prompts]


def _report_sections(md: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in md.split("\n## ")[1:]}


def test_a_subset_of_sections_runs_alone_and_resumes_from_its_parts(
        small_world: World, quick_bundle: EvalBundle, tmp_path: Path) -> None:
    names = select("selection,discrimination")
    assert names == ["discrimination", "selection"] and needs(names) == {"lists", "sessions"}
    hashed = HashScorer()
    bundle, cfg = quick_bundle, EvalConfig.quick()
    outputs = {n: method_outputs(METHODS[n], hashed, Calibration(), bundle, full=n == "full",
                                 needs=needs(names)) for n in ("zero_shot", "full")}
    full = outputs["full"]
    assert full["pages"] == [] and full["ratings"] == [] and "next_state" not in full
    assert set(full["sessions"]) == set(bundle.sessions)
    assert [len(s) for s in full["lists"][9]] == [20] * len(bundle.lists[9])

    def no_judge():
        raise AssertionError("the judge is loaded only for the sessions section")

    parts = Parts(tmp_path)
    metrics = score(small_world, bundle, outputs, cfg, tmp_path, {"seed": 0},
                    log=lambda m: None, sections=names, parts=parts, make_judge=no_judge)
    assert set(metrics) == {"setup", "discrimination", "paired", "selection"}
    assert metrics["selection"]["answer"]["simulation"]["recommender"] in ("pop", "itemknn")
    report = _report_sections((tmp_path / "report.md").read_text())
    ran = {"Which recommender to ship", "Setup", "Preference discrimination",
           "Recommender selection", "Paired differences"}
    for title, body in report.items():
        assert body.rstrip().endswith("not run") == (title not in ran), title
    assert sorted(p.name for p in parts.dir.glob("section-*.json")) == [
        "section-discrimination.json", "section-selection.json"]
    # Committed sections are read back, not recomputed: with no answers at all a recomputed
    # discrimination would have no agent rows.
    logged: list[str] = []
    again = score(small_world, bundle, {}, cfg, tmp_path, {"seed": 0}, log=logged.append,
                  sections=names, parts=parts)
    assert {k: v for k, v in again.items() if k != "setup"} == {
        k: v for k, v in metrics.items() if k != "setup"}
    assert logged == [f"{n}: kept from the interrupted run" for n in names]


def test_the_configured_simulator_runs_the_sessions_and_is_paired_against(
        small_world: World, quick_bundle: EvalBundle, tmp_path: Path) -> None:
    """``EvalConfig.simulator``: the policy-only agent can simulate the sessions and rank the
    recommenders while the full adapter is not in the run; it has no world model, so no next
    states are generated for it."""
    names = select("discrimination,selection,world_model")
    cfg = EvalConfig.quick(simulator="sft")
    outputs = {n: method_outputs(METHODS[n], HashScorer(), Calibration(), quick_bundle,
                                 full=n == cfg.simulator, needs=needs(names))
               for n in ("zero_shot", "sft")}
    assert set(outputs["sft"]["sessions"]) == set(quick_bundle.sessions)
    assert "sessions" not in outputs["zero_shot"] and "next_state" not in outputs["sft"]
    metrics = score(small_world, quick_bundle, outputs, cfg, tmp_path, {"seed": 0},
                    log=lambda m: None, sections=names, parts=Parts(tmp_path))
    assert "world_model" not in metrics
    assert metrics["selection"]["answer"]["simulation"]["recommender"] in ("pop", "itemknn")
    versus = {(r["method"], r["versus"]) for r in metrics["paired"]["rows"]}
    assert (METHODS["zero_shot"].label, METHODS["sft"].label) in versus


def test_a_simulator_outside_the_methods_is_a_clear_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--preset", "quick", "--methods", "zero_shot",
                 "--simulator", "sft"]) == 2
    err = capsys.readouterr().err
    assert "--simulator sft: that method is not evaluated (--methods gives zero_shot)" in err


def test_every_registered_section_names_what_it_reads() -> None:
    assert list(REGISTRY) == select(None) == select("")
    assert needs(REGISTRY) == {"lists", "pages", "next_state", "sessions"}
    assert needs(["calibration", "cost"]) == set()


def test_unknown_section_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--preset", "quick", "--sections", "discrimination,telepathy"]) == 2
    err = capsys.readouterr().err
    assert "unknown section(s) telepathy; known: discrimination," in err
    assert err.count("\n") == 1


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def error(argv: list[str]) -> str:
        assert main(["evaluate", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "nothing to resume" in error(["--resume", str(tmp_path / "gone")])
    staging = tmp_path / ".run.incomplete-999999999"
    staging.mkdir()
    assert "no readable evaluate manifest" in error(["--resume", str(tmp_path / "run")])
    flags = {"preset": "quick", "users": None, "methods": "zero_shot", "sections": None}
    (staging / "manifest.json").write_text(json.dumps({"kind": "evaluate", "flags": flags}))
    err = error(["--resume", str(tmp_path / "run"), "--users", "5", "--methods", "full"])
    assert "flags differ from the run's: --users 5 (the run has the default); --methods full " \
           "(the run has zero_shot)" in err
    assert "cannot be combined with --prepare-only" in error(
        ["--resume", str(tmp_path / "run"), "--prepare-only", str(tmp_path / "b.pkl")])
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--resume", str(tmp_path / "run"), "--overwrite"])
    assert stop.value.code == 2
    assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err
    assert f"has an unfinished evaluate run ({staging.name}); pass --resume" in error(
        ["--output", str(tmp_path / "run")])
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text("{}")
    assert "already a complete evaluate run" in error(["--resume", str(done)])
    assert "is not empty" in error(["--output", str(done)])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("")
    assert "not a run folder" in error(["--output", str(tmp_path / "notes"), "--overwrite"])


# --- a real process killed and resumed ----------------------------------------------------------

def _write_atomic_dataset(world: World, folder: Path) -> Path:
    """``small_world``'s 40 users as a RecBole atomic folder a subprocess can load."""
    ds: Dataset = world.ds
    folder.mkdir()
    r = ds.ratings
    (folder / f"{folder.name}.inter").write_text("\n".join(
        ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
        + [f"{u}\t{i}\t{x:g}\t{t}" for u, i, x, t in zip(r["user"], r["item"], r["rating"],
                                                         r["timestamp"], strict=True)]) + "\n")
    (folder / f"{folder.name}.item").write_text("\n".join(
        ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        + [f"{it.id}\t{it.title}\t{it.year or ''}\t{' '.join(it.genres)}"
           for it in ds.items.values()]) + "\n")
    return folder


def _comparable(run: Path) -> dict:
    """metrics.json less what differs between any two runs: wall times and command lines."""
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("command", "scoring_wall_time_s", "wall_time_s"):
        metrics["setup"].pop(key)
    for cost in metrics["cost"].values():
        cost.pop("seconds")
    return metrics


def kill_once_committed(run: subprocess.Popen, output: Path, part: str) -> Path:
    """SIGKILL an evaluate process writing to ``output`` as soon as its staged folder holds
    ``parts/<part>``; the staged folder it leaves behind."""
    deadline = time.monotonic() + 120
    pattern = f".{output.name}.incomplete-*/parts/{part}"
    while not list(output.parent.glob(pattern)):
        assert run.poll() is None, run.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {part} committed in 120 s"
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL and not output.exists()
    [staging] = output.parent.glob(f".{output.name}.incomplete-*")
    return staging


def test_a_killed_evaluate_resumes_to_the_uninterrupted_metrics(small_world: World,
                                                                tmp_path: Path) -> None:
    """SIGKILL once the first method's answers are committed, then ``--resume``: the answers
    are kept, the rest is computed, and metrics.json equals an uninterrupted run's."""
    lm = tiny_lm(seed=1)
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    data = _write_atomic_dataset(small_world, tmp_path / "ml40")
    env = {**os.environ, "ALIGNUSER_THREADS": "1", "ALIGNUSER_DTYPE": "fp32"}
    argv = [ALIGNUSER, "evaluate", "--preset", "quick", "--ms", "1", "--next-action-pages", "2",
            "--methods", "zero_shot", "--model", str(tmp_path / "tiny"), "--dataset", str(data)]

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([*argv, "--output", str(tmp_path / name)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    whole, killed = start("whole"), start("killed")  # side by side: two cores
    staging = kill_once_committed(killed, tmp_path / "killed", "outputs-zero_shot.pkl")
    kept = (staging / "parts" / "outputs-zero_shot.pkl").read_bytes()
    assert whole.wait(timeout=180) == 0, whole.communicate()[1][-2000:]

    resumed = subprocess.run([ALIGNUSER, "evaluate", "--resume", str(tmp_path / "killed")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "zero-shot: answers kept from the interrupted run" in resumed.stdout
    assert (tmp_path / "killed" / "parts" / "outputs-zero_shot.pkl").read_bytes() == kept
    assert not list(tmp_path.glob(".killed.incomplete-*"))
    setup = json.loads((tmp_path / "whole" / "metrics.json").read_text())["setup"]
    # The invocation's wall time covers loading and the answers, not only the scoring.
    assert setup["wall_time_s"] > setup["scoring_wall_time_s"] >= 0, setup
    assert "not recorded" not in (tmp_path / "whole" / "report.md").read_text()
    got, want = _comparable(tmp_path / "killed"), _comparable(tmp_path / "whole")
    assert got["discrimination"]["rows"] and "next_action" in got
    assert got == want


def test_the_attribution_explains_the_most_trained_agent_in_the_run(
        small_world: World, quick_bundle: EvalBundle, tmp_path: Path) -> None:
    """A run without the full agent still says what its trained agent's decisions use."""
    outputs = {n: method_outputs(METHODS[n], HashScorer(), Calibration(), quick_bundle,
                                 needs=needs(["next_action"])) for n in ("zero_shot", "sft")}
    metrics = score(small_world, quick_bundle, outputs, EvalConfig.quick(), tmp_path,
                    {"seed": 0}, log=lambda m: None, sections=["next_action"])
    assert metrics["explain"]["note"].startswith(f"regression of {METHODS['sft'].label}'s")
    assert {r["group"] for r in metrics["explain"]["rows"]} >= {
        "popularity", "collaborative match", "other items on the page"}
    del outputs["sft"]
    metrics = score(small_world, quick_bundle, outputs, EvalConfig.quick(), tmp_path,
                    {"seed": 0}, log=lambda m: None, sections=["next_action"])
    assert "explain" not in metrics


def test_the_attribution_measures_the_pull_of_the_page_mates(quick_bundle: EvalBundle) -> None:
    """Each slot's neighbours feature is the other slots' mean match, never its own."""
    tr = next(t for t in quick_bundle.pages if len({v.match for v in t.views}) > 1)
    rows = slot_features(tr)
    m = [float(v.match or 0) for v in tr.views]
    for k, row in enumerate(rows):
        assert row["match"] == m[k]
        assert row["page_mates_match"] == pytest.approx((sum(m) - m[k]) / (len(m) - 1))


def test_held_out_pages_pair_each_agent_against_the_simulating_one(
        small_world: World, quick_bundle: EvalBundle, tmp_path: Path) -> None:
    """The ablations' page answers are paired per user against the full agent's: the mean
    difference is that of the users' mean Jaccard and exact agreement, with a CI around it."""
    cfg = EvalConfig.quick(next_action_users=3, next_action_pages=8)
    bundle = build_bundle(small_world, cfg)
    outputs = {n: method_outputs(METHODS[n], HashScorer(), Calibration(), bundle,
                                 needs=needs(["next_action"])) for n in ("sft", "full")}
    metrics = score(small_world, bundle, outputs, cfg, tmp_path, {"seed": 0},
                    log=lambda m: None, sections=["next_action"])
    rows = metrics["paired_pages"]["rows"]
    sft, full = METHODS["sft"].label, METHODS["full"].label
    assert [(r["method"], r["versus"], r["metric"]) for r in rows] == [
        (sft, full, "jaccard"), (sft, full, "exact")]

    def user_means(name: str, metric: str) -> dict[int, float]:
        per: dict[int, list[float]] = {}
        for tr, p in zip(bundle.pages, outputs[name]["pages"], strict=True):
            t, w = set(tr.ratings), set(p["watched"])
            value = (t == w) if metric == "exact" else (len(t & w) / len(t | w) if t | w else 1.0)
            per.setdefault(tr.user, []).append(float(value))
        return {u: sum(v) / len(v) for u, v in per.items()}

    for r in rows:
        a, b = user_means("sft", r["metric"]), user_means("full", r["metric"])
        want = sum(a[u] - b[u] for u in a) / len(a)
        assert r["n"] == len(a) == len({tr.user for tr in bundle.pages}) > 1
        assert r["mean_diff"] == pytest.approx(want)
        assert r["lo"] <= r["mean_diff"] <= r["hi"]
    assert "Paired differences on held-out pages" in (tmp_path / "report.md").read_text()
    # Nothing to pair against without the simulating agent; no CI from one user's pages.
    del outputs["full"]
    metrics = score(small_world, bundle, outputs, cfg, tmp_path / "alone", {"seed": 0},
                    log=lambda m: None, sections=["next_action"])
    assert "paired_pages" not in metrics
    outputs = {n: method_outputs(METHODS[n], HashScorer(), Calibration(), quick_bundle,
                                 needs=needs(["next_action"])) for n in ("sft", "full")}
    metrics = score(small_world, quick_bundle, outputs, EvalConfig.quick(), tmp_path / "one",
                    {"seed": 0}, log=lambda m: None, sections=["next_action"])
    assert len({tr.user for tr in quick_bundle.pages}) == 1
    assert metrics["paired_pages"] == {"rows": [], "note": NO_PAIRS}
    assert metrics["next_action"]["rows"]


def test_a_pair_needs_two_users_for_its_interval() -> None:
    """One user in common gives no bootstrap CI: the pair has no row and the table says why,
    so an evaluation of one user still writes its report."""
    cfg = EvalConfig.quick()
    per_user = {"a": {"pages": {1: {"jaccard": 0.5}, 2: {"jaccard": 0.25}}},
                "b": {"pages": {1: {"jaccard": 0.25}, 3: {"jaccard": 1.0}}},
                "c": {"pages": {1: {"jaccard": 0.0}, 2: {"jaccard": 0.0}}}}
    assert paired_rows(per_user, [("a", "b")], {"pages": ""}, ("jaccard",), cfg) == []
    rows = paired_rows(per_user, [("a", "b"), ("a", "c")], {"pages": ""}, ("jaccard",), cfg)
    assert [(r["method"], r["versus"], r["n"]) for r in rows] == [("a", "c", 2)]
    assert rows[0]["mean_diff"] == pytest.approx(0.375)
    assert paired_table([]) == {"rows": [], "note": NO_PAIRS}
    assert paired_table(rows) == {"rows": rows}
