"""The evaluation protocol is chosen on the command line and recorded; presets size evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignuser.cli import build_parser, main, simulate_config
from alignuser.flags import data_config
from evaluation.run import PRESETS, EvalConfig, expected_seconds, setup_seconds
from simulator.split import SplitConfig


def test_split_flags_reach_every_command_config() -> None:
    parser = build_parser()
    args = parser.parse_args(["simulate", "--split", "global_time", "--valid-frac", "0.15",
                              "--test-time", "893000000"])
    split = simulate_config(args).data.split
    assert (split.kind, split.valid_frac, split.test_frac, split.test_time) == (
        "global_time", 0.15, 0.2, 893000000)
    for argv in (["recommenders", "eval"], ["evaluate"], ["data", "info"],
                 ["train", "--output", "x"]):
        args = parser.parse_args([*argv, "--split", "global_time"])
        assert data_config(args, dataset="ml-100k").split.kind == "global_time", argv
    assert data_config(parser.parse_args(["evaluate"])).split == SplitConfig()


def test_describe_names_the_protocol() -> None:
    assert SplitConfig().describe() == ("user_chrono: per-user chronological, each user's "
                                        "latest 20% test, the 10% before it valid")
    assert SplitConfig(kind="global_time", test_time=5).describe() == (
        "global_time: valid from the 70% quantile of timestamps, test from unix time 5")


def test_bad_split_is_one_line_before_data_loads(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "info", "--split", "global_time", "--valid-frac", "0.5",
                 "--test-frac", "0.6"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--test-frac 0.6: with valid_frac 0.5, valid_frac + test_frac must leave some " \
           "ratings for training" in err


def test_split_is_recorded_in_the_run_manifest(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["simulate", "--policy", "popularity", "--agents", "2", "--pages", "2",
                 "--recommenders", "pop", "--no-memory", "--split", "global_time",
                 "--output", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["data"]["split"]["kind"] == "global_time"
    assert manifest["split"]["protocol"].startswith("global_time: valid from the 70% quantile")
    assert set(manifest["split"]) == {"protocol", "train", "valid", "test"}


def test_presets_size_the_evaluation() -> None:
    assert set(PRESETS) == {"quick", "standard", "full"}
    assert build_parser().parse_args(["evaluate"]).preset == "standard"
    full = EvalConfig.of_preset("full")
    assert full == EvalConfig(preset="full") and full.users == 200
    standard = EvalConfig.of_preset("standard", users=2)
    assert (standard.preset, standard.users, standard.ms) == ("standard", 2, [1, 9])
    methods = ["zero_shot", "sft", "full"]
    times = [expected_seconds(EvalConfig.of_preset(p), methods) for p in PRESETS]
    assert times == sorted(times) and times[2] > 10 * times[1]
    assert expected_seconds(standard, methods) < expected_seconds(
        EvalConfig.of_preset("standard"), methods)
    assert expected_seconds(standard, ["zero_shot"]) < expected_seconds(standard, ["full"])
    # Answers no chosen section reads are not counted: lists alone cost less than everything,
    # and a run that reads nothing costs its setup.
    every = expected_seconds(full, methods)
    lists = expected_seconds(full, methods, {"lists"})
    assert setup_seconds(full) < lists < every
    assert expected_seconds(full, methods, set()) == setup_seconds(full)
    assert setup_seconds(standard) < setup_seconds(full)
    assert expected_seconds(full, methods, {"sessions"}) < expected_seconds(
        full, methods, {"sessions", "next_state"})
