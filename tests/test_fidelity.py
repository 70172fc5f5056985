"""What keeps training faithful to held-out humans: class-balanced policy examples, no
held-out rating in any training example, calibration fitted when a checkpoint is trained.
Offsets are tested in ``test_calibration.py``, batched decisions in ``test_decisions.py``,
the signal check on training pages in ``test_signal.py``.

Worlds are the 40-user ml-100k ``small_world`` (conftest); models are tiny random Llamas.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch

from agents import prompts, text
from agents.decide import Calibration
from agents.llm import tiny_lm
from agents.transition import Transition, transitions
from agents.world import World
from tests.pages import VIEWS
from training.config import TrainConfig
from training.pipeline import Prepared, prepare, train_data
from training.rollout import class_balance
from training.trainer import weighted_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return {(int(u), int(i)) for u, i in zip(frame["user"], frame["item"], strict=True)}


# --- class balance and the weighted loss --------------------------------------------------------

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
                      calibration_pages=12, calibration_lists=6, calibration_sessions=2,
                      seed=0)
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
                      dtype="float32", device="cpu", seed=0, rating_cue=True)
    manifest = fit(cfg, prepared, tmp_path / "out", progress=False, lm=lm)
    assert manifest["calibration"]["fitted_on"]["pages"] == len(prepared.calib) > 0
    # trained with a cue line above each rating line, and so read at run time
    assert manifest["config"]["rating_cue"]
    assert Calibration.of_checkpoint(tmp_path / "out").rating_cue

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
                      dtype="float32", save_dtype="float32", device="cpu", seed=0,
                      rating_cue=True)
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
    assert refit["rating_cue"] is fitted["rating_cue"] is True  # the format it was trained in
    assert not TrainConfig().rating_cue  # the shipped adapters' format by default
    for key in ("watch_offset", "then_offset", "list_offset", "sampled_watch_offset",
                "sampled_then_offset"):
        assert refit[key] == pytest.approx(fitted[key], abs=1e-3)
    assert Calibration.of_checkpoint(out).watch_offset == pytest.approx(fitted["watch_offset"],
                                                                        abs=1e-3)
    # --no-lists refits the page offsets only: the list offset and its provenance stay.
    kept = {**refit, "list_offset": 7.5, "fitted_on": {**refit["fitted_on"], "lists": 3}}
    (out / "manifest.json").write_text(json.dumps({**after, "calibration": kept}))
    pages_only = calibrate_checkpoint(prepared, out, world_model=False, lm=lm, lists=False)
    assert pages_only["list_offset"] == 7.5 and pages_only["fitted_on"]["lists"] == 3
    assert pages_only["watch_offset"] == pytest.approx(refit["watch_offset"], abs=1e-6)
    assert Calibration.of_checkpoint(out).list_offset == 7.5
    # the sampled exit offsets are refitted on the validation users' recommender sessions
    assert prepared.sessions and prepared.visits
    report = pages_only["fitted_on"]["sessions"]
    assert report["sessions"] == len(prepared.sessions)
    assert report["visits"] == len(prepared.visits)
    assert pages_only["sampled_then_offset"] != report["page_fitted"]["sampled_then_offset"]
    # --no-pages refits only those, on the same sessions: every other offset stays
    sessions_only = calibrate_checkpoint(prepared, out, world_model=False, lm=lm, pages=False)
    for key in ("watch_offset", "then_offset", "list_offset", "sampled_watch_offset",
                "last_then_offset"):
        assert sessions_only[key] == pages_only[key]
    for key in ("sampled_then_offset", "sampled_last_then_offset"):
        assert sessions_only[key] == pytest.approx(pages_only[key], abs=1e-3)
    assert Calibration.of_checkpoint(out).sampled_then_offset == sessions_only[
        "sampled_then_offset"]
    bare = dataclasses.replace(prepared, sessions=(), visits=())
    with pytest.raises(ValueError, match="no validation sessions"):
        calibrate_checkpoint(bare, out, world_model=False, lm=lm, pages=False)
    # a refit of the page offsets on no pages would reset them to even odds: refused
    no_pages = dataclasses.replace(prepared, calib=[])
    with pytest.raises(ValueError, match="no calibration pages"):
        calibrate_checkpoint(no_pages, out, world_model=False, lm=lm)
    # from the command line: one line, exit 2, the manifest untouched
    from training.calibrate import main as calibrate_main

    before = (out / "manifest.json").read_text()
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps(bare))
    with pytest.raises(SystemExit) as exc:
        calibrate_main([str(tmp_path / "bare.pkl"), str(out), "--no-pages"])
    assert exc.value.code == 2 and (out / "manifest.json").read_text() == before
    (tmp_path / "no_pages.pkl").write_bytes(pickle.dumps(no_pages))
    with pytest.raises(SystemExit) as exc:
        calibrate_main([str(tmp_path / "no_pages.pkl"), str(out)])
    assert exc.value.code == 2 and (out / "manifest.json").read_text() == before


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


def test_each_stage_validates_on_the_prompt_it_trains_and_runs_on(
        prepared: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The alignment stage trains (and the agent decides) with the world model's expected
    ratings in the prompt, so its validation examples carry them too; policy-only SFT's do
    not. The weights a stage keeps are chosen on this loss."""
    from training import pipeline

    seen: dict[str, list] = {}
    real = pipeline._stage

    def spy(model, lm, cfg, pools, weights, steps, out, valid, *rest):
        seen[out.name] = list(valid)
        return real(model, lm, cfg, pools, weights, steps, out, valid, *rest)

    monkeypatch.setattr(pipeline, "_stage", spy)
    for stage in ("policy", "all"):
        cfg = TrainConfig(stage=stage, wm_steps=1, cr_steps=1, batch_size=1, eval_every=1,
                          save_every=1, lambda_cr=0.0, dtype="float32", device="cpu", seed=0)
        pipeline.fit(cfg, prepared, tmp_path / stage, progress=False, lm=tiny_lm())
    expects = "You expect to rate: "
    sft, aligned = seen["stage_policy"], seen["stage_cr"]
    assert len(sft) == len(aligned) > 0
    assert not any(expects in "".join(e.segments) for e in sft)
    assert all(expects in e.segments[-1] for e in aligned)
    # the same pages and answers, only the expectations added
    assert [e.target for e in aligned] == [e.target for e in sft]
    assert [e.segments[:2] for e in aligned] == [e.segments[:2] for e in sft]


