"""Fitting a checkpoint from a prepared file: calibration on the merged weights, a trained
adapter recalibrated into its manifest, counterfactuals only where their loss is weighted,
each stage validated on the prompt it trains and runs on, and the world model's expectations
computed once per weights and pages.

``prepared`` is the 40-user ``small_world``'s (conftest); models are tiny random Llamas.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from agents.decide import Calibration
from agents.llm import tiny_lm
from training.config import TrainConfig
from training.pipeline import Prepared


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
