"""The attention the memory trace assumes: causal flash attention, no padding mask.

Registered with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` under
:data:`NAME`. The mask function returns None (causality is applied inside the kernel, as
FlashAttention-2 does with ``causal=True``), and the attention calls
``F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)``, which with no mask
dispatches to a flash kernel: it saves q, k, v, the output and a per-row logsumexp, O(T)
memory, and never builds the T x T scores or repeats the key/value heads.

transformers' stock "sdpa" path cannot be used for the trace: its mask builder cannot prove
on fake tensors that the mask is all-causal, so it builds a T x T boolean mask, which also
forces the math kernel and ``repeat_kv``. The trace models packed, unpadded sequences (the
usual long-context setup); padded batches would need varlen flash attention, same memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "trilora_causal_sdpa"  # no "flash" in it: transformers would look for flash_attn


def _no_mask(*args, **kwargs) -> None:
    return None


def flash_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``[B, Hq, T, D]`` q and ``[B, Hkv, T, D]`` k/v -> ``[B, T, Hq, D]`` causal attention."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} assumes causal attention without a padding mask")
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout if module.training else 0.0, scale=scaling,
        is_causal=True, enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, flash_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME
