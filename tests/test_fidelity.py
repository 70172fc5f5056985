"""What keeps the agent faithful to held-out humans: the calibrated offsets (stored in a
checkpoint, applied in ``agents.decide``), class-balanced policy examples, no held-out rating in
any training example, batched scoring equal to one-by-one scoring, and lockstep browsing that
stops at an exit. The signal check on training pages is in ``test_signal.py``.

Worlds are the 40-user ml-100k ``small_world`` (conftest); models are tiny random Llamas.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agents import prompts, text
from agents.browse import (
    accuracy_offset,
    browse,
    list_scores,
    pages_of,
    rate_offset,
    sampled_rate_offset,
)
from agents.decide import Calibration, decide
from agents.llm import tiny_lm
from agents.policy import DecisionInput, LLMPolicy
from agents.scorer import Scorer
from agents.text import Evidence, ItemView
from agents.transition import Transition, transitions
from agents.world import World
from training.calibrate import calibrate
from training.config import TrainConfig
from training.pipeline import Prepared, prepare, train_data
from training.rollout import class_balance
from training.trainer import weighted_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(tiny_lm(seed=4), cache_size=256)


def _pairs(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return {(int(u), int(i)) for u, i in zip(frame["user"], frame["item"], strict=True)}


def _inputs(world: World, n: int = 3, pages: int = 1) -> list[DecisionInput]:
    """Pages of train-history items that the users did not rate, rendered as the agent sees
    them (persona, facts, personal evidence)."""
    users = sorted(world.histories)[:n]
    catalogue = sorted(world.ds.items)
    out = []
    for k, u in enumerate(users):
        unseen = [i for i in catalogue if i not in world.histories[u]]
        for p in range(1, pages + 1):
            items = unseen[7 * k + 4 * p: 7 * k + 4 * p + 4]
            views = world.perceiver.page(items, world.histories[u])
            out.append(DecisionInput(user=u, page=p, items=items, persona_text=world.personas[u],
                                     page_text=text.page_prompt(p, 5, views), seed=3))
    return out


# --- calibration --------------------------------------------------------------------------------

def test_calibration_round_trips_through_the_manifest(tmp_path: Path) -> None:
    cal = Calibration(watch_offset=1.25, then_offset=-0.5, list_offset=0.75)
    manifest = {"base_model": "tiny", "calibration": {**cal.model_dump(), "seconds": 3.1,
                                                      "fitted_on": {"pages": 12}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert Calibration.of_checkpoint(tmp_path) == cal
    assert Calibration.of_checkpoint(str(tmp_path)) == cal
    # No checkpoint, no manifest, or a manifest from before calibration: no offsets.
    assert Calibration.of_checkpoint(None) == Calibration()
    assert Calibration.of_checkpoint(tmp_path / "missing") == Calibration()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"base_model": "tiny"}))
    assert Calibration.of_checkpoint(tmp_path / "old") == Calibration()
    assert Calibration().list_offset is None


def test_offsets_change_decisions(small_world: World, scorer: Scorer) -> None:
    inputs = _inputs(small_world)
    plain = decide(scorer, inputs)
    eager = decide(scorer, inputs, calibration=Calibration(watch_offset=100.0))
    shy = decide(scorer, inputs, calibration=Calibration(watch_offset=-100.0))
    for inp, p, e, s in zip(inputs, plain, eager, shy, strict=True):
        assert list(e.action.watched) == inp.items and not s.action.watched
        assert set(e.action.watched.values()) <= {1, 2, 3, 4, 5}
        # The offset is added to the raw log-odds: slots are scored after the page alone.
        for slot, v in p.watch_scores.items():
            assert e.watch_scores[slot] == pytest.approx(v + 100.0, abs=1e-6)
            assert s.watch_scores[slot] == pytest.approx(v - 100.0, abs=1e-6)
    # An explicit watch_offset overrides the calibration's (1:m lists).
    over = decide(scorer, inputs, calibration=Calibration(watch_offset=100.0),
                  watch_offset=-100.0, then=False)
    assert all(not d.action.watched and not d.rating_probs for d in over)
    # then_offset decides next/exit.
    leave = decide(scorer, inputs, calibration=Calibration(then_offset=100.0))
    stay = decide(scorer, inputs, calibration=Calibration(then_offset=-100.0))
    assert {d.action.then for d in leave} == {"exit"} and {d.action.then for d in stay} == {"next"}
    for d, p in zip(leave, plain, strict=True):
        assert d.exit_score == pytest.approx(p.exit_score + 100.0, abs=1e-6)
        assert d.then_probs[1] == pytest.approx(1.0)
    # The policy object applies the calibration it holds.
    policy = LLMPolicy(scorer, temperature=0.0, calibration=Calibration(watch_offset=100.0))
    assert list(policy.decide(inputs[0]).action.watched) == inputs[0].items


def test_offset_helpers() -> None:
    scores = np.array([-2.0, -1.0, 0.5, 1.0, 3.0, 4.0, -3.0, 2.0])
    for rate in (0.25, 0.5, 0.75):
        assert np.mean(scores + rate_offset(scores, rate) > 0) == pytest.approx(rate, abs=0.13)
    assert rate_offset(np.array([]), 0.3) == 0.0
    assert np.all(scores + rate_offset(scores, 0.0) <= 0)
    assert np.all(scores + rate_offset(scores, 1.0) >= 0)
    labels = [[0, 0, 1, 1], [0, 1, 1, 1]]
    lists = [np.array([-3.0, -2.0, -1.0, 0.5]), np.array([-2.5, -0.5, 1.0, 2.0])]
    off = accuracy_offset(lists, labels)
    assert np.mean((np.concatenate(lists) + off > 0) == np.concatenate(labels).astype(bool)) == 1
    assert pages_of(list(range(10))) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_sampled_offsets_match_the_expected_sampled_rate() -> None:
    """Sampling takes a slot with probability sigmoid(score / T): the greedy (quantile) offset
    would overshoot a low ratio when many scores sit near 0, the sampled offset does not."""
    scores = np.random.default_rng(0).normal(-0.5, 1.0, 400)
    for rate, temp in ((0.27, 1.0), (0.5, 0.5), (0.05, 2.0)):
        off = sampled_rate_offset(scores, rate, temp)
        assert np.mean(1 / (1 + np.exp(-(scores + off) / temp))) == pytest.approx(rate, abs=1e-4)
    greedy = rate_offset(scores, 0.27)
    assert np.mean(1 / (1 + np.exp(-(scores + greedy)))) > 0.27 + 0.05
    assert sampled_rate_offset(np.array([]), 0.3, 1.0) == 0.0
    cal = Calibration(watch_offset=1.0, then_offset=2.0, sampled_watch_offset=-1.0,
                      sampled_then_offset=-2.0)
    assert cal.offsets(0.0) == (1.0, 2.0) and cal.offsets(1.0) == (-1.0, -2.0)
    assert Calibration(watch_offset=1.0, then_offset=2.0).offsets(1.0) == (1.0, 2.0)
    # Between greedy and the fitted temperature the offsets are interpolated; above it they
    # stay at the sampled ones and a warning says the rates are no longer calibrated.
    assert cal.offsets(0.25) == pytest.approx((0.5, 1.0))
    with pytest.warns(UserWarning, match="calibrated at temperature 1"):
        assert cal.offsets(1.5) == (-1.0, -2.0)


def test_calibrate_restores_the_humans_rates(small_world: World, scorer: Scorer) -> None:
    """Fitted on validation pages, the offsets make the greedy agent watch and exit at the
    humans' rates on those pages (up to one slot / one page of quantile rounding)."""
    trajs = small_world.trajectories("valid", users=sorted(small_world.histories)[:6],
                                     progress=False)
    trs = transitions(trajs, small_world, full_history=True)[:12]
    fitted = calibrate(scorer, trs, world_model=False)
    cal = Calibration.model_validate(fitted)
    assert fitted["fitted_on"]["pages"] == len(trs) and cal.list_offset is None
    slots = sum(len(t.items) for t in trs)
    decisions = decide(scorer, [t.decision_input() for t in trs], calibration=cal)
    sim_watch = sum(len(d.action.watched) for d in decisions) / slots
    assert sim_watch == pytest.approx(fitted["fitted_on"]["human_watch_ratio"],
                                      abs=1 / slots + 1e-9)
    # then_offset is fitted on exit scores that follow the calibrated watch choices, as here.
    sim_exit = np.mean([d.action.then == "exit" for d in decisions])
    assert sim_exit == pytest.approx(fitted["fitted_on"]["human_exit_share"],
                                     abs=1 / len(trs) + 1e-9)
    # A sampling agent uses the sampled offsets: its expected watch ratio is the humans'.
    sampled = decide(scorer, [t.decision_input() for t in trs], calibration=cal, temperature=1.0)
    p_watch = [1 / (1 + np.exp(-v)) for d in sampled for v in d.watch_scores.values()]
    assert np.mean(p_watch) == pytest.approx(fitted["fitted_on"]["human_watch_ratio"], abs=1e-3)
    for d, g in zip(sampled, decisions, strict=True):
        for slot, v in d.watch_scores.items():
            assert v - g.watch_scores[slot] == pytest.approx(
                cal.sampled_watch_offset - cal.watch_offset, abs=1e-5)


