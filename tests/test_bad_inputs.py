"""Bad inputs through the command line: each ends with exit status 2, one `error:` line on
stderr naming the problem, no traceback, and nothing written or changed on disk.

Every case is a process of its own, forked by ``tests/cli_driver.py`` after one import of the
stack (an ``alignuser`` start imports torch and LensKit: seconds each on 2 cores); a few run
through the installed executable as well to show it answers the same. All cases share one
workspace that is hashed before and after, so a case that leaves a partial run folder, a hidden
temporary one or a touched trace database fails. Commands that must succeed write into a second
folder. Data comes from the 6-user hand-made set; no LLM is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from alignuser.simulate import simulate
from tests.test_cli_errors import write_folder

ALIGNUSER = Path(sys.executable).with_name("alignuser")


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ALIGNUSER), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def _inter(folder: Path, rows: list[str]) -> Path:
    """``folder`` (a copy of the tiny set) with its interaction rows replaced."""
    inter = folder / f"{folder.name}.inter"
    head = inter.read_text().splitlines()[0]
    inter.write_text("\n".join([head, *rows]) + "\n")
    return folder


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace: the tiny set and broken copies, a finished simulation run, bad files."""
    from tests.conftest import tiny_dataset

    root = tmp_path_factory.mktemp("bad_inputs")
    tiny = write_folder(tiny_dataset.__wrapped__(), root / "tiny")
    good_rows = (tiny / "tiny.inter").read_text().splitlines()[1:]
    for name, rows in {"negts": [*good_rows[:3], "1\t9\t4\t-5"],
                       "zero": [*good_rows[:3], "1\t9\t0\t100"],
                       "minus": [*good_rows[:3], "1\t9\t-2\t100"],
                       "six": [*good_rows[:3], "1\t9\t6\t100"]}.items():
        shutil.copytree(tiny, root / name)
        for f in (root / name).iterdir():
            f.rename(f.with_name(f.name.replace("tiny", name)))
        _inter(root / name, rows)
    (root / "notes.txt").write_text("x")
    (root / "fake.zip").write_text("not a zip")
    (root / "full").mkdir()
    (root / "full" / "sessions.jsonl").write_text("{}")
    corrupt = root / "corrupt_adapter"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}junk")
    for name, content in {"broken_db": b"this is not sqlite" * 100, "empty_db": b""}.items():
        (root / name).mkdir()
        (root / name / "traces.sqlite").write_bytes(content)
    (root / "no_db").mkdir()
    from alignuser.config import DataConfig, SimulateConfig

    cfg = SimulateConfig(data=DataConfig(dataset=str(tiny)), recommenders=["pop"], agents=2,
                         pages=2, policy="random", seed=0)
    simulate(cfg, root / "run")
    return root


