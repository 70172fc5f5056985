"""The world model's expected ratings: the cheap stem-sharing form equals whole-line scoring."""

from __future__ import annotations

import numpy as np
import pytest

from agents import prompts, text
from agents.llm import tiny_lm
from agents.scorer import Scorer
from agents.world_model import expected_ratings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_expected_ratings_equal_whole_line_scoring() -> None:
    scorer = Scorer(tiny_lm(seed=3))
    prefix = "You are user 7.\nPage 1 of at most 5.\nOn this page:\n[1] A | Drama | 3 ratings\n"
    got = expected_ratings(scorer, prefix, 3)
    for slot in range(1, 4):
        ctx = prompts.world_model_tail(text.render_wm_action(3, [slot], "next"))
        lp = np.asarray(scorer.score_naive(prefix, [(ctx, text.rating_line(slot, r))
                                                    for r in text.RATINGS]))
        p = np.exp(lp - lp.max())
        assert got[slot] == pytest.approx(float(p / p.sum() @ np.arange(1, 6)), abs=0.01)
        assert 1.0 <= got[slot] <= 5.0


def test_rating_line_is_stem_plus_value() -> None:
    assert text.rating_line(2, 4) == text.rating_stem(2) + text.rating_value(4) == "[2] rated 4\n"
