"""The watch offsets' history term: fitted so long and short histories watch as much as their
humans, saved in the manifest, applied to held-out pages, sessions and the graph, never to the
1:m lists' accuracy cut."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from agents.browse import browse, pages_of
from agents.decide import Calibration, decide
from agents.scorer import Scorer
from agents.transition import transitions
from agents.world import World
from tests.pages import page_inputs
from training.calibrate import calibrate
from training.history_offset import by_history, history_slope

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(slope: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slots whose humans watch 30% at every history size while the scores fall by ``slope``
    per unit of log(1 + ratings), as the shipped agent's do."""
    rng = np.random.default_rng(seed)
    history = rng.choice([10, 40, 120, 400], size=20_000)
    labels = (rng.random(history.size) < 0.3).astype(int)
    scores = rng.normal(size=history.size) + 2.0 * labels - slope * np.log1p(history)
    return scores, labels, history.astype(float)


def test_history_slope_recovers_a_planted_slope() -> None:
    scores, labels, history = _planted(1.5)
    slope, center = history_slope(scores, labels, history, bins=4)
    assert slope == pytest.approx(1.5, abs=0.1)
    assert center == pytest.approx(np.log1p(history).mean())
    # Every bin watches as its humans do with the slope; one offset alone misses them.
    from agents.browse import rate_offset

    shifted = scores + slope * (np.log1p(history) - center)
    cal = Calibration(watch_offset=rate_offset(shifted, labels.mean()),
                      watch_history_slope=slope, history_center=center)
    rows = by_history(scores, labels, history, cal, 4)
    assert len(rows) == 4 and sum(r["slots"] for r in rows) == history.size
    for r in rows:
        assert r["with_slope"] == pytest.approx(r["humans"], abs=0.03)
    assert max(abs(r["one_offset"] - r["humans"]) for r in rows) > 0.15
    # No slope where the scores do not move with the history, or nothing to fit it on.
    flat, _ = history_slope(*_planted(0.0, seed=1), bins=4)
    assert abs(flat) < 0.1
    assert history_slope(scores, labels, history, bins=0)[0] == 0.0
    assert history_slope(scores, labels, np.full_like(history, 7.0), bins=4)[0] == 0.0


def test_history_term_round_trips_and_moves_page_decisions_only(
        tmp_path: Path, small_world: World, scorer: Scorer) -> None:
    cal = Calibration(watch_offset=0.5, watch_history_slope=2.0, history_center=math.log1p(20))
    (tmp_path / "manifest.json").write_text(json.dumps({"calibration": cal.model_dump()}))
    assert Calibration.of_checkpoint(tmp_path) == cal
    inputs = page_inputs(small_world)
    at = {h: decide(scorer, [i.model_copy(update={"history": h}) for i in inputs],
                    calibration=cal, then=False) for h in (None, 20, 200)}
    for k in range(len(inputs)):
        for slot, v in at[None][k].watch_scores.items():
            assert at[20][k].watch_scores[slot] == pytest.approx(v, abs=1e-6)
            assert at[200][k].watch_scores[slot] == pytest.approx(
                v + 2.0 * (math.log1p(200) - math.log1p(20)), abs=1e-6)
    # The lists' accuracy cut (an explicit watch_offset) takes no history term.
    cut = [decide(scorer, [i.model_copy(update={"history": h}) for i in inputs],
                  calibration=cal, watch_offset=0.5, then=False) for h in (20, 200)]
    for a, b in zip(*cut, strict=True):
        assert a.watch_scores == pytest.approx(b.watch_scores, abs=1e-6)


def test_pages_and_sessions_carry_the_history_size(small_world: World, scorer: Scorer) -> None:
    trajs = small_world.trajectories("valid", users=sorted(small_world.histories)[:4],
                                     progress=False)
    for t in transitions(trajs, small_world, full_history=True):
        assert t.history == len(small_world.histories.get(t.user, {}))
        assert t.decision_input().history == t.history
    # A training page draws on the ratings before its session only.
    train = small_world.trajectories("train", users=sorted(small_world.histories)[:2],
                                     progress=False)
    sizes = [t.history for t in transitions(train, small_world)]
    assert sizes[0] == 0 and max(sizes) < len(small_world.histories[train[0].user]) + 1
    # Browsing (sessions, lists) reads the person's history size.
    users = sorted(small_world.histories)[:2]
    items = [i for i in small_world.perceiver.items
             if all(i not in small_world.histories[u] for u in users)]
    sessions = [(u, pages_of(items[:8])) for u in users]
    kw = dict(world_model=False, exits=False)
    plain = browse(scorer, small_world.perceiver, small_world.personas, small_world.histories,
                   sessions, calibration=Calibration(), **kw)
    tilted = browse(scorer, small_world.perceiver, small_world.personas, small_world.histories,
                    sessions, calibration=Calibration(watch_history_slope=1.0), **kw)
    for (u, _), p, t in zip(sessions, plain, tilted, strict=True):
        shift = math.log1p(len(small_world.histories[u]))
        assert t[0].watch_scores[1] == pytest.approx(p[0].watch_scores[1] + shift, abs=1e-6)


def test_calibrate_fits_the_history_term(small_world: World, scorer: Scorer) -> None:
    trajs = small_world.trajectories("valid", users=sorted(small_world.histories)[:6],
                                     progress=False)
    trs = transitions(trajs, small_world, full_history=True)[:12]
    fitted = calibrate(scorer, trs, world_model=False)
    sizes = np.log1p([t.history for t in trs for _ in t.items])
    assert fitted["history_center"] == pytest.approx(sizes.mean())
    rows = fitted["fitted_on"]["by_history"]
    assert sum(r["slots"] for r in rows) == len(sizes)
    off = calibrate(scorer, trs, world_model=False, history_bins=0)
    assert off["watch_history_slope"] == 0.0 and "by_history" not in off["fitted_on"]


@pytest.mark.parametrize("bins", ["-1", "1"])
def test_bad_history_bins_is_one_line_and_exit_2(tmp_path: Path, bins: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from training.calibrate import main

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main(["prep.pkl", str(tmp_path), "--history-bins", bins])
    assert exit_.value.code == 2
    assert f"--history-bins {bins}: 0 (one offset) or at least 2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]
