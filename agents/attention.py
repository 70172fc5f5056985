"""Grouped-query attention without copying keys and values on the CPU.

transformers' ``sdpa`` attention repeats each key/value head once per query head it serves
(``repeat_kv``) whenever a mask is passed, and every scoring forward passes one (padding, the
option tree). On SmolLM2-135M (9 query heads, 3 key/value heads) that copies every cached
prefix three times per layer per forward. PyTorch's CPU kernel takes the grouped heads
directly (``enable_gqa``): the same output, and the kernel 1.6x faster on a page-sized batch
on an idle 2-core CPU (``bench/bench_attention.py``; the full agent's lists 9% faster).
CUDA's fused kernels refuse a mask with grouped heads and fall back to the slow math kernel,
so this is used on the CPU only.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_gqa"


def _forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
             scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any
             ) -> tuple[torch.Tensor, None]:
    """``sdpa`` attention with the key/value heads passed grouped, not repeated."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{NAME} attention supports neither softcap nor a position bias; "
                         "load the model with attn_implementation='eager'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_grouped_attention(model: Any, device: torch.device | None = None) -> bool:
    """Switch a model that runs ``sdpa`` with grouped heads on the CPU (``device``, or where
    it is now) to :data:`NAME`; anything else (CUDA, eager, flash, equal head counts) is left
    as it is. Returns whether it switched."""
    config = model.config
    grouped = getattr(config, "num_key_value_heads", None) not in (
        None, getattr(config, "num_attention_heads", None))
    where = device or model.device
    if where.type != "cpu" or config._attn_implementation != "sdpa" or not grouped:
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
