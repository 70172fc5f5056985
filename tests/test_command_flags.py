"""Flags generated from the command configs: each option's help and default come from its field,
a flag left out gives the field's default, and a bad value is refused before any data loads.
Also the one scorer loader that `alignuser simulate` and the LangGraph run context share."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from alignuser import cli
from alignuser.commands import RUN_FLAGS
from alignuser.config import DataInfoConfig
from alignuser.simulate_flags import given_fields
from evaluation.run import EvaluateRunConfig
from graph.build import policy_scorer
from graph.context import AgentContext, DepsBuilder


def _command(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize(("command", "model"), [("evaluate", EvaluateRunConfig),
                                                ("data", DataInfoConfig)])
def test_every_field_is_a_flag_with_its_description(command: str, model: type) -> None:
    options = {a.dest: a for a in _command(command)._actions if a.option_strings}
    for name, field in model.model_fields.items():
        action = options[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert field.description.replace("%", "%%") in action.help, name


def test_evaluate_flags_left_out_give_the_config_defaults() -> None:
    args = cli.build_parser().parse_args(["evaluate"])
    run = EvaluateRunConfig(**given_fields(args, EvaluateRunConfig))
    assert run == EvaluateRunConfig()
    assert run.model == "default" and run.device == "auto"
    assert run.method_names() == ["zero_shot", "sft", "wm_policy", "full", "full_no_memory",
                                  "full_no_wm"]


def test_evaluate_flags_given_reach_the_config() -> None:
    args = cli.build_parser().parse_args(
        ["evaluate", "--methods", "zero_shot,full", "--device", "cpu", "--sections",
         "cost", "--judge-model", "fake:judge", "--outputs", "answers.pkl", "--sft-checkpoint",
         "sft"])
    run = EvaluateRunConfig(**given_fields(args, EvaluateRunConfig))
    assert run.method_names() == ["zero_shot", "full"] and run.device == "cpu"
    assert (run.sections, run.judge_model, run.outputs, run.sft_checkpoint) == (
        "cost", "fake:judge", "answers.pkl", "sft")
    assert run.checkpoint is None and run.prepare_only is None


def test_a_resumed_run_reads_back_every_run_setting_but_where_it_runs() -> None:
    """What an evaluate run computes comes back on --resume; where (--prepare-only, the Ray
    backend) is given anew, so a run killed on one backend may go on on another."""
    assert set(EvaluateRunConfig.model_fields) - set(RUN_FLAGS) == {
        "prepare_only", "backend", "address", "concurrency"}
    assert RUN_FLAGS[:6] == ("dataset", "split_kind", "split_valid_frac", "split_test_frac",
                             "split_valid_time", "split_test_time")


def test_data_info_flags(monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["data", "info"])
    assert DataInfoConfig(**given_fields(args, DataInfoConfig)) == DataInfoConfig()
    args = cli.build_parser().parse_args(["data", "info", "--trajectories",
                                          "--signal-users", "20"])
    assert DataInfoConfig(**given_fields(args, DataInfoConfig)) == DataInfoConfig(
        trajectories=True, signal_users=20)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the flags were checked")

    monkeypatch.setattr("alignuser.config.load_world", refuse)
    assert cli.main(["data", "info", "--signal-users", "0"]) == 2
    assert "--signal-users 0: input should be greater than or equal to 1" in \
        capsys.readouterr().err


def test_policy_scorer_loads_nothing_for_policies_without_a_language_model() -> None:
    for policy in ("random", "popularity", "human_replay", "chat"):
        assert policy_scorer(policy, "default", None) is None


def test_a_missing_adapter_is_refused_with_the_callers_hint(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="got None; pass --checkpoint"):
        policy_scorer("aligned", "default", None, hint="pass --checkpoint")
    builder = DepsBuilder(lambda dataset: pytest.fail("no world is needed for a scorer"))
    assert builder.scorer(AgentContext(policy="popularity")) is None
    for _ in range(2):  # a refusal is not cached
        with pytest.raises(FileNotFoundError,
                           match=f"got {missing}; set context.checkpoint or use policy"):
            builder.scorer(AgentContext(policy="aligned", checkpoint=missing))