# Where a value names a file, {name} is that path inside the workspace.
CASES: list[tuple[str, list[str], str]] = [
    # simulate: flags, refused before any data loads
    ("sim-agents-0", ["simulate", "--agents", "0"], "--agents 0: input should be greater than"),
    ("sim-agents-neg", ["simulate", "--agents", "-3"], "--agents -3: input should be greater"),
    ("sim-pages-0", ["simulate", "--pages", "0"], "--pages 0: input should be greater than"),
    ("sim-pages-neg", ["simulate", "--pages", "-1"], "--pages -1: input should be greater than"),
    ("sim-temp-neg", ["simulate", "--temperature", "-1"], "--temperature -1.0: input should be"),
    ("sim-temp-nan", ["simulate", "--temperature", "nan"], "--temperature nan: input should be"),
    ("sim-seed-neg", ["simulate", "--seed", "-1"], "--seed -1: input should be greater than"),
    ("sim-rec-unknown", ["simulate", "--recommenders", "pop,svd"], "unknown recommender"),
    ("sim-rec-empty", ["simulate", "--recommenders", ""], "--recommenders"),
    ("sim-agents-abc", ["simulate", "--agents", "abc"], "argument --agents: invalid int value"),
    ("sim-policy-bad", ["simulate", "--policy", "smart"], "argument --policy: invalid choice"),
    ("sim-ckpt-missing", ["simulate", "--policy", "aligned", "--checkpoint", "{nope}"],
     "--checkpoint {nope} does not exist"),
    ("sim-ckpt-corrupt", ["simulate", "--policy", "aligned", "--checkpoint", "{corrupt_adapter}"],
     "is not a readable safetensors file"),
    ("sim-ckpt-file", ["simulate", "--policy", "aligned", "--checkpoint", "{notes.txt}"],
     "is a file; pass the adapter folder"),
    ("sim-out-file", ["simulate", "--output", "{notes.txt}"], "is an existing file"),
    ("sim-out-under-file", ["simulate", "--output", "{notes.txt}/run"], "is a file, not a folder"),
    ("sim-out-full", ["simulate", "--output", "{full}"], "is not empty; pass another --output"),
    ("sim-out-readonly", ["simulate", "--output", "{readonly}/run"], "no permission to write"),
    # simulate: refused once the data is read
    ("sim-agents-huge", ["simulate", "--dataset", "{tiny}", "--agents", "100000"],
     "--agents 100000 is more than the 6 users with test ratings in tiny"),
    # data readers
    ("data-missing", ["data", "info", "{nope}"], "nope"),
    ("data-fake-zip", ["data", "info", "{fake.zip}"], "not a zip"),
    ("data-neg-ts", ["recommenders", "eval", "--dataset", "{negts}"],
     "negts.inter line 5: timestamp -5 is negative"),
    ("data-rating-0", ["recommenders", "eval", "--dataset", "{zero}"],
     "zero.inter line 5: rating 0.0 out of range"),
    ("data-rating-neg", ["recommenders", "eval", "--dataset", "{minus}"],
     "minus.inter line 5: rating -2.0 out of range"),
    ("data-rating-6", ["recommenders", "eval", "--dataset", "{six}"],
     "six.inter line 5: rating 6.0 out of range"),
    # recommenders
    ("rec-k-0", ["recommenders", "eval", "--k", "0"], "--k 0: input should be greater than"),
    ("rec-k-neg", ["recommenders", "eval", "--k", "-5"], "--k -5: input should be greater"),
    ("rec-seed-neg", ["recommenders", "eval", "--seed", "-2"], "--seed -2: input should be"),
    ("rec-unknown", ["recommenders", "eval", "--recommenders", "pop,,als"], "unknown recomm"),
    # evaluate: everything refused before data or a model loads
    ("eval-ab-missing", ["evaluate", "--ab-results", "{missing.csv}"],
     "--ab-results {missing.csv} does not exist"),
    ("eval-outputs-missing", ["evaluate", "--outputs", "{nope}"], "--outputs {nope} does not"),
    ("eval-users-0", ["evaluate", "--users", "0"], "--users 0: input should be greater than"),
    ("eval-list-views-3", ["evaluate", "--list-views", "3"],
     "--list-views 3: input should be less than or equal to 2"),
    ("eval-ms-abc", ["evaluate", "--ms", "abc"], "--ms abc: expected comma-separated whole"),
    ("eval-methods", ["evaluate", "--methods", "full,oracle"], "unknown method(s) oracle"),
    ("eval-ray-only", ["evaluate", "--concurrency", "4"], "add --backend ray"),
    ("eval-ckpt-corrupt", ["evaluate", "--checkpoint", "{corrupt_adapter}"],
     "is not a readable safetensors file"),
    ("eval-out-file", ["evaluate", "--output", "{notes.txt}"], "is an existing file"),
    ("eval-out-readonly", ["evaluate", "--output", "{readonly}/run"], "no permission to write"),
    # train: checked before data or the model loads
    ("train-wm-0", ["train", "--wm-steps", "0", "--output", "{t1}"],
     "--wm-steps 0: stage all trains the world model and needs at least 1 step"),
    ("train-cr-0", ["train", "--stage", "policy", "--cr-steps", "0", "--output", "{t1}"],
     "--cr-steps 0: stage policy trains the policy"),
    ("train-cr-no-init", ["train", "--stage", "cr", "--output", "{t1}"],
     "--stage cr aligns an existing world model and needs --init-adapter"),
    ("train-batch-0", ["train", "--batch-size", "0", "--output", "{t1}"],
     "--batch-size 0: input should be greater than or equal to 1"),
    ("train-lr-0", ["train", "--lr", "0", "--output", "{t1}"], "--lr 0: input should be greater"),
    ("train-init-corrupt", ["train", "--stage", "cr", "--init-adapter", "{corrupt_adapter}",
                            "--output", "{t1}"], "--init-adapter: "),
    ("train-dtype", ["train", "--dtype", "int3", "--output", "{t1}"], "--dtype int3: input"),
    ("train-device", ["train", "--device", "tpu", "--output", "{t1}"], "--device tpu: input"),
    ("train-out-file", ["train", "--output", "{notes.txt}"], "is an existing file"),
    ("train-out-full", ["train", "--output", "{full}"], "is not empty; pass --resume"),
    ("train-out-readonly", ["train", "--output", "{readonly}/t"], "no permission to write"),
    ("train-resume-sim", ["train", "--resume", "--output", "{run}"],
     "is a simulate run, not a training folder"),
    ("train-resume-missing", ["train", "--resume", "--output", "{nope}"],
     "--resume: {nope} is not a training folder"),
    # trace
    ("trace-policy-alone", ["trace", "{run}", "--policy", "random"],
     "--policy re-runs an agent and needs --from-step"),
    ("trace-output-alone", ["trace", "{run}", "--output", "{t1}"], "--output re-runs an agent"),
    ("trace-corrupt-db", ["trace", "{broken_db}"], "cannot read its trace database"),
    ("trace-empty-db", ["trace", "{empty_db}"], "cannot read its trace database"),
    ("trace-no-db", ["trace", "{no_db}"], "has no traces.sqlite"),
    ("trace-agent", ["trace", "{run}", "pop:999"], "no agent 'pop:999'"),
    ("trace-step", ["trace", "{run}", "--step", "999"], "has steps 0.."),
    ("trace-from-step", ["trace", "{run}", "--from-step", "999", "--output", "{t1}"],
     "--from-step 999: pop:"),
    ("trace-from-neg", ["trace", "{run}", "--from-step", "-1"], "--from-step -1: pop:"),
]