# --- class balance and the weighted loss --------------------------------------------------------

VIEWS = tuple(ItemView(id=i, title=f"Film {i}", year=1990 + i, genres=("Drama",), popularity=i,
                       evidence=[Evidence(title="Old", rating=4, similarity=0.3)] if i == 2
                       else []) for i in range(1, 5))


def _transition(ratings: dict[int, int], then: str = "next") -> Transition:
    return Transition(user=1, persona="You are user 1.\n", views=VIEWS, session=(), page=1,
                      max_pages=5, ratings=ratings, then=then, next_views=None,
                      items=tuple(v.id for v in VIEWS))


def test_policy_examples_are_one_per_slot_plus_then_and_ratings() -> None:
    tr = _transition({3: 4}, "exit")
    exs = tr.policy_examples({1: 3.0})
    assert len(exs) == 5 and {e.kind for e in exs} == {"policy"}
    assert [e.meta.get("line") for e in exs] == ["skip", "skip", "watch", "skip", None]
    head = (prompts.persona_block(tr.persona), tr.page_text)
    tail = prompts.policy_tail("You expect to rate: [1] 3.0\n")
    for s, e in enumerate(exs[:4], 1):  # each slot after the page and its own cue line
        cue = text.cue_line(s, text.item_cue(VIEWS[s - 1]), 3.0 if s == 1 else None)
        assert e.segments == (*head, tail + cue)
        assert e.target == text.slot_line(s, text.WATCH if s == 3 else text.SKIP)
    assert exs[0].segments[-1].endswith("[1] Film 1 (1991); you expect to rate 3.0\n")
    last = exs[4]
    assert last.segments == (*head, tail + text.render_choices(4, [3]))
    assert last.target == "then: exit\n[3] rated 4\n"
    # The lines add up to the whole action the agent renders.
    assert "".join(e.target for e in exs) == text.render_action(4, {3: 4}, "exit")