def test_the_world_model_trains_and_validates_in_its_format(
        prepared: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--wm-format genres`` reaches stage 1's training and validation examples: every next
    page is named by its genre mix, never by a title; the manifest records the format."""
    from agents.text import NEXT_GENRES
    from training import pipeline

    seen: dict[str, tuple] = {}
    real = pipeline._stage

    def spy(model, lm, cfg, pools, weights, steps, out, valid, *rest):
        seen[out.name] = (pools, list(valid))
        return real(model, lm, cfg, pools, weights, steps, out, valid, *rest)

    monkeypatch.setattr(pipeline, "_stage", spy)
    cfg = TrainConfig(stage="wm", wm_steps=1, batch_size=1, eval_every=1, save_every=1,
                      wm_format="genres", dtype="float32", device="cpu", seed=0)
    manifest = pipeline.fit(cfg, prepared, tmp_path / "wm", progress=False, lm=tiny_lm())
    pools, valid = seen["stage_wm"]
    targets = [e.target for e in [*pools["wm"], *valid]]
    pages = [t.split(NEXT_GENRES)[1] for t in targets if NEXT_GENRES in t]
    assert pages and len(valid) > 0
    assert all("[" not in page and ";" not in page for page in pages)
    assert all(NEXT_GENRES in t or "next page: none" in t for t in targets)
    assert manifest["config"]["wm_format"] == "genres" and TrainConfig().wm_format == "titles"


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


def test_the_world_models_expectations_are_computed_once_per_weights_and_pages(
        prepared: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The alignment stage's expected ratings are cached by weights and pages: the world model +
    policy ablation starts from the full agent's world-model weights and reuses them, while new
    weights or other pages are scored afresh."""
    import agents.world_model as world_model
    from training import pipeline

    monkeypatch.setenv("ALIGNUSER_CACHE", str(tmp_path))
    calls: list[int] = []
    real = world_model.expected_ratings_many

    def spy(scorer, pages, requests=None):
        calls.append(len(pages))
        return real(scorer, pages, requests)

    monkeypatch.setattr(world_model, "expected_ratings_many", spy)
    lm = tiny_lm()
    model = pipeline._peft(lm, TrainConfig(seed=0))
    trs = prepared.train[:6]
    first = pipeline._expectations(model, lm, trs)
    assert calls == [6] and len(first) == 6 and all(first)
    assert pipeline._expectations(model, lm, trs) == first and calls == [6]  # cached
    assert pipeline._expectations(model, lm, trs[:3]) == first[:3] and calls == [6, 3]
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)
    pipeline._expectations(model, lm, trs)
    assert calls == [6, 3, 6]  # new weights: scored again


def test_the_ablation_from_the_full_agents_world_model_reuses_its_expectations(
        prepared: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--stage cr --init-adapter FULL/stage_wm/best --lambda-cr 0`` (the world model + policy
    ablation) scores no page the full agent's alignment stage already scored."""
    import agents.world_model as world_model
    from training.pipeline import fit

    monkeypatch.setenv("ALIGNUSER_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []
    real = world_model.expected_ratings_many
    monkeypatch.setattr(world_model, "expected_ratings_many",
                        lambda scorer, pages, requests=None: calls.append(len(pages))
                        or real(scorer, pages, requests))
    common = dict(wm_steps=2, cr_steps=1, batch_size=1, eval_every=1, save_every=1,
                  dtype="float32", save_dtype="float32", device="cpu", seed=0)
    fit(TrainConfig(stage="all", lambda_cr=0.0, **common), prepared, tmp_path / "full",
        progress=False, lm=tiny_lm())
    assert sum(calls) >= len(prepared.train) + len(prepared.valid)
    calls.clear()
    fit(TrainConfig(stage="cr", lambda_cr=0.0, init_adapter=str(tmp_path / "full/stage_wm/best"),
                    **common), prepared, tmp_path / "wm_policy", progress=False, lm=tiny_lm())
    assert calls == []
