"""The chat policy with an offline scripted chat model: structured answers become decisions,
invalid answers and failed calls are retried then fall back on the record, pages are batched
and rate-limited, one spec builds policy and teacher, and `alignuser simulate --policy chat`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.messages import BaseMessage
from langchain_core.rate_limiters import InMemoryRateLimiter
from pydantic import ValidationError

from agents import prompts
from agents.chat import chat_model, is_import_path
from agents.chat_policy import ChatPolicy
from agents.policy import Decision, DecisionInput, decide_many
from agents.text import ItemView, page_prompt
from agents.world import World
from alignuser.config import SimulateConfig
from graph.build import make_runtime
from simulator.env import PageAction
from tests.fake_chat import ScriptedChatModel, page_number
from training.config import TrainConfig
from training.teacher import ChatTeacher, Option, make_teacher

ITEMS = [10, 20, 30]


def page(n: int = 1, items: list[int] = ITEMS) -> DecisionInput:
    views = [ItemView(id=i, title=f"Movie {i}", genres=("Drama",)) for i in items]
    return DecisionInput(user=7, page=n, items=items, persona_text="You like dramas.\n",
                         page_text=page_prompt(n, 8, views))


def scripted(answer: Any, **kw: Any) -> ScriptedChatModel:
    return ScriptedChatModel(answer=answer if callable(answer) else (lambda m: answer), **kw)


def test_valid_answer_becomes_the_decision() -> None:
    model = scripted({"watched": [{"slot": 2, "rating": 5}, {"slot": 1, "rating": 2}],
                      "then": "exit"})
    d = ChatPolicy(model).decide(page())
    assert d.action == PageAction(watched={20: 5, 10: 2}, then="exit")
    assert d.fallback is None and d.watch_scores == {1: 1.0, 2: 1.0, 3: 0.0}
    [call] = model.calls
    system, user = call
    assert system.content == prompts.CHAT_POLICY.format(n=3) and "[1] to [3]" in system.content
    assert user.content.startswith("You like dramas.\nPage 1 of at most 8.")
    assert "[3] Movie 30" in user.content


@pytest.mark.parametrize(("answer", "reason"), [
    ({"watched": [{"slot": 4, "rating": 3}], "then": "next"}, "[4] not on this page"),
    ({"watched": [{"slot": 0, "rating": 3}], "then": "next"}, "[0] not on this page"),
    ({"watched": [{"slot": 1, "rating": 6}], "then": "next"}, "less than or equal to 5"),
    ({"watched": [{"slot": 1, "rating": 0}], "then": "next"}, "greater than or equal to 1"),
    ({"watched": [{"slot": 2, "rating": 3}, {"slot": 2, "rating": 4}], "then": "exit"},
     "named more than once"),
    ({"watched": [], "then": "stay"}, "then"),
    ({"watched": []}, "then: Field required"),
    ("I would watch the first one.", "no structured answer"),
])
def test_invalid_answer_is_retried_then_falls_back(answer: Any, reason: str) -> None:
    model = scripted(answer)
    d = ChatPolicy(model, retries=2).decide(page())
    assert d.action == PageAction(watched={}, then="next")
    assert d.fallback is not None and d.fallback.startswith("3 invalid answer(s)")
    assert reason in d.fallback
    assert len(model.calls) == 3
    # Each retry repeats the page with the last error appended.
    for retry in model.calls[1:]:
        assert retry[:2] == model.calls[0]
        assert retry[2].content.startswith("Your last answer was not valid:")
        assert reason in retry[2].content


def test_a_retry_can_recover() -> None:
    def answer(messages: list[BaseMessage]) -> dict:
        rating = 9 if len(messages) == 2 else 3
        return {"watched": [{"slot": 3, "rating": rating}], "then": "next"}

    model = scripted(answer)
    d = ChatPolicy(model, retries=1).decide(page())
    assert d.fallback is None and d.action == PageAction(watched={30: 3}, then="next")
    assert len(model.calls) == 2 and "less than or equal to 5" in model.calls[1][-1].content


@pytest.mark.parametrize("retries", [0, 2])
def test_model_exceptions_fall_back(retries: int) -> None:
    model = scripted(ConnectionRefusedError("connection refused"))
    policy = ChatPolicy(model, retries=retries, fallback_then="exit")
    d = policy.decide(page())
    assert d.action == PageAction(then="exit")
    assert d.fallback == (f"{retries + 1} invalid answer(s); last: "
                          "ConnectionRefusedError: connection refused")
    assert len(model.calls) == retries + 1
    # The decision survives the graph state's JSON round trip with its reason.
    assert Decision.model_validate(d.model_dump(mode="json")).fallback == d.fallback


def per_page(messages: list[BaseMessage]) -> dict:
    """A different valid answer on every page, except page 3, which is always off the page."""
    n = page_number(messages)
    slot = 9 if n == 3 else n % 3 + 1
    return {"watched": [{"slot": slot, "rating": n % 5 + 1}],
            "then": "exit" if n % 2 == 0 else "next"}


def test_decide_many_batches_pages_with_bounded_concurrency() -> None:
    model = scripted(per_page, delay=0.05)
    inputs = [page(n) for n in range(1, 7)]
    decisions = decide_many(ChatPolicy(model, retries=2, max_concurrency=2), inputs)
    assert len(decisions) == 6
    for inp, d in zip(inputs, decisions, strict=True):
        if inp.page == 3:
            assert d.fallback is not None and "[9] not on this page" in d.fallback
            assert d.action == PageAction()
            continue
        assert d.fallback is None
        assert d.action == PageAction(watched={ITEMS[inp.page % 3]: inp.page % 5 + 1},
                                      then="exit" if inp.page % 2 == 0 else "next")
    # 6 first answers, then two retry rounds of the one failing page.
    assert len(model.calls) == 8
    assert sorted(page_number(c) for c in model.calls) == [1, 2, 3, 3, 3, 4, 5, 6]
    assert model.peak_in_flight == 2


def test_a_chat_population_keeps_requests_in_flight(small_world: World) -> None:
    """Agents wait on the chat model, so as many run at once as it may have requests open."""
    from graph.graph import build_graph
    from graph.runner import run_population

    model = ScriptedChatModel(answer=lambda m: {"watched": [], "then": "next"}, delay=0.05)
    policy = ChatPolicy(model, max_concurrency=3)
    deps = {"pop": make_runtime(small_world, "pop", "chat", chat=policy, max_pages=2)}
    users = small_world.sample_users(6, seed=0)
    sessions = run_population(build_graph("none", "off"), deps, users, progress=False)
    assert [len(s.pages) for s in sessions] == [2] * 6 and len(model.calls) == 12
    assert model.peak_in_flight == 3


def test_decide_many_loops_policies_without_a_batched_path() -> None:
    class One:
        name = "one"

        def __init__(self) -> None:
            self.pages: list[int] = []

        def decide(self, inp: DecisionInput) -> Decision:
            self.pages.append(inp.page)
            return Decision(action=PageAction(then="exit"))

    policy = One()
    assert [d.action.then for d in decide_many(policy, [page(1), page(2)])] == ["exit", "exit"]
    assert policy.pages == [1, 2]


def test_chat_model_from_a_factory_path_and_its_rate_limit() -> None:
    free = chat_model("tests.fake_chat:factory")
    assert isinstance(free, ScriptedChatModel) and free.rate_limiter is None
    capped = chat_model("tests.fake_chat:factory", rps=20)
    assert isinstance(capped.rate_limiter, InMemoryRateLimiter)
    policy = ChatPolicy(capped, max_concurrency=4)
    t0 = time.perf_counter()
    decisions = policy.decide_many([page(n) for n in range(1, 5)])
    elapsed = time.perf_counter() - t0
    assert all(d.fallback is None for d in decisions)
    assert elapsed >= 0.15, elapsed  # 4 requests at 20 per second, however many in flight
    with pytest.raises(ValueError, match="returned str, not a BaseChatModel"):
        chat_model("tests.fake_chat:not_a_model")
    with pytest.raises(ValueError, match="No module named 'tests.no_such_module'"):
        chat_model("tests.no_such_module:factory")
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        chat_model("tests.fake_chat:nothing")


def test_provider_specs_go_to_init_chat_model(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_import_path("tests.fake_chat:factory") and is_import_path("pkg.mod:make")
    for spec in ("ollama:llama3.1", "openai:gpt-4o-mini", "gpt-4o", "ollama:llama3.1:8b"):
        assert not is_import_path(spec), spec
    import langchain.chat_models

    seen: dict[str, Any] = {}

    def fake_init(spec: str, **kwargs: Any) -> ScriptedChatModel:
        seen.update(spec=spec, **kwargs)
        return ScriptedChatModel(answer=lambda m: "ok", **kwargs)

    monkeypatch.setattr(langchain.chat_models, "init_chat_model", fake_init)
    model = chat_model("ollama:llama3.1", rps=2.0, temperature=0.0)
    assert seen["spec"] == "ollama:llama3.1" and seen["temperature"] == 0.0
    assert seen["rate_limiter"] is model.rate_limiter
    assert isinstance(model.rate_limiter, InMemoryRateLimiter)


def test_the_same_spec_builds_the_teacher() -> None:
    teacher = make_teacher("chat", chat_spec="tests.fake_chat:teacher_factory")
    assert isinstance(teacher, ChatTeacher)
    views = [ItemView(id=i, title=f"Movie {i}") for i in ITEMS]
    text = teacher.reflect(views, ["Drama"], Option((1,), "next"), [Option((), "exit")],
                           "You like dramas.")
    assert text == "They like thrillers. The rest looked dull."
    [[prompt]] = teacher.model.chat_model.calls
    assert "A real person chose:\nwatch [1], then next" in prompt.content
    with pytest.raises(ValidationError, match="teacher chat needs --teacher-model"):
        TrainConfig(teacher="chat")
    assert TrainConfig(teacher="chat", teacher_model="ollama:llama3.1").teacher_model


def test_the_same_kind_of_model_judges_sessions() -> None:
    from evaluation.macro import judge, judge_label

    def verdict(messages: list[BaseMessage]) -> Any:
        text = str(messages[0].content)
        if "Movie 2" in text:  # out of range, then valid once told why
            return {"score": 2} if len(messages) > 1 else {"score": 9}
        if "Movie 3" in text:
            return {"score": 0}  # never valid: no score rather than a made-up one
        return {"score": 4}

    model = ScriptedChatModel(answer=verdict, tool_name="JudgeAnswer")
    sessions = [{"user": 1, "recommender": "pop", "pages": [
        {"page": 1, "items": [i], "watched": {str(i): 4}, "then": "exit"}]} for i in (1, 2, 3)]
    titles = {i: f"Movie {i}" for i in (1, 2, 3)}
    scores = judge(model, sessions, {1: "You like dramas."}, titles)
    assert scores[:2] == [4.0, 2.0] and np.isnan(scores[2])
    retried = [c for c in model.calls if len(c) > 1 and "Movie 2" in str(c[0].content)]
    assert len(retried) == 1 and "less than or equal to 5" in str(retried[0][-1].content)
    assert len(model.calls) == 3 + 2 + 1  # three asks; two retried; the third never valid
    assert judge_label(model) == {"judge": "chat model scripted", "local": False}


def test_policy_chat_needs_a_model_before_anything_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alignuser.cli import main
    from alignuser.config import make_policy

    with pytest.raises(ValidationError, match="policy chat needs --chat-model"):
        SimulateConfig(policy="chat")
    assert SimulateConfig(policy="chat", chat_model="ollama:llama3.1").chat_retries == 2
    with pytest.raises(ValidationError, match="chat_rps"):
        SimulateConfig(policy="chat", chat_model="x.y:z", chat_rps=0)
    with pytest.raises(ValueError, match="needs a chat model"):
        make_policy("chat", None)  # type: ignore[arg-type]
    capsys.readouterr()
    assert main(["simulate", "--policy", "chat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: policy chat needs --chat-model") and "\n" not in err
    # A spec that cannot be built is refused before data loads or a run directory exists.
    for spec, says in [("tests.no_such_module:factory", "No module named"),
                       ("nosuchprovider:some-model", "nosuchprovider")]:
        run = tmp_path / spec.split(":")[0]
        assert main(["simulate", "--policy", "chat", "--chat-model", spec, "--output",
                     str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and says in err and "\n" not in err, err
        assert not run.exists()


def test_cli_simulate_with_a_chat_policy(tmp_path: Path) -> None:
    from alignuser.cli import main

    run = tmp_path / "run"
    spec = "tests.fake_chat:factory"
    assert main(["simulate", "--policy", "chat", "--chat-model", spec, "--agents", "2",
                 "--pages", "2", "--recommenders", "pop", "--no-memory", "--chat-retries", "1",
                 "--chat-concurrency", "2", "--output", str(run)]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["chat_model"] == spec and manifest["config"]["chat_retries"] == 1
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 2
    for s in sessions:
        assert [p["page"] for p in s["pages"]] == [1, 2] and s["end"] == "max_pages"
        for p in s["pages"]:
            # The scripted model watches [1] and rates it 4 on every page.
            assert p["watched"] == {str(p["items"][0]): 4} and p["then"] == "next"
            assert p["fallback"] is None
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == spec and metrics["per_recommender"]["pop"]["fallback_pages"] == 0