def test_class_balance_gives_each_class_half_the_slot_weight() -> None:
    exs = _transition({2: 5}).policy_examples()  # 1 watch, 3 skips
    balanced, weights = class_balance(exs)
    assert weights == {"watch_weight": 2.0, "skip_weight": pytest.approx(0.6667)}
    by_line = {e.meta.get("line"): e.weight for e in balanced}
    assert by_line["watch"] == 2.0 and by_line["skip"] == pytest.approx(2 / 3)
    assert by_line[None] == 1.0  # the then+ratings example is not a slot
    slot = [e for e in balanced if e.meta.get("line")]
    watch = sum(e.weight for e in slot if e.meta["line"] == "watch")
    skip = sum(e.weight for e in slot if e.meta["line"] == "skip")
    assert watch == pytest.approx(skip) == pytest.approx(len(slot) / 2)
    # In the weighted slot loss each class carries half of the total weight.
    losses = torch.tensor([0.7, 0.1, 0.2, 0.3])  # slot 1..4; slot 2 is the watch
    w = torch.tensor([e.weight for e in slot])
    watch_share = float((w * torch.tensor([0.0, 1.0, 0.0, 0.0])).sum() / w.sum())
    assert watch_share == pytest.approx(0.5)
    got = weighted_loss(losses, ["policy"] * 4, {"policy": 1.0}, w.tolist())
    assert float(got) == pytest.approx(0.5 * 0.1 + 0.5 * (0.7 + 0.2 + 0.3) / 3)
    # Examples without slot lines (and no examples at all) are left alone.
    assert class_balance([exs[-1]]) == ([exs[-1]], {})
    assert class_balance([]) == ([], {})
    all_skip, w_skip = class_balance(_transition({}).policy_examples())
    assert w_skip == {"watch_weight": 1.0, "skip_weight": 0.5}
    assert [e.weight for e in all_skip] == [0.5] * 4 + [1.0]


