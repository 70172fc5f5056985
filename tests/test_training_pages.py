"""Training from pages: a page's examples from one forward (losses and gradients as alone),
the detached head, the slots' watch/skip margins and the within-page ranking loss."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agents import prompts, text
from agents.llm import encode
from agents.transition import Example, Transition
from tests.training_examples import EXAMPLES, PERSONA, VIEWS, peft_lm, pool, transition
from training.batches import packed_losses, units
from training.config import TrainConfig
from training.trainer import pair_loss, train_loop, validation_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pages_trained_from_one_forward_equal_their_examples_alone() -> None:
    """Packing pages' examples (heads in one padded forward, each page's tails as a tree over
    its KV cache) must give each example the loss and gradient it has when trained alone."""
    model, lm = peft_lm()
    model.eval()  # LoRA dropout off: it would draw different masks in the two computations
    page = [*transition({1: 4, 3: 5}, "next").policy_examples(),
            transition({2: 3}, "exit").wm_example()]
    # A second, shorter page: the step's heads are padded to the longest in one forward.
    short = Transition(user=6, persona=PERSONA, views=VIEWS[:2], session=(), page=2,
                       max_pages=5, ratings={2: 5}, then="next", next_views=VIEWS[:1],
                       items=tuple(v.id for v in VIEWS[:2])).policy_examples()
    # Targets right after the head (an empty tail) are predicted by the head's last position.
    bare = [Example("policy", (*short[0].segments[:2], ""), t) for t in ("[1] watch\n", "x\n")]
    mixed = [*page, EXAMPLES[1], *short, *bare, pool("cr", 1)[0]]  # and ones sharing nothing
    assert [len(u) for u in units(mixed)] == [len(page), 1, len(short) + len(bare), 1]
    lora = [p for p in model.parameters() if p.requires_grad]

    def losses_and_grads(pack: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        losses, pushed, _ = packed_losses(model, lm.tokenizer, mixed, 1024, pack)
        losses.sum().backward()
        return losses.detach(), [p.grad.clone() for p in lora], pushed

    packed, g_packed, n_packed = losses_and_grads(True)
    alone, g_alone, n_alone = losses_and_grads(False)
    assert packed.shape == (len(mixed),)
    assert torch.allclose(packed, alone, atol=1e-4), (packed, alone)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(g_packed, g_alone,
                                                                          strict=True))
    assert any(float(g.abs().sum()) > 0 for g in g_packed)
    assert n_packed < n_alone / 2  # the page went through once, not once per example


def test_a_detached_head_gives_the_same_losses_and_learns_from_the_tails(tmp_path: Path
                                                                         ) -> None:
    """``detach_head``: the same loss values, gradients only through the tails and targets
    (so different from the full ones, and not zero), and training still lowers the loss."""
    model, lm = peft_lm()
    model.eval()
    page = [*transition({1: 4, 3: 5}, "next").policy_examples(),
            transition({2: 3}, "exit").wm_example()]
    lora = [p for p in model.parameters() if p.requires_grad]

    def run(detach: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        losses = packed_losses(model, lm.tokenizer, page, 1024, True, detach).losses
        losses.sum().backward()
        return losses.detach(), [p.grad.clone() for p in lora]

    full, g_full = run(False)
    cut, g_cut = run(True)
    assert torch.allclose(full, cut, atol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in g_cut)
    assert max(float((a - b).abs().max()) for a, b in zip(g_full, g_cut, strict=True)) > 1e-4

    fresh, _ = peft_lm()
    shared = page[:-1]  # one page's watch/skip and next/exit examples: one head
    assert [len(u) for u in units(shared)] == [len(shared)]
    pools, weights = {"policy": shared}, {"policy": 1.0}
    before = validation_loss(fresh, lm.tokenizer, shared, weights, 512)
    cfg = TrainConfig(batch_size=1, max_len=512, lr=1e-2, warmup=1, save_every=100,
                      detach_head=True)
    train_loop(fresh, lm.tokenizer, pools, weights, steps=8, out_dir=tmp_path, cfg=cfg,
               progress=False)
    after = validation_loss(fresh, lm.tokenizer, shared, weights, 512)
    assert after < before - 0.2, (before, after)


def test_a_slot_margin_is_the_watch_minus_skip_logit_of_its_line_alone() -> None:
    """``Packed.margins``: for each watch/skip line, the two answers' logit difference where
    the lines part, as a plain forward of that example's prompt gives it; NaN elsewhere."""
    model, lm = peft_lm()
    model.eval()
    page = [*transition({1: 4, 3: 5}, "next").policy_examples(),
            transition({2: 3}, "exit").wm_example()]
    with torch.no_grad():
        out = packed_losses(model, lm.tokenizer, page, 1024)
    watch_id = encode(lm.tokenizer, [text.slot_line(1, text.WATCH)])
    skip_id = encode(lm.tokenizer, [text.slot_line(1, text.SKIP)])
    k = next(i for i, (a, b) in enumerate(zip(watch_id, skip_id, strict=False)) if a != b)
    for ex, m in zip(page, out.margins, strict=True):
        if ex.meta.get("line") is None:
            assert torch.isnan(m)
            continue
        stem = encode(lm.tokenizer, [text.slot_line(ex.meta["slot"], ex.meta["line"])])[:k]
        ids = torch.tensor([encode(lm.tokenizer, list(ex.segments)) + stem])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        assert float(m) == pytest.approx(float(logits[watch_id[k]] - logits[skip_id[k]]),
                                         abs=1e-3)
    assert int((~torch.isnan(out.margins)).sum()) == 4


