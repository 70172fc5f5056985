"""The scoring backend: cached+batched scores must equal the naive reference, because every
agent decision and every training target rests on these numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.chat import LangChainTextModel, LocalTextModel, TextModel
from agents.llm import LM, best_dtype, encode, load_lm, resolve_dtype, tiny_lm
from agents.scorer import Scorer

PREFIX = "You are user 7, a 30-year-old engineer who likes sci-fi.\nPage 1:\n1. Alien (1979)\n"
OPTIONS = [
    ("", " watch"),
    ("", "I leave the site."),
    ("I watch Alien (1979) and rate it", " 4 stars."),
    ("\n", "skip"),
]


@pytest.fixture(scope="module")
def lm() -> LM:
    return tiny_lm()


def test_score_matches_naive_with_mixed_lengths(lm: LM) -> None:
    scorer = Scorer(lm)
    cached = scorer.score(PREFIX, OPTIONS)
    assert scorer.stats.forwards == 2  # the prefix, then one batch for all options
    naive = scorer.score_naive(PREFIX, OPTIONS)
    assert cached == pytest.approx(naive, abs=1e-4)
    assert all(math.isfinite(x) and x < 0 for x in cached)
    assert len({round(x, 3) for x in cached}) == len(OPTIONS)


def test_scores_are_not_rounded_by_a_bf16_head() -> None:
    """A bf16 LM head rounds logits of magnitude >= 1 to multiples of 1/128 (coarser as they
    grow), which put every watch-vs-skip log-odds on a grid and tied rankings: the scorer
    must take its log-probs from an fp32 head."""
    lm = tiny_lm()
    with torch.no_grad():  # logits of tens, as a trained model's are (this unties the head)
        lm.model.lm_head.weight = torch.nn.Parameter(lm.model.lm_head.weight * 300)
    lm.model.to(torch.bfloat16)
    words = [" watch", " skip", " yes", " no", " exit", " next", " rate"]
    ids = [encode(lm.tokenizer, [w]) for w in words]
    assert all(len(i) == 1 for i in ids)
    with torch.no_grad():
        bf16 = lm.model(input_ids=torch.tensor([encode(lm.tokenizer, [PREFIX])])).logits[0, -1]
    old = bf16[[i[0] for i in ids]].float().numpy()
    assert np.all(np.abs(old) >= 1)
    on_grid = lambda d: np.allclose(d * 128, np.round(d * 128), atol=1e-3)  # noqa: E731
    assert on_grid(old - old[0])  # what a bf16 head gives
    scores = np.asarray(Scorer(lm).score(PREFIX, [("", w) for w in words]))
    assert not on_grid(scores - scores[0])
    assert scores - scores[0] == pytest.approx(old - old[0], abs=0.5)  # same model, finer


def test_small_batches_give_same_scores(lm: LM) -> None:
    """A request is one packed row; a token budget below one row's width still scores each
    request in its own forward, with the numbers of one shared batch."""
    prefixes = [PREFIX, "Another user entirely.", "A third user, who likes horror."]
    want = Scorer(lm).score_many([(p, OPTIONS) for p in prefixes])
    scorer = Scorer(lm, batch_tokens=1)
    got = scorer.score_many([(p, OPTIONS) for p in prefixes])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert scorer.stats.forwards == 2 * len(prefixes)  # each prefix, then each row, alone


def test_repeated_prefix_hits_lru(lm: LM) -> None:
    scorer = Scorer(lm, cache_size=2)
    first = scorer.score(PREFIX, OPTIONS)
    assert scorer.score(PREFIX, OPTIONS) == pytest.approx(first, abs=1e-6)
    stats = scorer.stats
    assert (stats.prefix_hits, stats.prefix_misses, stats.forwards) == (1, 1, 3)
    scorer.score("Another user entirely.", OPTIONS[:1])
    scorer.score("A third user.", OPTIONS[:1])  # evicts PREFIX (least recently used)
    scorer.stats.reset()
    scorer.score(PREFIX, OPTIONS[:1])
    assert scorer.stats.prefix_hits == 0


def test_the_cache_is_bounded_in_bytes_as_well_as_entries(lm: LM) -> None:
    """A byte budget evicts least recently used prefixes even under a large ``cache_size``,
    but never one the current call returns; scores are those of an unbounded cache."""
    prefixes = [f"User {k} likes {'Drama ' * k}." for k in range(1, 7)]
    unbounded = Scorer(lm, cache_size=100)
    want = unbounded.score_many([(p, OPTIONS) for p in prefixes])
    one = max(e.nbytes for e in unbounded._cache.values())
    bounded = Scorer(lm, cache_size=100, cache_bytes=2 * one)
    got = [bounded.score(p, OPTIONS) for p in prefixes]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert list(bounded._cache) == prefixes[-2:]
    assert bounded._cached_bytes == sum(e.nbytes for e in bounded._cache.values()) <= 2 * one
    bounded.score_many([(p, OPTIONS) for p in prefixes])  # one call keeps all it needs
    assert len(bounded._cache) == len(prefixes)
    bounded.clear()
    assert bounded._cached_bytes == 0 and not bounded._cache


def test_longer_and_sibling_prefixes_reuse_cached_tokens(lm: LM) -> None:
    scorer = Scorer(lm)
    scorer.score(PREFIX, OPTIONS)
    shared = len(encode(lm.tokenizer, [PREFIX]))
    for page in ["2. Heat (1995)\n", "2. Casino (1995)\nWhat next?"]:
        scorer.stats.reset()
        got = scorer.score(PREFIX + page, OPTIONS)
        assert scorer.stats.prefix_extends == 1
        assert scorer.stats.reused_tokens >= shared - 1
        assert got == pytest.approx(scorer.score_naive(PREFIX + page, OPTIONS), abs=1e-4)


def test_cached_entry_is_never_mutated(lm: LM) -> None:
    scorer = Scorer(lm)
    scorer.score(PREFIX, OPTIONS)
    entry = scorer._cache[PREFIX]
    before = [(k.clone(), v.clone()) for k, v in entry.kv]
    scorer.score(PREFIX, OPTIONS)
    scorer.score(PREFIX + "2. Heat (1995)\n", OPTIONS)
    assert all(k.shape[0] == 1 for k, _ in entry.kv)
    for (k0, v0), (k1, v1) in zip(before, entry.kv, strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_empty_prefix_or_target_is_rejected(lm: LM) -> None:
    scorer = Scorer(lm)
    with pytest.raises(ValueError):
        scorer.score("", OPTIONS)
    with pytest.raises(ValueError):
        scorer.score(PREFIX, [("ctx", "")])
    with pytest.raises(ValueError):
        scorer.score_naive(PREFIX, [("ctx", "")])
    assert scorer.score(PREFIX, []) == []


def test_encode_tokenises_segments_separately(lm: LM) -> None:
    tok = lm.tokenizer
    parts = ["Page 1:", " Heat (1995)", "", " 4 stars."]
    expected = [i for p in parts for i in tok.encode(p, add_special_tokens=False)]
    assert encode(tok, parts) == expected
    assert encode(tok, ["hi"])[0] != tok.bos_token_id  # nothing is added
    assert encode(tok, ["<|im_start|>user"])[0] == tok.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(TypeError):
        encode(tok, "a string")  # type: ignore[arg-type]


def test_generate_is_greedy_and_stops(lm: LM) -> None:
    scorer = Scorer(lm)
    full = scorer.generate("Tell me about movies.", max_new_tokens=6)
    assert isinstance(full, str)
    assert scorer.stats.forwards <= 6
    assert scorer.generate("Tell me about movies.", max_new_tokens=6) == full
    assert len(full) >= 2
    stop = full[len(full) // 2]
    cut = scorer.generate("Tell me about movies.", max_new_tokens=6, stop=stop)
    assert cut == full[: full.index(stop)] and stop not in cut


def test_score_many_equals_score_across_prefixes(lm: LM) -> None:
    requests = [(PREFIX, OPTIONS), ("Short.", OPTIONS[:2]), (PREFIX + "2. Heat (1995)\n",
                                                          OPTIONS[1:]), (PREFIX, OPTIONS[2:])]
    batched = Scorer(lm).score_many(requests)
    one = Scorer(lm)
    for (prefix, options), got in zip(requests, batched, strict=True):
        assert got == pytest.approx(one.score(prefix, options), abs=1e-4)
    # Small token budgets split the work into many forwards with the same numbers.
    small = Scorer(lm, batch_tokens=16)
    again = small.score_many(requests)
    assert small.stats.forwards > 2
    for a, b in zip(again, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_score_many_extends_cached_prefixes_with_the_same_numbers(lm: LM) -> None:
    """A user's next page starts from the cached KV of their persona: only the new tokens are
    computed, and every score equals the uncached reference."""
    personas = [f"You are user {u}, a {20 + u}-year-old who likes sci-fi and long films.\n"
                for u in range(3)]
    page = "Page {p}:\n1. Alien (1979)\n2. Heat (1995)\n"
    scorer = Scorer(lm)
    scorer.score_many([(p + page.format(p=1), OPTIONS) for p in personas])
    assert scorer.stats.prefix_extends == 0
    second = [(p + page.format(p=2), OPTIONS) for p in personas]
    got = scorer.score_many(second)
    assert scorer.stats.prefix_extends == 3
    shared = len(encode(lm.tokenizer, [personas[0] + "Page "]))
    assert scorer.stats.reused_tokens >= 3 * (shared - 2)
    reference = Scorer(lm)
    for (prefix, options), scores in zip(second, got, strict=True):
        assert scores == pytest.approx(reference.score_naive(prefix, options), abs=1e-4)


def test_one_call_computes_the_persona_its_pages_share_once(lm: LM) -> None:
    """A list's pages arrive in one call with nothing cached: the persona they share goes
    through the model once, as a base each page extends; every score equals the uncached
    reference, and fewer token positions are pushed than page by page."""
    personas = [f"You are user {u}, a {20 + u}-year-old. " + "You like sci-fi and long films. "
                * 6 + "\n" for u in range(2)]
    pages = [f"Page {p}:\n1. Alien (1979)\n2. {t}\n" for p, t in ((1, "Heat (1995)"),
                                                                  (2, "Fargo (1996)"),
                                                                  (3, "Casino (1995)"))]
    requests = [(who + page, OPTIONS) for who in personas for page in pages]
    shared = len(encode(lm.tokenizer, [personas[0] + "Page "]))
    assert shared > 40
    scorer = Scorer(lm)
    got = scorer.score_many(requests)
    assert scorer.stats.prefix_extends == 6
    assert scorer.stats.reused_tokens >= 6 * (shared - 2)
    alone = Scorer(lm)
    for request in requests:  # a new scorer per page: nothing to share
        alone.clear()
        alone.score_many([request])
    assert scorer.stats.tokens < alone.stats.tokens - 3 * (shared - 2)
    for (prefix, options), scores in zip(requests, got, strict=True):
        assert scores == pytest.approx(Scorer(lm).score_naive(prefix, options), abs=1e-4)


def test_generate_many_equals_generate(lm: LM) -> None:
    prompts = ["Tell me about movies.", "Hi", "A much longer prompt about a person who likes "
               "science fiction films and dislikes musicals.\n"]
    scorer = Scorer(lm)
    alone = [scorer.generate(p, max_new_tokens=6) for p in prompts]
    # the reference: transformers' own greedy decoding, one unpadded prompt at a time
    tok = lm.tokenizer
    for p, text in zip(prompts, alone, strict=True):
        ids = torch.tensor([encode(tok, [p])])
        ref = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=6, do_sample=False,
                                pad_token_id=tok.pad_token_id or tok.eos_token_id)
        assert tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) == text
    assert scorer.generate_many(prompts, max_new_tokens=6, batch=2) == alone
    scorer.clear()
    scorer.stats.reset()
    # three lengths in one batch: one prefix pass and one forward per new token after the first
    assert scorer.generate_many(prompts, max_new_tokens=6, batch=3) == alone
    assert scorer.stats.forwards <= 1 + 5
    assert len({len(encode(lm.tokenizer, [p])) for p in prompts}) == 3
    # one-off prompts are not cached: they would evict the personas later pages reuse
    assert not scorer._cache and scorer._cached_bytes == 0


def test_generate_many_ignores_the_warm_cache(lm: LM) -> None:
    """Next pages must not depend on what the scorer computed before: in bf16 a prompt
    extended from a cached persona sums in another order, and one near-tie flips a text."""
    persona = "You are user 7, a 30-year-old engineer who likes science fiction films. " * 3
    prompts = [persona + "Page 1: Alien (1979). Next page:", persona + "Page 2: Heat. Next:"]
    cold = Scorer(lm)
    want = cold.generate_many(prompts, max_new_tokens=6)
    cold_kv = Scorer(lm).prefixes({p: encode(lm.tokenizer, [p]) for p in prompts}, keep=False)
    warm = Scorer(lm)
    warm.prefixes({persona: encode(lm.tokenizer, [persona])})
    before = (warm.stats.reused_tokens, warm.stats.prefix_hits, warm.stats.tokens)
    assert warm.generate_many(prompts, max_new_tokens=6) == want
    # the same work as the cold scorer's (whose two prompts share their start within the call)
    assert (warm.stats.reused_tokens - before[0], warm.stats.prefix_hits - before[1],
            warm.stats.tokens - before[2]) == (cold.stats.reused_tokens, 0, cold.stats.tokens)
    got = warm.prefixes({p: encode(lm.tokenizer, [p]) for p in prompts}, keep=False,
                        reuse=False)
    for p in prompts:  # bit for bit what a cold scorer computes
        for (k, v), (k0, v0) in zip(got[p].kv, cold_kv[p].kv, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
    # by default the persona's KV is extended, as pages are
    reused = warm.stats.reused_tokens
    warm.prefixes({prompts[0]: encode(lm.tokenizer, [prompts[0]])}, keep=False)
    assert warm.stats.reused_tokens > reused


def test_generate_many_stops_each_row_at_its_eos() -> None:
    lm = tiny_lm()
    scorer = Scorer(lm)
    prompts = ["Hello", "A longer prompt that goes on for a while.", "Hi there"]
    free = scorer.generate_many(prompts, max_new_tokens=5)
    # the first prompt's first greedy token becomes an end token: that row ends at once
    first = {p: int(e.next_logprobs.argmax()) for p, e in scorer.prefixes(
        {p: encode(lm.tokenizer, [p]) for p in prompts}).items()}
    assert first[prompts[1]] != first[prompts[0]]
    lm.model.generation_config.eos_token_id = first[prompts[0]]
    cut = scorer.generate_many(prompts, max_new_tokens=5)
    assert cut == [scorer.generate(p, max_new_tokens=5) for p in prompts]
    assert cut[0] == "" != free[0]
    assert cut[1] != "" and any(c != f for c, f in zip(cut, free, strict=True))


def test_generate_stops_at_eos() -> None:
    lm = tiny_lm()
    scorer = Scorer(lm)
    first = encode(lm.tokenizer, [scorer.generate("Hello", max_new_tokens=1)])
    lm.model.generation_config.eos_token_id = first[0]
    assert scorer.generate("Hello", max_new_tokens=5) == ""


def test_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNUSER_DTYPE", "fp32")
    assert best_dtype() == torch.float32
    monkeypatch.setenv("ALIGNUSER_DTYPE", "bf16")
    assert best_dtype() == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32
    with pytest.raises(ValueError):
        resolve_dtype("int3")


def test_load_lm_round_trip(lm: LM, tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    loaded = load_lm(folder, dtype="fp32", device="cpu")
    assert loaded.name == "tiny" and loaded.dtype == torch.float32
    assert loaded.model.config._attn_implementation == "sdpa_gqa"
    assert not loaded.model.training
    assert Scorer(loaded).score(PREFIX, OPTIONS) == pytest.approx(
        Scorer(lm).score(PREFIX, OPTIONS), abs=1e-5
    )


def test_grouped_attention_scores_as_repeated_heads() -> None:
    """The CPU attention (``agents.attention``) passes grouped key/value heads to the kernel
    instead of copying them per query head: a padded tree batch over cached prefixes scores
    the same either way, and a CPU load switches to it."""
    from agents.attention import NAME, use_grouped_attention

    grouped = tiny_lm(seed=5)
    assert grouped.model.config._attn_implementation == NAME
    requests = [(PREFIX, OPTIONS), (PREFIX + "2. Heat (1995)\n", OPTIONS[:2]),
                ("A much shorter one.", OPTIONS[2:])]
    ours = Scorer(grouped).score_many(requests)
    grouped.model.set_attn_implementation("sdpa")
    assert grouped.model.config._attn_implementation == "sdpa"
    theirs = Scorer(grouped).score_many(requests)
    assert [x for r in ours for x in r] == pytest.approx([x for r in theirs for x in r],
                                                        abs=1e-5)
    grouped.model.set_attn_implementation("eager")
    assert not use_grouped_attention(grouped.model)  # only sdpa is switched


def test_peft_adapter_loads_and_changes_scores(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny = tiny_lm(seed=3)
    tiny.model.save_pretrained(base_dir)
    tiny.tokenizer.save_pretrained(base_dir)
    base = load_lm(base_dir, dtype="fp32")
    base_scores = Scorer(base).score(PREFIX, OPTIONS)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trained = get_peft_model(load_lm(base_dir, dtype="fp32").model, lora)
    trained.save_pretrained(adapter_dir)
    expected = Scorer(LM(trained.eval(), base.tokenizer, "mem")).score_naive(PREFIX, OPTIONS)

    for loaded in (load_lm(base_dir, adapter=adapter_dir, dtype="fp32"),
                   load_lm(adapter_dir, dtype="fp32")):  # base read from adapter_config.json
        assert loaded.name == "base+adapter"
        scorer = Scorer(loaded)
        scores = scorer.score(PREFIX, OPTIONS)
        assert scores == pytest.approx(expected, abs=1e-4)
        assert scores == pytest.approx(scorer.score_naive(PREFIX, OPTIONS), abs=1e-4)
        assert max(abs(a - b) for a, b in zip(scores, base_scores, strict=True)) > 1e-2


def test_langchain_text_model_with_fake_chat_model() -> None:
    from langchain_core.language_models import FakeListChatModel

    model = LangChainTextModel(FakeListChatModel(responses=["  I liked it. ", "second"]))
    assert isinstance(model, TextModel)
    assert model.complete("How was it?", 20) == "I liked it."
    assert model.complete("And again?", 20) == "second"


def test_local_text_model_uses_chat_template(lm: LM) -> None:
    local = LocalTextModel(lm, system="You are terse.")
    text = local.prompt_text("Hi")
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert isinstance(local, TextModel)
    assert isinstance(local.complete("Hi", max_new_tokens=3), str)
    assert local.scorer.stats.forwards <= 3


@pytest.mark.slow
def test_real_model_scores_a_decision() -> None:
    lm = load_lm()
    scorer = Scorer(lm)
    messages = [
        {"role": "system", "content": "You are a 40-year-old teacher who loves crime dramas."},
        {"role": "user", "content": "Would you watch Fargo (1996)? Answer yes or no."},
    ]
    prefix = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    options = [("", "Yes"), ("", "No")]
    cached = scorer.score(prefix, options)
    naive = scorer.score_naive(prefix, options)
    assert all(math.isfinite(x) and x < 0 for x in cached + naive)
    tolerance = 0.3 if lm.dtype == torch.bfloat16 else 1e-3
    assert cached == pytest.approx(naive, abs=tolerance)