def _fill(text: str, space: Path, named: dict[str, str]) -> str:
    """``{name}`` as ``named[name]`` or else the path of ``name`` in the workspace."""
    return re.sub(r"\{([^}]+)\}", lambda m: named.get(m[1], str(space / m[1])), text)


BROKEN_RECOMMENDER = '''
class Broken:
    """Fits, then fails on the first page it is asked for: an exception in the middle of a run."""

    name = "broken"

    def fit(self, train):
        return self

    def rank(self, user, k, exclude=(), session=()):
        raise ValueError("broken ranking: no page for user %d" % user)

    def scores(self, user, items, session=()):
        raise ValueError("broken ranking")


def make():
    return Broken()
'''


def _wide(folder: Path) -> Path:
    """3 users and 200 items: enough unseen items for 40 pages."""
    folder.mkdir()
    rows = [f"{u}\t{u * 10 + k}\t3\t{100 * k}" for u in (1, 2, 3) for k in range(5)]
    items = [f"{i}\tMovie {i}\t1990\tDrama" for i in range(1, 201)]
    (folder / "wide.inter").write_text("\n".join([
        "user_id:token\titem_id:token\trating:float\ttimestamp:float", *rows]) + "\n")
    (folder / "wide.item").write_text("\n".join([
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        *items]) + "\n")
    return folder


