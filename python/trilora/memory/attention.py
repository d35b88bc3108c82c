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

The backward's workspace is added explicitly, because the CPU kernel the trace runs does not
allocate what CUDA's does (:func:`trilora.ops.attention.flash_backward_workspace`: the
fp32 ``dq`` accumulator and, for grouped-query attention, ``dk``/``dv`` per query head; 32 KB
per token for Llama-3.1-8B): :func:`flash_attention_forward` allocates it in a pre-hook of
the attention's backward node and frees it in a post-hook, so the tracker sees it exactly
then. ``register(grouped=True)`` traces trilora's grouped attention instead
(:mod:`trilora.patches.grouped_attention`), whose op allocates the workspace of one group at a time itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from trilora.ops.attention import flash_backward_workspace
from trilora.patches.grouped_attention import grouped_attention_forward

# No "flash", "flex" or "sdpa" in the name: transformers would check that the model supports
# that kernel (Gemma-2 does not support SDPA) and look for flash_attn.
NAME = "trilora_causal_trace"
GROUPED_NAME = "trilora_causal_grouped"


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
        query,
        key,
        value,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        is_causal=True,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    if out.grad_fn is not None:
        _add_backward_workspace(out.grad_fn, query, key)
    return out.transpose(1, 2).contiguous(), None


def _add_backward_workspace(node, query: torch.Tensor, key: torch.Tensor) -> None:
    shapes = flash_backward_workspace(query, key)
    device = query.device
    held: list[torch.Tensor] = []

    def allocate(grad_outputs):
        held.extend(torch.empty(s, dtype=dt, device=device) for s, dt in shapes)

    def release(grad_inputs, grad_outputs):
        held.clear()

    node.register_prehook(allocate)
    node.register_hook(release)


def register(grouped: bool = False) -> str:
    """Register the traced attention with transformers (idempotent); returns its name.

    ``grouped``: trilora's grouped flash attention (:mod:`trilora.patches.grouped_attention`) rather than one
    flash call over all heads.
    """
    from transformers.masking_utils import AttentionMaskInterface

    # The user-facing grouped attention itself; with no mask (below) it always takes the
    # grouped path, as it does on CUDA for unpadded causal batches.
    name, fn = (
        (GROUPED_NAME, grouped_attention_forward) if grouped else (NAME, flash_attention_forward)
    )
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)
    return name
