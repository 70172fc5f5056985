"""A ratings-only refit (``python -m training.calibrate --ratings-only``) fits how ratings are
read and nothing else: every offset, and so every choice, stays as it was.

The world is the 40-user ml-100k ``small_world`` (conftest); the model is a tiny random Llama.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agents.decide import Calibration, decide, rating_expectations
from agents.scorer import Scorer
from agents.transition import Transition, transitions
from agents.world import World
from training.calibrate import calibrate_checkpoint, main
from training.rating_refit import refit_ratings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OFFSETS = Calibration(watch_offset=0.3, then_offset=-0.2, list_offset=1.1,
                      sampled_watch_offset=0.1, watch_history_slope=0.2, history_center=3.0)


@pytest.fixture(scope="module")
def pages(small_world: World) -> list[Transition]:
    trajs = small_world.trajectories("valid", users=sorted(small_world.histories)[:6],
                                     progress=False)
    trs = transitions(trajs, small_world, full_history=True)[:12]
    assert sum(len(t.ratings) for t in trs) >= 5
    return trs


def _rmse(scorer: Scorer, trs: list[Transition], cal: Calibration) -> float:
    rated = [t for t in trs if t.ratings]
    expected = rating_expectations(scorer, [t.decision_input() for t in rated],
                                   [t.human_action() for t in rated], calibration=cal)
    return float(np.sqrt(np.mean([(e[s] - t.ratings[s]) ** 2
                                  for e, t in zip(expected, rated, strict=True)
                                  for s in t.ratings])))


def test_best_keeps_the_format_that_errs_less_and_only_the_rating_fields_move(
        pages: list[Transition], scorer: Scorer) -> None:
    cal, report = refit_ratings(scorer, pages, OFFSETS, world_model=False, trained_cue=False,
                                rating_format="best")
    formats = report["formats"]
    assert set(formats) == {"cue", "plain"} and report["trained_format"] == "plain"
    chosen = min(formats, key=lambda f: formats[f]["rmse"])
    assert report["format"] == chosen and cal.rating_cue is (chosen == "cue")
    assert (cal.rating_tilt, cal.rating_sharpness) == pytest.approx(
        (formats[chosen]["tilt"], formats[chosen]["sharpness"]), abs=1e-4)
    # the reported error is what the agent's expected ratings now make on those pages
    assert _rmse(scorer, pages, cal) == pytest.approx(formats[chosen]["rmse"], abs=2e-3)
    for f in formats.values():
        assert f["rmse"] <= f["rmse_tilt_only"] + 1e-4
    assert cal.model_dump(exclude={"rating_cue", "rating_tilt", "rating_sharpness"}) == \
        OFFSETS.model_dump(exclude={"rating_cue", "rating_tilt", "rating_sharpness"})
    one, only = refit_ratings(scorer, pages, OFFSETS, world_model=False, trained_cue=True)
    assert set(only["formats"]) == {"cue"} and one.rating_cue is True
    with pytest.raises(ValueError, match="rating format"):
        refit_ratings(scorer, pages, OFFSETS, world_model=False, trained_cue=False,
                      rating_format="both")


def test_a_ratings_only_refit_keeps_every_choice(pages: list[Transition], scorer: Scorer,
                                                  tmp_path: Path) -> None:
    old = {**OFFSETS.model_dump(), "fitted_on": {"pages": 400, "list_auc": 0.86}}
    manifest = {"config": {"rating_cue": False}, "steps": 7, "calibration": old}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    prep = SimpleNamespace(calib=pages, sessions=(), visits=())
    cal = calibrate_checkpoint(prep, tmp_path, world_model=False, lm=scorer.lm,
                               ratings_only=True, rating_format="cue")
    after = json.loads((tmp_path / "manifest.json").read_text())
    assert after["calibration"] == cal and after["steps"] == 7
    assert cal["fitted_on"]["pages"] == 400 and cal["fitted_on"]["list_auc"] == 0.86
    assert cal["fitted_on"]["ratings"]["format"] == "cue" and cal["rating_cue"] is True
    for key in ("watch_offset", "then_offset", "list_offset", "sampled_watch_offset",
                "watch_history_slope", "history_center"):
        assert cal[key] == old[key]
    inputs = [t.decision_input() for t in pages]
    before = decide(scorer, inputs, calibration=OFFSETS)
    now = decide(scorer, inputs, calibration=Calibration.of_checkpoint(tmp_path))
    for b, n in zip(before, now, strict=True):
        assert set(b.action.watched) == set(n.action.watched) and b.action.then == n.action.then
        assert b.watch_scores == n.watch_scores and b.exit_score == n.exit_score
    assert any(b.rating_probs != n.rating_probs for b, n in zip(before, now, strict=True))


@pytest.mark.parametrize("argv", [["--rating-format", "cue"], ["--ratings-only", "--no-pages"],
                                  ["--ratings-only", "--rating-format", "both"]])
def test_ratings_only_flags_are_checked(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "prep.pkl").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "prep.pkl"), str(tmp_path), *argv])
    assert exc.value.code == 2


def test_ratings_only_without_rated_pages_is_a_clean_error(tmp_path: Path,
                                                          pages: list[Transition]) -> None:
    """Pages without a rated item stop the refit with one line (exit 2), nothing written."""
    import pickle

    unrated = [t for t in pages if not t.ratings]
    assert unrated
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "prep.pkl").write_bytes(pickle.dumps(SimpleNamespace(calib=unrated)))
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "prep.pkl"), str(tmp_path), "--ratings-only"])
    assert exc.value.code == 2
    assert not (tmp_path / "manifest.json").exists()
