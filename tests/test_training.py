"""The LoRA training package on a tiny random Llama: loss masking, learning, exact resume,
held-out hygiene of the training data, reflections and counterfactual alternatives."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from agents import text
from agents.llm import encode, tiny_lm
from agents.policy import Decision, DecisionInput, LLMPolicy
from agents.scorer import Scorer
from agents.transition import Example
from alignuser.config import World
from simulator.env import PageAction
from simulator.trajectories import experienced
from tests.training_examples import EXAMPLES, PERSONA, TINY_CFG, VIEWS, peft_lm, pool, transition
from training.batches import IGNORE, collate, example_losses, tokenize
from training.config import TrainConfig
from training.counterfactual import sample_alternatives
from training.pipeline import train_data
from training.rollout import fingerprint
from training.teacher import GroundedTeacher, Option
from training.trainer import Schedule, _lr, train_loop, validation_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_lm().tokenizer


# --- tokenisation and losses --------------------------------------------------------------------

def test_tokenize_masks_exactly_the_prompt(tok: Any) -> None:
    ex = EXAMPLES[0]
    prompt, target = encode(tok, list(ex.segments)), encode(tok, [ex.target])
    ids, labels = tokenize(tok, ex, max_len=2048)
    assert ids == prompt + target + [tok.eos_token_id]
    assert labels == [IGNORE] * len(prompt) + target + [tok.eos_token_id]
    assert tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE],
                      skip_special_tokens=True) == ex.target


def test_tokenize_cuts_the_prompt_from_the_left(tok: Any) -> None:
    ex = EXAMPLES[1]
    full_ids, full_labels = tokenize(tok, ex, max_len=2048)
    n_target = sum(lab != IGNORE for lab in full_labels)
    ids, labels = tokenize(tok, ex, max_len=n_target + 5)
    assert len(ids) == n_target + 5
    assert ids == full_ids[-len(ids):] and labels == full_labels[-len(ids):]
    assert labels[:5] == [IGNORE] * 5
    # A target longer than the budget keeps its start and one prompt token.
    ids, labels = tokenize(tok, ex, max_len=4)
    assert len(ids) == 4 and labels[0] == IGNORE
    assert labels[1:] == full_labels[len(full_labels) - n_target:][:3]


def test_batched_losses_equal_one_at_a_time() -> None:
    """Padding a batch must not change any example's loss."""
    lm = tiny_lm(seed=1)
    pad = lm.tokenizer.pad_token_id
    rows = [tokenize(lm.tokenizer, ex, 512) for ex in EXAMPLES[:3]]
    assert len({len(ids) for ids, _ in rows}) > 1  # lengths differ, so there is padding
    with torch.no_grad():
        batched = example_losses(lm.model, collate(rows, pad))
        alone = torch.cat([example_losses(lm.model, collate([r], pad)) for r in rows])
        # By hand: mean cross-entropy over the target tokens of one unpadded sequence.
        ids, labels = map(torch.tensor, rows[0])
        logits = lm.model(input_ids=ids[None]).logits[0, :-1]
        manual = torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE)
    assert torch.allclose(batched, alone, atol=1e-4)
    assert float(alone[0]) == pytest.approx(float(manual), abs=1e-4)


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    model, lm = peft_lm()
    pools, weights = {"policy": EXAMPLES}, {"policy": 1.0}
    before = validation_loss(model, lm.tokenizer, EXAMPLES, weights, 512)
    cfg = TrainConfig(batch_size=2, max_len=512, lr=1e-2, warmup=1, save_every=100)
    out = train_loop(model, lm.tokenizer, pools, weights, steps=8, out_dir=tmp_path, cfg=cfg,
                     progress=False)
    after = validation_loss(model, lm.tokenizer, EXAMPLES, weights, 512)
    assert out["steps"] == 8 and len(out["history"]) == 8
    assert all(h["tokens"] > 0 and h["s"] > 0 for h in out["history"])
    assert after < before - 0.2, (before, after)  # about 10.8 -> 10.3 nats
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").is_file()  # final save