def test_weighted_loss_is_the_weighted_mean_per_kind() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    kinds = ["policy", "wm", "policy", "policy", "wm"]
    ew = [2.0, 1.0, 0.5, 0.5, 3.0]
    got = weighted_loss(losses, kinds, {"policy": 1.0, "wm": 0.5}, ew)
    policy = (2.0 * 1 + 0.5 * 3 + 0.5 * 4) / (2.0 + 0.5 + 0.5)
    wm = (1.0 * 2 + 3.0 * 5) / (1.0 + 3.0)
    assert float(got) == pytest.approx(policy + 0.5 * wm)
    # Without example weights: plain means; unit weights give the same.
    plain = (1 + 3 + 4) / 3 + 0.5 * (2 + 5) / 2
    assert float(weighted_loss(losses, kinds, {"policy": 1.0, "wm": 0.5})) == pytest.approx(plain)
    assert float(weighted_loss(losses, kinds, {"policy": 1.0, "wm": 0.5}, [1.0] * 5)
                 ) == pytest.approx(plain)
    # Gradients flow to every example in proportion to its weight.
    x = losses.clone().requires_grad_(True)
    weighted_loss(x, kinds, {"policy": 1.0, "wm": 0.5}, ew).backward()
    assert x.grad is not None
    assert x.grad.tolist() == pytest.approx([2 / 3, 0.125, 1 / 6, 1 / 6, 0.375])


# --- no held-out rating in training data --------------------------------------------------------

def _title_patterns(world: World, item: int) -> list[re.Pattern]:
    """How a title shows up in a prompt: a page/persona label, or 'Title r/5' in evidence and
    the session line, always right after a separator."""
    it = world.ds.items[item]
    return [re.compile(r"(?:^|: |; |\] |then )" + re.escape(it.label()) + r"(?: \||;|\.|$)",
                       re.M),
            re.compile(r"(?:: |; |then )" + re.escape(it.title) + r" [1-5]/5")]


def _assert_no_held_out_titles(world: World, trs: Sequence[Transition],
                               held_out: set[tuple[int, int]], allowed: set[tuple[int, int]]
                               ) -> None:
    titles = {i: world.ds.items[i].title for i in world.ds.items}
    for tr in trs:
        ok = {titles[i] for u, i in allowed if u == tr.user} | {v.title for v in tr.views}
        hidden = [i for u, i in held_out if u == tr.user and titles[i] not in ok]
        texts = [tr.prefix] + [e.target for e in tr.policy_examples()] + [tr.wm_example().target]
        for item in hidden:
            for pattern in _title_patterns(world, item):
                assert not any(pattern.search(t) for t in texts), (tr.user, titles[item])


