"""What keeps training faithful to held-out humans: class-balanced policy examples, no
held-out rating in any training example. Calibration fitted when a checkpoint is trained, and
what each stage trains and validates on, are tested in ``test_fit.py``; offsets in
``test_calibration.py``, batched decisions in ``test_decisions.py``, the signal check on
training pages in ``test_signal.py``.

Worlds are the 40-user ml-100k ``small_world`` (conftest); models are tiny random Llamas.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import pytest
import torch

from agents import prompts, text
from agents.transition import Transition, transitions
from agents.world import World
from tests.pages import VIEWS
from training.pipeline import Prepared
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