def test_saving_an_adapter_asks_no_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters record their base as "default", which is no local folder: PEFT's default save
    then asks the Hub whether "default/config.json" exists. Every save of training says it
    keeps no embedding layers instead, so a save makes no network call."""
    def online(*args: object, **kwargs: object) -> None:
        raise AssertionError("an adapter save asked the Hub")

    monkeypatch.setattr("peft.utils.save_and_load.check_file_exists_on_hf_hub", online)
    model, lm = peft_lm()
    model.peft_config["default"].base_model_name_or_path = "default"
    cfg = TrainConfig(batch_size=2, max_len=512, lr=1e-2, warmup=1, save_every=1)
    train_loop(model, lm.tokenizer, {"policy": EXAMPLES}, {"policy": 1.0}, steps=2,
               out_dir=tmp_path, cfg=cfg, progress=False)
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").is_file()
    with pytest.raises(AssertionError, match="asked the Hub"):  # what the default save does
        model.save_pretrained(tmp_path / "plain")


def test_a_stage_ends_with_its_best_validation_weights(tmp_path: Path) -> None:
    model, lm = peft_lm()
    losses = iter([5.0, 3.0, 1.0, 2.0])  # validation at steps 0, 2, 4, 6: the best is step 4's
    cfg = TrainConfig(batch_size=2, max_len=512, lr=1e-2, warmup=1, save_every=100,
                      eval_every=2, patience=5)
    out = train_loop(model, lm.tokenizer, {"policy": EXAMPLES}, {"policy": 1.0}, steps=6,
                     out_dir=tmp_path, cfg=cfg, validate=lambda: next(losses), progress=False)
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "best" / "adapter_model.safetensors"))
    final = load_file(str(tmp_path / "checkpoint" / "adapter_model.safetensors"))  # step 6
    kept = _lora_state(model)
    assert out["kept_step"] == 4 and out["best_valid"] == 1.0
    names = [n for n in kept if "lora_B" in n]
    assert names
    for name in names:
        key = next(k for k in best if k.endswith(name.split("base_model.", 1)[-1]))
        assert torch.allclose(kept[name], best[key].to(kept[name].dtype), atol=1e-6)
    assert any(not torch.allclose(best[k], final[k]) for k in best)  # steps 5-6 moved on


def test_a_stage_no_step_improves_ends_on_its_starting_weights(tmp_path: Path) -> None:
    """The starting weights are validated first: when every later validation is worse (a
    stage that only harms the policy it continues) the stage ends where it began."""
    model, lm = peft_lm()
    start = _lora_state(model)
    losses = iter([1.0, 2.0, 3.0])  # steps 0, 2, 4
    cfg = TrainConfig(batch_size=2, max_len=512, lr=1e-2, warmup=1, save_every=100,
                      eval_every=2, patience=5)
    out = train_loop(model, lm.tokenizer, {"policy": EXAMPLES}, {"policy": 1.0}, steps=4,
                     out_dir=tmp_path, cfg=cfg, validate=lambda: next(losses), progress=False)
    assert out["kept_step"] == 0 and out["best_valid"] == 1.0 and out["steps"] == 4
    assert [h["step"] for h in out["history"] if "valid" in h] == [0, 2, 4]
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "checkpoint" / "adapter_model.safetensors"))  # step 4
    assert any(float(v.abs().sum()) > 0 for k, v in trained.items() if "lora_B" in k)
    kept = _lora_state(model)
    assert all(torch.equal(kept[k], start[k]) for k in start)  # lora_B back to its zeros


def test_a_stage_cut_by_its_budget_validates_its_last_step(tmp_path: Path) -> None:
    """A budget that ends the stage before its first ``eval_every`` still validates where it
    stopped, so the kept weights were checked; the loss curve skips the step-0 record."""
    from training.pipeline import _plot_curves

    model, lm = peft_lm()
    losses = iter([2.0, 1.0])
    cfg = TrainConfig(batch_size=2, max_len=512, lr=1e-2, warmup=1, save_every=100,
                      eval_every=50, time_budget_s=1e-9)
    out = train_loop(model, lm.tokenizer, {"policy": EXAMPLES}, {"policy": 1.0}, steps=100,
                     out_dir=tmp_path, cfg=cfg, validate=lambda: next(losses), progress=False)
    assert out["steps"] == 1 and out["kept_step"] == 1 and out["best_valid"] == 1.0
    assert out["history"][0] == {"step": 0, "valid": 2.0}
    _plot_curves({"policy": out}, tmp_path)
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


@pytest.mark.parametrize("stop", ["budget", "patience"])
def test_a_stage_that_stopped_early_resumes_as_stopped(tmp_path: Path, stop: str) -> None:
    """A stage ended by its time budget or its patience, then run again with ``--resume``
    (say, after a crash in the calibration that follows), keeps its steps and its best weights:
    the budget counts the seconds already spent and patience the checks since the best."""
    losses = iter([2.0, 1.0, 1.5, 1.6, 1.7, 1.8])
    extra = {"time_budget_s": 1e-9} if stop == "budget" else {"patience": 2, "eval_every": 1}
    cfg = TrainConfig(batch_size=2, max_len=512, lr=1e-2, warmup=1, save_every=1, **extra)
    kw: dict[str, Any] = dict(out_dir=tmp_path, cfg=cfg, validate=lambda: next(losses),
                              progress=False)
    model, lm = peft_lm()
    first = train_loop(model, lm.tokenizer, {"policy": EXAMPLES}, {"policy": 1.0}, 100, **kw)
    assert first["steps"] == (1 if stop == "budget" else 3) and first["kept_step"] == 1
    model, lm = peft_lm()
    again = train_loop(model, lm.tokenizer, {"policy": EXAMPLES}, {"policy": 1.0}, 100,
                       resume=True, **kw)
    assert again["steps"] == first["steps"] and again["history"] == first["history"]
    assert again["kept_step"] == 1 and again["best_valid"] == 1.0
    saved = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["spent"]
    # the stage's cost goes on from its save (seconds are reported to 0.1)
    assert saved["seconds"] > 0 and again["seconds"] >= round(saved["seconds"], 1)


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path: Path) -> None:
    pools = {"policy": EXAMPLES[:3], "wm": EXAMPLES[3:]}
    weights = {"policy": 1.0, "wm": 0.5}
    kw: dict[str, Any] = dict(cfg=TrainConfig(batch_size=2, max_len=512, lr=5e-3, warmup=2,
                                              seed=0, save_every=3), progress=False)

    whole, lm = peft_lm()
    assert TINY_CFG.lora_dropout > 0  # dropout draws random numbers: the RNG must resume too
    full = train_loop(whole, lm.tokenizer, pools, weights, 6, tmp_path / "a", **kw)

    cut, lm = peft_lm()
    part = train_loop(cut, lm.tokenizer, pools, weights, 6, tmp_path / "b", stop_after=3, **kw)
    assert part["steps"] == 3
    progress = json.loads((tmp_path / "b" / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == 3
    halfway = _lora_state(cut)

    resumed, lm = peft_lm()
    rest = train_loop(resumed, lm.tokenizer, pools, weights, 6, tmp_path / "b", resume=True,
                      **kw)
    def untimed(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "s"} for h in history]

    # same batches, same losses and tokens, steps 1..6; only the seconds differ
    assert untimed(rest["history"]) == untimed(full["history"])
    a, b = _lora_state(whole), _lora_state(resumed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert any(not torch.allclose(halfway[n], b[n]) for n in b)  # the resume did train


# --- the schedule -------------------------------------------------------------------------------

def test_schedule_batch_is_a_pure_function_of_seed_and_step() -> None:
    pools = {"policy": pool("policy", 5), "wm": pool("wm", 3), "cr": []}
    a, b = Schedule(pools, 3, seed=7), Schedule(pools, 3, seed=7)
    forward = [a.batch(s) for s in range(12)]
    backward = [b.batch(s) for s in reversed(range(12))][::-1]
    assert forward == backward
    assert a.batch(4) == forward[4]  # asking again changes nothing
    other = Schedule(pools, 3, seed=8)
    assert any(other.batch(s) != forward[s] for s in range(12))
    # Kinds alternate slot by slot (empty pools skipped) and each kind's epoch visits its whole
    # pool once.
    slots = [ex for batch in forward for ex in batch]
    assert [ex.kind for ex in slots[:6]] == ["policy", "wm"] * 3
    policy = [ex for ex in slots if ex.kind == "policy"]
    assert sorted(e.segments for e in policy[:5]) == sorted(e.segments for e in pools["policy"])
    assert sorted(e.segments for e in policy[5:10]) == sorted(e.segments
                                                             for e in pools["policy"])


# --- training data: which visits teach ---------------------------------------------------------

def test_min_history_keeps_exactly_the_visits_with_enough_earlier_ratings(
        small_world: World) -> None:
    trajs = small_world.trajectories("train", progress=False)
    train = small_world.split.train
    before = [int(((train["user"] == t.user) & (train["timestamp"] < t.start)).sum())
              for t in trajs]
    assert min(before) == 0 and max(before) >= 10  # the fixture has both kinds of visit
    for n in (0, 1, 10):
        kept = experienced(trajs, train, n)
        assert kept == [t for t, b in zip(trajs, before, strict=True) if b >= n]
    assert 0 < len(experienced(trajs, train, 10)) < len(trajs)
    cfg = TrainConfig(min_history=10, valid_examples=2, calibration_pages=4)
    assert {t.start for t in train_data(small_world, cfg).train} == {
        t.start for t in experienced(trajs, train, 10)}
    with pytest.raises(ValueError, match="lower --min-history"):
        train_data(small_world, TrainConfig(min_history=10**6))


# --- training data: no held-out leakage ---------------------------------------------------------

def _pairs(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return {(int(u), int(i)) for u, i in zip(frame["user"], frame["item"], strict=True)}


def test_training_data_never_holds_held_out_ratings(small_world: World) -> None:
    # Validation users: enough for early stopping and for the calibration pages (4 a user).
    # min_history=0: every train visit, so "all of train" is checkable
    cfg = TrainConfig(valid_examples=5, calibration_pages=12, calibration_lists=6, seed=0,
                      min_history=0)
    data = train_data(small_world, cfg)
    split = small_world.split
    train_watched = {(t.user, i) for t in data.train for s in t.steps for i in s.watched}
    assert train_watched == _pairs(split.train)  # all of train, and nothing else
    assert not train_watched & (_pairs(split.valid) | _pairs(split.test))
    valid_watched = {(t.user, i) for t in data.valid for s in t.steps for i in s.watched}
    assert valid_watched and valid_watched <= _pairs(split.valid)
    assert not valid_watched & _pairs(split.test)
    assert len({t.user for t in data.valid}) <= max(cfg.valid_examples,
                                                    cfg.calibration_pages // 4)
    # Calibration lists: validation positives, negatives never rated in any part.
    assert 0 < len(data.valid_lists) <= cfg.calibration_lists
    rated = _pairs(split.train) | _pairs(split.valid) | _pairs(split.test)
    for user, items, labels in data.valid_lists:
        for item, label in zip(items, labels, strict=True):
            assert ((user, item) in _pairs(split.valid)) == bool(label)
            assert label or (user, item) not in rated
    assert {t.part for t in data.train} == {"train"} and {t.part for t in data.valid} == {"valid"}
    hashes = data.split_hashes
    assert set(hashes) == {"protocol", "train", "valid", "test"}
    assert len({hashes[p] for p in ("train", "valid", "test")}) == 3
    assert hashes == {"protocol": split.config.describe(),
                      **{p: split.fingerprint(p) for p in ("train", "valid", "test")}}
    assert fingerprint(data.train) != fingerprint(data.valid)
    # Personas for training pages use ratings from before the session only.
    first = min(data.train, key=lambda t: (t.start, t.user))
    assert (data.world.persona_at(first.user, first.start)
            != data.world.persona_at(first.user, None))


# --- reflections and alternatives ---------------------------------------------------------------

def test_grounded_reflection_names_every_option_with_its_numbers() -> None:
    human = Option(watched=(1, 3), then="next", expected={1: 4.3, 3: 2.1})
    alts = [Option(watched=(2,), then="exit", expected={2: 3.7}),
            Option(watched=(), then="next"),
            Option(watched=(1, 2, 3, 4), then="next",
                   expected={1: 4.3, 2: 3.7, 3: 2.1, 4: 1.4})]
    teacher = GroundedTeacher()
    refl = teacher.reflect(list(VIEWS), ["Crime", "Action"], human, alts, PERSONA)
    assert refl == teacher.reflect(list(VIEWS), ["Crime", "Action"], human, alts, PERSONA)
    assert human.describe() == "watch [1], [3], then next"
    assert alts[1].describe() == "watch nothing, then next"
    positions = [refl.index(human.describe())]
    for alt in alts:
        assert alt.describe() in refl
        positions.append(refl.index(alt.describe(), positions[-1] + 1))
    assert positions == sorted(positions)  # the human first, then the alternatives in order
    numbers = set(re.findall(r"\d\.\d", refl))
    assert {"4.3", "2.1", "3.7", "1.4"} <= numbers  # world-model expectations
    assert {"4.5", "2.0"} <= numbers  # this person's ratings of similar titles: (4+5)/2 and 2
    assert "3.2" in numbers  # the chosen action's mean expectation, (4.3 + 2.1) / 2
    assert "Crime" in refl  # a liked genre the chosen items carry
    assert "\n" not in refl


@pytest.mark.parametrize("ratings, then, k", [({1: 4}, "next", 3), ({}, "exit", 3),
                                              ({1: 5, 2: 3, 3: 4, 4: 1}, "next", 5)])
def test_sample_alternatives_are_distinct_and_not_the_human(ratings: dict[int, int], then: str,
                                                            k: int) -> None:
    policy = LLMPolicy(Scorer(tiny_lm(seed=2)), name="current")
    tr = transition(ratings, then)
    alts = sample_alternatives(policy, tr, k, seed=0)
    human = (tuple(sorted(ratings)), then)
    assert len(alts) == k and len(set(alts)) == k and human not in alts
    for slots, nxt in alts:
        assert list(slots) == sorted(set(slots)) and set(slots) <= {1, 2, 3, 4}
        assert nxt in text.THEN
    assert sample_alternatives(policy, tr, k, seed=0) == alts  # seeded


class _Stubborn:
    """A policy certain of the human's action: alternatives must come from perturbations."""

    def __init__(self, action: PageAction) -> None:
        self.action, self.calls = action, 0

    def decide(self, inp: DecisionInput) -> Decision:
        self.calls += 1
        scores = {s: 50.0 if i in self.action.watched else -50.0
                  for s, i in enumerate(inp.items, 1)}
        return Decision(action=self.action, watch_scores=scores,
                        then_probs=[1.0, 0.0] if self.action.then == "next" else [0.0, 1.0])


