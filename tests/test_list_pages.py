"""List pages for training (``--list-pages``): validation lists of users no evaluation lists,
perceived as evaluation perceives its lists, training watch/skip lines in their own pool.

``small_world`` and ``prepared`` are the 40-user fixtures (conftest); models are tiny random
Llamas.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agents import text
from agents.llm import tiny_lm
from agents.world import World
from training.config import TrainConfig
from training.list_pages import LIST_KIND, list_rows, list_transitions, slot_examples
from training.pipeline import Prepared


def test_list_rows_hold_only_never_evaluated_users_validation_items_and_unrated_items(
        small_world: World) -> None:
    rows = list_rows(small_world, seed=0)
    evaluated = {u for u, _, _ in small_world.lists("test", 1, None, 0)}
    rated = small_world.rated_in()
    valid = small_world.split.valid
    assert rows and evaluated
    for user, items, labels in rows:
        assert user not in evaluated
        assert 0 < len(items) <= 20 and len(items) == len(labels) == len(set(items))
        mine = set(valid.loc[valid["user"] == user, "item"].astype(int))
        assert {i for i, y in zip(items, labels, strict=True) if y} <= mine
        assert not {i for i, y in zip(items, labels, strict=True) if not y} & rated[user]
    # every validation item of a listed user is a positive once, beside as many negatives
    by_user: dict[int, list[int]] = {}
    for user, _, labels in rows:
        by_user.setdefault(user, []).extend(labels)
    for user, labels in by_user.items():
        assert sum(labels) == len(labels) - sum(labels) == (valid["user"] == user).sum()


def test_a_list_is_a_visit_whose_positives_are_watched_at_their_validation_ratings(
        small_world: World) -> None:
    rows = list_rows(small_world, seed=0)[:3]
    trs = list_transitions(small_world, rows)
    valid = small_world.split.valid
    rating = {(int(u), int(i)): int(r) for u, i, r in zip(valid["user"], valid["item"],
                                                          valid["rating"], strict=True)}
    pages = list(trs)
    assert sum(len(t.items) for t in pages) == sum(len(items) for _, items, _ in rows)
    for t in pages:
        assert 1 <= t.page <= 5 and len(t.items) <= 4
        # perceived from the whole train split, as evaluation perceives a list
        assert t.history == len(small_world.histories.get(t.user, {}))
        assert t.ratings == {s: rating[(t.user, i)] for s, i in enumerate(t.items, 1)
                             if (t.user, i) in rating}
    examples = slot_examples([e for t in pages for e in t.policy_examples()])
    assert len(examples) == sum(len(t.items) for t in pages)
    assert {e.kind for e in examples} == {LIST_KIND}
    assert {e.meta["line"] for e in examples} <= {text.WATCH, text.SKIP}


def test_list_pages_train_in_their_own_pool_and_validate_beside_the_pages(
        prepared: Prepared, small_world: World, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from training import pipeline

    with_lists = dataclasses.replace(
        prepared, lists=list_transitions(small_world, list_rows(small_world, 0))[:4],
        list_valid=list_transitions(small_world, list(prepared.valid_lists)[:1]))
    seen: dict[str, tuple] = {}
    real = pipeline._stage

    def spy(model, lm, cfg, pools, weights, steps, out, valid, *rest):
        seen[out.name] = (pools, weights, list(valid))
        return real(model, lm, cfg, pools, weights, steps, out, valid, *rest)

    monkeypatch.setattr(pipeline, "_stage", spy)
    for stage in ("policy", "all"):
        cfg = TrainConfig(stage=stage, wm_steps=1, cr_steps=1, batch_size=2, eval_every=1,
                          save_every=1, lambda_cr=0.0, dtype="float32", device="cpu", seed=0,
                          list_pages=4)
        manifest = pipeline.fit(cfg, with_lists, tmp_path / stage, progress=False,
                                lm=tiny_lm())
        assert manifest["data"]["list_pages"] == 4
    expects = "You expect to rate: "
    for name, in_prompt in (("stage_policy", False), ("stage_cr", True)):
        pools, weights, valid = seen[name]
        assert LIST_KIND in pools and weights[LIST_KIND] == 1.0
        assert len(pools[LIST_KIND]) == sum(len(t.items) for t in with_lists.lists)
        assert all(e.meta.get("line") for e in pools[LIST_KIND])  # no next/exit, no ratings
        assert {e.kind for e in valid} >= {"policy", LIST_KIND}
        # the aligned agent decides lists with the world model's expectations in its prompt
        assert all((expects in e.segments[-1]) == in_prompt
                   for e in pools[LIST_KIND] + valid if e.kind != "wm")
    # a file prepared without them is refused, not trained without them
    with pytest.raises(ValueError, match="list pages"):
        pipeline.fit(cfg, prepared, tmp_path / "none", progress=False, lm=tiny_lm())