def test_pair_loss_ranks_watched_over_skipped_within_a_page_only() -> None:
    one = transition({1: 4, 3: 5}, "next").policy_examples()  # slots 1, 3 watched; 2, 4 not
    other = replace(transition({2: 3}, "next"), page=2).policy_examples()
    examples = [*one, *other]
    m = torch.tensor([2.0, 0.5, 1.0, -1.0, float("nan"),  # page 1, then its next/exit line
                      9.0, -9.0, 9.0, 9.0, float("nan")])  # page 2: slot 2 watched
    sp = torch.nn.functional.softplus
    page1 = [sp(torch.tensor(n - p)) for p in (2.0, 1.0) for n in (0.5, -1.0)]
    page2 = [sp(torch.tensor(n - (-9.0))) for n in (9.0, 9.0, 9.0)]
    want = torch.stack(page1 + page2).mean()
    assert float(pair_loss(m, examples)) == pytest.approx(float(want), rel=1e-5)
    # A page's level does not matter; only its order does.
    shifted = m.clone()
    shifted[:4] += 5.0
    assert float(pair_loss(shifted, examples)) == pytest.approx(float(want), rel=1e-5)
    # No page with both answers: nothing to rank.
    skips = transition({}, "exit").policy_examples()
    assert float(pair_loss(torch.zeros(len(skips)), skips)) == 0.0


def test_training_with_the_pair_loss_ranks_a_page(tmp_path: Path) -> None:
    """``pair_weight``: the training objective (and its validation) gains the ranking term,
    and a few steps order the page's watched slots above its skipped ones."""
    # Without LoRA dropout: its masks are drawn per forward, in the forward's shapes, so a few
    # steps' outcome would hang on how many positions the packed trees push.
    model, lm = peft_lm(dropout=0.0)
    page = transition({1: 4, 3: 5}, "next").policy_examples()
    weights = {"policy": 1.0}

    def rank_loss() -> float:
        with torch.no_grad():
            return float(pair_loss(packed_losses(model, lm.tokenizer, page, 512).margins, page))

    plain = validation_loss(model, lm.tokenizer, page, weights, 512)
    both = validation_loss(model, lm.tokenizer, page, weights, 512, pair_weight=2.0)
    assert both == pytest.approx(plain + 2.0 * rank_loss(), rel=1e-4)
    before = rank_loss()

    def trained(pair_weight: float) -> tuple[float, list[float], dict]:
        nonlocal model
        model, _ = peft_lm(dropout=0.0)
        cfg = TrainConfig(batch_size=1, max_len=512, lr=1e-2, warmup=1, save_every=100,
                          pair_weight=pair_weight)
        out = train_loop(model, lm.tokenizer, {"policy": page}, weights, steps=8,
                         out_dir=tmp_path / str(pair_weight), cfg=cfg, progress=False)
        with torch.no_grad():
            margins = packed_losses(model, lm.tokenizer, page, 512).margins
        return rank_loss(), margins.tolist(), out

    ranked, m, out = trained(5.0)
    control, _, plain_out = trained(0.0)
    assert all("loss_pair" in h for h in out["history"])
    assert not any("loss_pair" in h for h in plain_out["history"])
    # The tiny random model barely tells its slots apart (about 0.697 -> 0.694 without the
    # term); with it, both watched slots (1, 3) rise above both skipped ones (2, 4).
    assert ranked < min(before, control) - 0.1, (before, control, ranked)
    assert min(m[0], m[2]) > max(m[1], m[3]), m


def test_the_world_models_rating_cue_examples_share_their_page() -> None:
    """``wm_rating_cue``: beside the whole next state, each watched slot's rating is trained
    after the action and that slot's rating cue, in the page's unit (one forward of the page)."""
    tr = transition({1: 4, 3: 5}, "next")
    assert tr.wm_examples() == [tr.wm_example()]
    examples = tr.wm_examples("genres", rating_cue=True)
    assert examples[0] == tr.wm_example("genres") and len(examples) == 3
    assert units(examples) == [[0, 1, 2]]
    action = text.render_wm_action(len(VIEWS), [1, 3], "next")
    for ex, (slot, rating) in zip(examples[1:], [(1, 4), (3, 5)], strict=True):
        assert ex.kind == "wm" and ex.target == text.rating_line(slot, rating)
        assert ex.segments[:2] == examples[0].segments[:2]
        assert ex.segments[2] == (prompts.world_model_tail(action)
                                  + text.cue_line(slot, text.rating_cue(VIEWS[slot - 1])))