# Commands that must succeed, in this order, writing only into the second folder {ok}.
GOOD: dict[str, list[str]] = {
    "broken-run": ["simulate", "--dataset", "{tiny}", "--policy", "random", "--agents", "2",
                   "--pages", "2", "--recommenders", "broken_recommender:make", "--no-memory",
                   "--output", "{ok}/sim"],
    "same-output": ["simulate", "--dataset", "{tiny}", "--policy", "random", "--agents", "2",
                    "--pages", "2", "--recommenders", "pop", "--no-memory", "--output",
                    "{ok}/sim"],
    "pages-40": ["simulate", "--dataset", "{wide}", "--policy", "popularity", "--agents", "3",
                 "--pages", "40", "--recommenders", "pop", "--no-memory", "--output",
                 "{ok}/long"],
    "branch": ["trace", "{run}", "--from-step", "3", "--policy", "popularity",
               "--output", "{ok}/branch"],
}


@pytest.fixture(scope="module")
def outcomes(space: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[str]]:
    """Every case and good command run once; and the workspace paths any of them changed."""
    # root may write anywhere but where the kernel says no: /proc/sys is read-only for all
    readonly = "/proc/sys" if os.geteuid() == 0 else str(space / "locked")
    if os.geteuid() != 0:
        (space / "locked").mkdir(mode=0o500, exist_ok=True)
    side = tmp_path_factory.mktemp("side")
    (side / "broken_recommender.py").write_text(BROKEN_RECOMMENDER)
    _wide(side / "wide")
    (side / "ok").mkdir()
    (side / "logs").mkdir()
    named = {"readonly": readonly, "ok": str(side / "ok"), "wide": str(side / "wide")}
    before = snapshot(space)
    cases = {cid: [_fill(a, space, named) for a in argv]
             for cid, argv in [*((c, a) for c, a, _ in CASES), *GOOD.items()]}
    job = json.dumps({"cwd": str(space), "logs": str(side / "logs"), "cases": cases})
    proc = subprocess.run([sys.executable, "-m", "tests.cli_driver"], input=job, text=True,
                          capture_output=True, timeout=900, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "PYTHONPATH": str(side)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    after = snapshot(space)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return {"done": done, "ok": side / "ok"}, changed


@pytest.mark.parametrize(("cid", "expect"), [(c, e) for c, _, e in CASES],
                         ids=[c for c, _, _ in CASES])
def test_bad_input(cid: str, expect: str, space: Path, outcomes: tuple) -> None:
    result, changed = outcomes
    proc = result["done"][cid]
    err = proc["stderr"].strip()
    assert proc["status"] == 2, (proc["status"], err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert _fill(expect, space, {}) in err, err
    assert not changed, f"the failed commands wrote or changed {changed}"


# Cases refused only once the data is read; every other one must fail before any data loads.
AFTER_DATA = {"sim-agents-huge", "data-missing", "data-fake-zip", "data-neg-ts", "data-rating-0",
              "data-rating-neg", "data-rating-6"}


def test_refused_before_any_data_loads(space: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The same command lines in process, with data loading made to fail the test."""
    from alignuser import cli

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the input was checked")

    monkeypatch.setattr("alignuser.config.load_world", refuse)
    for cid, argv, expect in CASES:
        if cid in AFTER_DATA:
            continue
        capsys.readouterr()
        try:
            status = cli.main([_fill(a, space, {"readonly": "/proc/sys"}) for a in argv])
        except SystemExit as exc:  # argparse's own usage errors
            status = exc.code
        err = capsys.readouterr().err
        assert status == 2 and _fill(expect, space, {}) in err, (cid, err)


def test_enough_cases() -> None:
    assert len(CASES) >= 40 and len({c for c, _, _ in CASES}) == len(CASES)


def test_a_failed_run_leaves_nothing_and_blocks_nothing(outcomes: tuple) -> None:
    """An exception in the middle of a simulation removes its unfinished folder; the same
    ``--output`` then works."""
    result, _ = outcomes
    broken, again = result["done"]["broken-run"], result["done"]["same-output"]
    assert broken["status"] == 2 and "Traceback" not in broken["stderr"]
    last = broken["stderr"].strip().splitlines()[-1]  # after the progress bar it interrupts
    assert last.startswith("error: broken ranking: no page for user")
    assert again["status"] == 0, again["stderr"][-2000:]
    ok = result["ok"]
    assert sorted(p.name for p in ok.iterdir()) == sorted(["sim", "long", "branch"])
    assert json.loads((ok / "sim" / "manifest.json").read_text())["config"]["recommenders"] \
        == ["pop"]


def test_forty_pages_run(outcomes: tuple) -> None:
    result, _ = outcomes
    proc = result["done"]["pages-40"]
    assert proc["status"] == 0, proc["stderr"][-2000:]
    sessions = [json.loads(line) for line in
                (result["ok"] / "long" / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 3 and all(1 <= len(s["pages"]) <= 40 for s in sessions)


def test_trace_branch_goes_to_its_own_run(outcomes: tuple, space: Path) -> None:
    """The branch holds the copied history plus the replay; the recorded run is unchanged
    (``test_bad_input`` checks its bytes, a rejected replay included)."""
    result, changed = outcomes
    proc = result["done"]["branch"]
    assert proc["status"] == 0, proc["stderr"][-2000:]
    branch = result["ok"] / "branch"
    manifest = json.loads((branch / "manifest.json").read_text())
    assert manifest["kind"] == "trace" and manifest["source"] == str(space / "run")
    assert manifest["config"]["policy"] == "popularity" and manifest["from_step"] == 3
    pages = json.loads((branch / "branch.json").read_text())["pages"]
    assert pages and pages == json.loads(proc["stdout"][proc["stdout"].index("["):])
    count = "SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?"
    with sqlite3.connect(branch / "traces.sqlite") as conn:
        branched = conn.execute(count, (manifest["thread"],)).fetchone()[0]
    with sqlite3.connect(space / "run" / "traces.sqlite") as conn:
        recorded = conn.execute(count, (manifest["thread"],)).fetchone()[0]
    assert branched > recorded and not changed


@pytest.mark.parametrize("cid", ["sim-agents-0", "train-batch-0", "eval-ab-missing"])
def test_the_executable_answers_alike(cid: str, outcomes: tuple, space: Path) -> None:
    """The installed script, not only the forked driver, gives the same line and status."""
    argv = [_fill(a, space, {}) for a in next(a for c, a, _ in CASES if c == cid)]
    proc = run(argv, space)
    forked = outcomes[0]["done"][cid]
    assert proc.returncode == forked["status"] == 2
    assert proc.stderr == forked["stderr"] and not (space / "t1").exists()


def test_help_and_version_are_fast(tmp_path: Path) -> None:
    """``alignuser --help`` imports no command; the table it prints is the full parser's."""
    from alignuser.cli import build_parser
    from alignuser.entry import version

    t0 = time.perf_counter()
    proc = run(["--help"], tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0 and seconds < 1.0, seconds
    assert proc.stdout == build_parser().format_help()
    proc = run(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"alignuser {version()}"
    assert version() == metadata.version("alignuser")


def test_every_option_has_help_and_shows_its_default() -> None:
    import argparse

    from alignuser.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = command.format_help()
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.default is argparse.SUPPRESS:
                continue
            assert action.help, (name, action.dest)
            if action.option_strings:
                shown = formatter._get_help_string(action) or ""
                assert "default" in shown.lower(), (name, action.option_strings, shown)
        assert "--wm-steps" not in text or "(default: 100)" in " ".join(text.split())