def test_train_trajectories_hold_train_ratings_only(small_world: World) -> None:
    split = small_world.split
    train, valid, test = _pairs(split.train), _pairs(split.valid), _pairs(split.test)
    trajs = small_world.trajectories("train", progress=False)
    watched = {(t.user, i) for t in trajs for s in t.steps for i in s.watched}
    assert watched == train  # every train rating, nothing held out
    for t in trajs:
        for s in t.steps:
            for i in s.items:
                if i not in s.watched:  # a filler is something the person never rated
                    assert (t.user, i) not in train | valid | test
    # Evidence on a page comes from train ratings before the session plus this session's
    # earlier watches; never from later or held-out ratings.
    sample = trajs[::7]
    trs = transitions(sample, small_world)
    by_user = {int(u): g for u, g in split.train.groupby("user")}
    titles = {i: small_world.ds.items[i].title for i in small_world.ds.items}
    k = 0
    for t in sample:
        g = by_user[t.user]
        seen = {titles[int(i)] for i in g.loc[g["timestamp"] < t.start, "item"]}
        for step in t.steps:
            tr = trs[k]
            k += 1
            assert tr.items == tuple(step.items)
            assert {e.title for v in tr.views for e in v.evidence} <= seen
            assert [title for title, _ in tr.session] == [
                titles[i] for s in t.steps if s.page < step.page for i in s.watched]
            seen |= {titles[i] for i in step.watched}
    assert k == len(trs)
    _assert_no_held_out_titles(small_world, trs, valid | test, train)


@pytest.fixture(scope="module")
def prepared(small_world: World) -> Prepared:
    cfg = TrainConfig(wm_transitions=30, cr_transitions=10, valid_examples=5,
                      calibration_pages=12, calibration_lists=6, seed=0)
    return prepare(cfg, train_data(small_world, cfg))


def test_fit_calibrates_on_merged_weights_and_saves_the_trained_adapter(
        prepared: Prepared, tmp_path: Path) -> None:
    """A policy-only fit end to end on the tiny model: calibration runs on the merged adapter
    and unmerges it, so the saved adapter and the base weights are what training left."""
    from peft import PeftModel

    from training.pipeline import fit

    lm = tiny_lm()
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = TrainConfig(stage="policy", cr_steps=2, batch_size=1, eval_every=1, save_every=1,
                      dtype="float32", device="cpu", seed=0)
    manifest = fit(cfg, prepared, tmp_path / "out", progress=False, lm=lm)
    assert manifest["calibration"]["fitted_on"]["pages"] == len(prepared.calib) > 0
    def strip(k: str) -> str:
        return k.removeprefix("base_model.model.")

    # the LoRA layers were injected into lm.model: trained, and merged back out after calibrating
    state = {strip(k): v for k, v in lm.model.state_dict().items()}
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    unmerged = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() <= unmerged.keys()
    assert all(torch.allclose(unmerged[k], base[k], atol=1e-5) for k in base)
    loaded = PeftModel.from_pretrained(tiny_lm().model, tmp_path / "out")
    saved = {strip(k): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert saved.keys() == lora.keys()
    assert all(torch.allclose(saved[k].float(), lora[k].float(), atol=1e-2) for k in lora)


def test_a_trained_adapter_is_recalibrated_into_its_manifest(prepared: Prepared,
                                                             tmp_path: Path) -> None:
    """``python -m training.calibrate``: an adapter whose manifest lost its offsets (trained
    before calibration, or before the decision step changed) gets them back, fitted as training
    fits them, and the agent then decides with them; the rest of the manifest is kept."""
    from peft import PeftModel

    from training.calibrate import calibrate_checkpoint
    from training.pipeline import fit

    cfg = TrainConfig(stage="policy", cr_steps=1, batch_size=1, eval_every=1, save_every=1,
                      dtype="float32", save_dtype="float32", device="cpu", seed=0)
    out = tmp_path / "out"
    fitted = fit(cfg, prepared, out, progress=False, lm=tiny_lm())["calibration"]
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "calibration": None}))
    assert Calibration.of_checkpoint(out) == Calibration()
    lm = tiny_lm()
    lm.model = PeftModel.from_pretrained(lm.model, out).merge_and_unload()
    refit = calibrate_checkpoint(prepared, out, world_model=False, lm=lm)
    after = json.loads((out / "manifest.json").read_text())
    assert after["calibration"] == refit and after["config"] == manifest["config"]
    assert refit["fitted_on"]["pages"] == len(prepared.calib)
    for key in ("watch_offset", "then_offset", "list_offset", "sampled_watch_offset",
                "sampled_then_offset"):
        assert refit[key] == pytest.approx(fitted[key], abs=1e-3)
    assert Calibration.of_checkpoint(out).watch_offset == pytest.approx(fitted["watch_offset"],
                                                                        abs=1e-3)