def test_alternatives_fall_back_to_one_line_perturbations() -> None:
    tr = transition({2: 4}, "next")
    stubborn = _Stubborn(PageAction(watched={20: 4}, then="next"))
    alts = sample_alternatives(stubborn, tr, 4, seed=0, tries=2)  # type: ignore[arg-type]
    assert stubborn.calls == 1, "one policy pass per human step"
    assert alts == [((2,), "exit"), ((1, 2), "next"), ((), "next"), ((2, 3), "next")]


def test_padded_batch_losses_equal_one_by_one() -> None:
    """Right padding changes nothing: each example's loss in a batch equals its loss alone."""
    import torch

    from agents.llm import tiny_lm

    lm = tiny_lm()
    exs = [Example("policy", ("persona\n", "a short page\n", "Your choices:\n"), "[1] watch\n"),
           Example("policy", ("persona with more words in it\n", "page " * 30 + "\n"),
                   "then: next\n[2] rated 4\n")]
    rows = [tokenize(lm.tokenizer, ex, 512) for ex in exs]
    pad = lm.tokenizer.pad_token_id or 0
    with torch.no_grad():
        batch = example_losses(lm.model, collate(rows, pad))
        alone = torch.cat([example_losses(lm.model, collate([r], pad)) for r in rows])
    assert torch.allclose(batch, alone, atol=1e-5)
    assert torch.isfinite(batch).all()


def test_a_stage_cut_by_its_time_budget_has_annealed() -> None:
    """The cosine decays over the steps or the time budget, whichever is further along."""
    assert _lr(0, 100, 1e-3, 10) == pytest.approx(1e-4)  # warm-up by steps either way
    assert _lr(0, 100, 1e-3, 10, spent=0.9) == pytest.approx(1e-4)
    assert _lr(10, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert _lr(10, 100, 1e-3, 10, spent=0.5) == pytest.approx(5e-4)
    assert _lr(10, 100, 1e-3, 10, spent=1.2) == pytest.approx(0.0, abs=1e-12)
    assert _lr(55, 100, 1e-3, 10, spent=0.1) == pytest.approx(5e-4)  # steps further along
