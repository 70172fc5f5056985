"""Options packed as one token tree must score as if each were alone, and push each shared
token once: every decision of a page goes through this path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from agents import prompts, text
from agents.llm import LM, encode, tiny_lm
from agents.packing import build_trie, padded_chunks
from agents.scorer import Scorer

PREFIX = "You are user 7, a 30-year-old engineer who likes sci-fi.\nPage 1:\n[1] Alien (1979)\n"


@pytest.fixture(scope="module")
def lm() -> LM:
    return tiny_lm()


def test_trie_shares_leading_tokens_and_keeps_each_path() -> None:
    trie = build_trie([([5, 6], [7]), ([5, 6], [8, 9]), ([5], [6, 7]), ([], [5])])
    assert trie.tokens == [5, 6, 7, 8, 9]
    assert trie.parents == [-1, 0, 1, 1, 3]
    assert trie.depths == [0, 1, 2, 2, 3]
    # Option 3's target is option 1's context plus target: the same nodes, scored the same.
    assert trie.targets == [[2], [3, 4], [1, 2], [0]]
    # only the nodes with a child are pushed: 0, 1 and 3; the leaves 2 and 4 are read off them
    assert trie.pushed.tolist() == [0, 1, 3] and trie.width == 3
    assert [trie.column(n) for n in (0, 1, 3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="leaf"):
        trie.column(4)
    anc = trie.ancestors()
    assert anc[4].tolist() == [True, True, False, True, True]  # not its sibling 7
    assert anc[2].tolist() == [True, True, True, False, False]


def test_packed_page_options_equal_the_naive_reference(lm: LM) -> None:
    """A page's watch/skip lines (shared tail, per-slot cue, branching choice), options that
    are other options' prefixes, duplicates and an option with no context."""
    tail = prompts.policy_tail("")
    options = [(tail + f"cue {s}: match {10 * s}/100\n", text.slot_line(s, c))
               for s in (1, 2, 3) for c in (text.WATCH, text.SKIP)]
    options += [(tail, text.slot_line(1, text.WATCH)), options[0], ("", " watch"),
                (tail + text.render_choices(3, [1]), text.then_line("exit"))]
    scorer = Scorer(lm)
    packed = scorer.score(PREFIX, options)
    assert packed == pytest.approx(scorer.score_naive(PREFIX, options), abs=1e-4)
    assert packed[7] == pytest.approx(packed[0], abs=1e-6)
    # Shared tokens are pushed once: the forward holds one position per distinct tree node.
    scorer.stats.reset()
    scorer.score(PREFIX, options)
    tok = lm.tokenizer
    trie = build_trie([(encode(tok, [c]), encode(tok, [t])) for c, t in options])
    flat = sum(len(encode(tok, [c])) + len(encode(tok, [t])) for c, t in options)
    # ... and a leaf (each option's last token) is read off its parent's row, not pushed
    assert scorer.stats.tokens == trie.width < len(trie) < flat / 2


def test_options_read_off_the_prefix_alone_need_one_padding_column(lm: LM) -> None:
    """One-token options right after the prefix push no tree node: the forward gets a single
    padding column, and the scores are the naive ones."""
    options = [("", " watch"), ("", " skip")]
    tok = lm.tokenizer
    assert build_trie([(encode(tok, [c]), encode(tok, [t])) for c, t in options]).width == 0
    scorer = Scorer(lm)
    np.testing.assert_allclose(scorer.score(PREFIX, options),
                               scorer.score_naive(PREFIX, options), atol=1e-4)


def test_rows_of_different_prefixes_pack_alike(lm: LM) -> None:
    """Padding rows (shorter prefixes, smaller trees) in one batch must not leak into scores."""
    requests = [(PREFIX, [("", " watch"), ("", " skip")]),
                ("Short.", [("a much longer context line here\n", text.then_line("next"))]),
                (PREFIX + "[2] Heat (1995)\n", [(text.rating_stem(2), r) for r in text.RATINGS])]
    scorer = Scorer(lm)
    together = scorer.score_many(requests)
    for (prefix, options), got in zip(requests, together, strict=True):
        np.testing.assert_allclose(got, scorer.score_naive(prefix, options), atol=1e-4)


def _cost(widths: list[int], chunks: list[tuple[int, int]], overhead: int) -> int:
    return sum((b - a) * widths[a] + overhead for a, b in chunks)


@pytest.mark.parametrize("seed", range(30))
def test_padded_chunks_is_the_cheapest_split_within_the_limits(seed: int) -> None:
    """Against every split of the sorted rows into consecutive batches (brute force)."""
    rng = np.random.default_rng(seed)
    widths = sorted(rng.integers(1, 300, size=int(rng.integers(1, 9))).tolist(), reverse=True)
    overhead, rows, tokens = int(rng.integers(0, 200)), int(rng.integers(1, 5)), 600
    got = padded_chunks(widths, overhead, rows, tokens)
    n = len(widths)
    assert [a for a, _ in got] == [0, *[b for _, b in got[:-1]]] and got[-1][1] == n
    for a, b in got:
        assert b - a == 1 or (b - a <= rows and (b - a) * widths[a] <= tokens)
    best = None
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0, *[k + 1 for k, c in enumerate(cuts) if c], n]
        split = list(itertools.pairwise(bounds))
        if all(b - a == 1 or (b - a <= rows and (b - a) * widths[a] <= tokens)
               for a, b in split):
            cost = _cost(widths, split, overhead)
            best = cost if best is None else min(best, cost)
    assert _cost(widths, got, overhead) == best


def test_padded_chunks_splits_mixed_trees_and_keeps_the_old_rule_without_overhead() -> None:
    widths = [271, 156, 122, 67, 67, 67]
    # One padded batch pushes 6 x 271 positions; split, the three short trees go together.
    assert padded_chunks(widths, 128, 64, 4096) == [(0, 1), (1, 3), (3, 6)]
    assert padded_chunks(widths, None, 64, 4096) == [(0, 6)]
    assert padded_chunks(widths, None, 4, 4096) == [(0, 4), (4, 6)]
    assert padded_chunks(widths, None, 64, 600, base=100) == [(0, 1), (1, 3), (3, 6)]
    assert padded_chunks([], 128, 64, 4096) == []
    with pytest.raises(ValueError, match="longest first"):
        padded_chunks([1, 2], 128, 64, 4096)