@pytest.mark.parametrize("lambda_cr", [0.0, 1.0])
def test_counterfactuals_are_generated_only_when_their_loss_is_weighted(
        prepared: Prepared, tmp_path: Path, lambda_cr: float) -> None:
    """The world model + policy ablation (λ_CR = 0) trains without reflections, so none are
    generated for it; the full method (λ_CR > 0) writes one per counterfactual transition."""
    from training.pipeline import fit

    cfg = TrainConfig(stage="all", wm_steps=1, cr_steps=1, batch_size=1, eval_every=1, save_every=1,
                      lambda_cr=lambda_cr, dtype="float32", device="cpu", seed=0)
    out = tmp_path / "out"
    fit(cfg, prepared, out, progress=False, lm=tiny_lm())
    cache = out / "counterfactuals.jsonl"
    if lambda_cr == 0:
        assert not cache.exists() and not (out / "reflections_sample.json").exists()
    else:
        assert len(cache.read_text().splitlines()) == len(prepared.cr) > 0


def test_prepared_training_examples_hold_no_held_out_rating(small_world: World,
                                                            prepared: Prepared) -> None:
    split = small_world.split
    train, valid, test = _pairs(split.train), _pairs(split.valid), _pairs(split.test)
    assert 0 < len(prepared.train) <= 30 and 0 < len(prepared.cr) <= 10
    for tr in [*prepared.train, *prepared.cr]:
        for s, item in enumerate(tr.items, 1):
            if s in tr.ratings:
                assert (tr.user, item) in train
                assert tr.ratings[s] == int(round(small_world.histories[tr.user][item]))
            else:
                assert (tr.user, item) not in train | valid | test
        titles = {small_world.ds.items[i].title for u, i in train if u == tr.user}
        assert {e.title for v in tr.views for e in v.evidence} <= titles
    _assert_no_held_out_titles(small_world, [*prepared.train, *prepared.cr], valid | test, train)
    # Validation pages and calibration use validation ratings, never test.
    assert prepared.valid and prepared.calib
    for tr in [*prepared.valid, *prepared.calib]:
        assert all((tr.user, tr.items[s - 1]) in valid for s in tr.ratings)
    _assert_no_held_out_titles(small_world, [*prepared.valid, *prepared.calib], test,
                               train | valid)
    for user, items, labels in prepared.valid_lists:
        assert not {(user, i) for i in items} & test
        assert all(((user, i) in valid) == bool(y) for i, y in zip(items, labels, strict=True))
    assert prepared.data_hashes["split"] == {
        "protocol": split.config.describe(),
        **{p: split.fingerprint(p) for p in ("train", "valid", "test")}}


# --- batched scoring equals one-by-one scoring --------------------------------------------------

def test_score_many_equals_score(small_world: World) -> None:
    lm = tiny_lm(seed=5)
    assert lm.dtype == torch.float32
    inputs = _inputs(small_world, n=2)
    long_prefix = prompts.persona_block(inputs[0].persona_text) + inputs[0].page_text
    other = prompts.persona_block(inputs[1].persona_text) + inputs[1].page_text
    opts = [(prompts.policy_tail(), text.slot_line(1, text.WATCH)),
            (prompts.policy_tail(), text.slot_line(3, text.SKIP)),
            (prompts.policy_tail() + text.render_choices(4, [1, 2]) + text.then_line("next"),
             text.rating_line(2, 5)),
            ("", "then: exit\n"),
            ("", "A much longer target of several words\n")]
    requests = [("Short prefix.\n", opts[:2]), (long_prefix, opts), (other, opts[1:4]),
                (long_prefix, opts[2:]), ("Short prefix.\n", [])]
    batched = Scorer(lm, cache_size=2, batch_tokens=64).score_many(requests)  # many chunks
    one = Scorer(lm)
    assert [len(r) for r in batched] == [len(o) for _, o in requests]
    for (prefix, options), got in zip(requests, batched, strict=True):
        np.testing.assert_allclose(got, one.score(prefix, options), atol=2e-4)
        np.testing.assert_allclose(got, one.score_naive(prefix, options), atol=2e-4)
    with pytest.raises(ValueError, match="empty"):
        one.score_many([("", opts[:1])])


def test_decide_on_a_batch_equals_decide_alone(small_world: World) -> None:
    lm = tiny_lm(seed=6)
    inputs = _inputs(small_world, n=3, pages=2)
    cal = Calibration(watch_offset=0.4, then_offset=-0.2)
    for world_model in (False, True):
        together = decide(Scorer(lm, cache_size=64), inputs, world_model=world_model,
                          calibration=cal, temperature=0.7)
        assert any(d.action.watched for d in together)  # ratings are compared too
        for inp, d in zip(inputs, together, strict=True):
            alone = decide(Scorer(lm), [inp], world_model=world_model, calibration=cal,
                           temperature=0.7)[0]
            assert d.action == alone.action
            assert d.predictions == pytest.approx(alone.predictions, abs=0.011)
            assert bool(d.predictions) is world_model
            for s, v in alone.watch_scores.items():
                assert d.watch_scores[s] == pytest.approx(v, abs=1e-3)
            assert d.exit_score == pytest.approx(alone.exit_score, abs=1e-3)
            assert sorted(d.rating_probs) == sorted(inp.items.index(i) + 1
                                                    for i in d.action.watched)
            for s, probs in alone.rating_probs.items():
                assert d.rating_probs[s] == pytest.approx(probs, abs=1e-3)


def test_decide_scores_next_exit_and_ratings_as_the_full_texts_do(small_world: World) -> None:
    """Ratings are scored over a prefix that extends the page by the choices and next/exit; the
    probabilities must be those of the plain texts, scored with no cache at all."""
    lm = tiny_lm(seed=3)
    inputs = _inputs(small_world, n=2, pages=1)
    cal = Calibration(watch_offset=100.0)  # every slot watched: every rating line is scored
    for d, inp in zip(decide(Scorer(lm), inputs, calibration=cal), inputs, strict=True):
        slots = sorted(d.watch_scores)
        prefix = prompts.prefix(inp.persona_text, inp.page_text)
        ctx = prompts.policy_tail() + text.render_choices(len(slots), slots)
        ref = Scorer(lm)
        then = ref.score_naive(prefix, [(ctx, text.then_line(t)) for t in text.THEN])
        assert d.then_probs[1] == pytest.approx(1 / (1 + math.exp(then[0] - then[1])),
                                                abs=2e-4)
        ctx += text.then_line(d.action.then)
        for s in slots:
            lp = np.asarray(ref.score_naive(prefix, [(ctx, text.rating_line(s, r))
                                                     for r in text.RATINGS]))
            want = np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum()
            np.testing.assert_allclose(d.rating_probs[s], want, atol=2e-4)


class Options:
    """A scorer that keeps every (prefix, options) request and scores by length."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []

    def score_many(self, requests):
        self.requests += [(p, list(o)) for p, o in requests]
        return [[-float(len(c + line)) for c, line in o] for _, o in requests]


def test_decide_scores_each_slot_after_the_text_it_was_trained_on() -> None:
    views = tuple(v.model_copy(update={"match": 10 * s, "close_watched": s})
                  for s, v in enumerate(VIEWS, 1))
    tr = Transition(user=1, persona="You are user 1.\n", views=views, session=(), page=2,
                    max_pages=5, ratings={2: 5}, then="next", next_views=None,
                    items=tuple(v.id for v in views))
    preds = {1: 3.5, 2: 4.25, 3: 2.0, 4: 1.0}
    rec = Options()
    decide(rec, [tr.decision_input().model_copy(update={"predictions": preds})])
    scored = {line: prefix + ctx for prefix, opts in rec.requests for ctx, line in opts
              if line.endswith((" watch\n", " skip\n"))}
    trained = {e.target: "".join(e.segments) for e in tr.policy_examples(preds)[:4]}
    assert len(trained) == 4 and all(scored[line] == ctx for line, ctx in trained.items())
    assert "[3] Film 3 (1993): match 30/100, you watched 3 of its 20 closest; you expect to " \
           "rate 2.0\n" in trained[text.slot_line(3, text.SKIP)]


# --- lockstep browsing --------------------------------------------------------------------------

class Recording:
    """A scorer wrapper that keeps every prefix scored."""

    def __init__(self, inner: Scorer) -> None:
        self.inner, self.prefixes = inner, []

    def score_many(self, requests):
        self.prefixes += [p for p, _ in requests]
        return self.inner.score_many(requests)


def _sessions(world: World, n_pages: int = 3) -> list[tuple[int, list[list[int]]]]:
    out = []
    for k, u in enumerate(sorted(world.histories)[:2]):
        unseen = [i for i in sorted(world.ds.items) if i not in world.histories[u]]
        out.append((u, pages_of(unseen[10 * k: 10 * k + 4 * n_pages])))
    return out


def test_browse_stops_a_session_at_exit(small_world: World, scorer: Scorer) -> None:
    w = small_world
    sessions = _sessions(w)
    kw = dict(world_model=False, temperature=0.0)
    leave = browse(scorer, w.perceiver, w.personas, w.histories, sessions,
                   calibration=Calibration(then_offset=100.0), **kw)
    assert [len(run) for run in leave] == [1, 1]
    assert all(run[0].action.then == "exit" for run in leave)
    stay = browse(scorer, w.perceiver, w.personas, w.histories, sessions,
                  calibration=Calibration(then_offset=-100.0), **kw)
    assert [len(run) for run in stay] == [3, 3]
    # exits=False browses every page whatever the agent says (1:m lists).
    listed = browse(scorer, w.perceiver, w.personas, w.histories, sessions,
                    calibration=Calibration(then_offset=100.0), exits=False, **kw)
    assert [len(run) for run in listed] == [3, 3]
    assert all(d.action.then == "exit" for run in listed for d in run)
    for run, (_, pages) in zip(listed, sessions, strict=True):
        for d, page in zip(run, pages, strict=True):
            assert set(d.action.watched) <= set(page) and sorted(d.watch_scores) == [1, 2, 3, 4]


def test_browse_carries_the_session_into_later_pages(small_world: World,
                                                     scorer: Scorer) -> None:
    w = small_world
    sessions = _sessions(w, n_pages=2)
    rec = Recording(scorer)
    runs = browse(rec, w.perceiver, w.personas, w.histories, sessions, world_model=False,
                  calibration=Calibration(watch_offset=100.0, then_offset=-100.0))
    assert all(list(run[0].action.watched) == pages[0]
               for run, (_, pages) in zip(runs, sessions, strict=True))
    page2 = [p for p in rec.prefixes if "Page 2 of at most 2." in p]
    assert page2
    for (u, pages), run in zip(sessions, runs, strict=True):
        first = [w.ds.items[i].title for i in pages[0]]
        mine = [p for p in page2 if p.startswith(prompts.persona_block(w.personas[u]))]
        line = "Watched this session: " + "; ".join(
            f"{t} {run[0].action.watched[i]}/5" for t, i in zip(first, pages[0], strict=True))
        assert mine and all(line + ".\n" in p for p in mine)
        # What was watched on page 1 is evidence on page 2 (history plus this session).
        assert run[1].watch_scores and len(run) == 2


def test_list_scores_browse_every_page_with_the_offset(small_world: World,
                                                       scorer: Scorer) -> None:
    w = small_world
    lists = [(u, [i for p in pages for i in p][:4]) for u, pages in _sessions(w, n_pages=1)]
    base = list_scores(scorer, w.perceiver, w.personas, w.histories, lists, world_model=False)
    shifted = list_scores(scorer, w.perceiver, w.personas, w.histories, lists,
                          world_model=False, offset=1.5)
    assert [len(s) for s in base] == [4, 4]
    for b, s in zip(base, shifted, strict=True):
        np.testing.assert_allclose(s - b, 1.5, atol=1e-9)
    assert all(math.isfinite(x) for s in base for x in s)
