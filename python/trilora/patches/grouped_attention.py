"""Grouped causal flash attention as a transformers attention implementation.

:func:`enable_grouped_attention` registers :func:`grouped_attention_forward` with
transformers' ``AttentionInterface`` under :data:`NAME` (with the ``sdpa`` mask builder, so
unpadded causal batches get no mask at all) and switches the model to it with
``set_attn_implementation``. Calls the grouped kernel can serve (causal self-attention with
no mask, no attention dropout in training, no sliding window or soft-capping, half precision
on CUDA) run :func:`trilora.ops.attention.grouped_causal_attention`, which computes the same
flash attention one key/value head group at a time so that FlashAttention-2's backward
workspace (an fp32 ``dq`` accumulator and per-query-head ``dk``/``dv``, 32 KB per token for
Llama-3.1-8B) exists for one group only. Anything else (padding masks, generation with a KV
cache, sliding windows) goes to transformers' own SDPA attention, unchanged.

Opt-in: it changes the model's attention implementation, which is saved with its config;
:func:`disable_grouped_attention` restores the previous one. transformers has a public
setter (``set_attn_implementation``) but no public getter, so the current implementation is
read in one place, :func:`current_attn_implementation`. Where torch lacks the flash kernels
(:func:`trilora.ops.attention.flash_attention_ops`), every call goes to SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

from trilora.ops.attention import flash_attention_ops, grouped_causal_attention
from trilora.patches.introspection import base_transformers_model

__all__ = [
    "NAME",
    "current_attn_implementation",
    "disable_grouped_attention",
    "enable_grouped_attention",
    "grouped_attention_forward",
    "register",
]

NAME = "trilora_grouped"  # no "flash" in it: transformers would look for a flash kernel
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _servable(module, query, key, attention_mask, dropout, kwargs) -> bool:
    if attention_mask is not None or not getattr(module, "is_causal", True):
        return False
    if dropout and module.training:
        return False
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        return False
    if query.shape[2] != key.shape[2] or query.shape[2] < 2 or query.shape[1] % key.shape[1]:
        return False
    if flash_attention_ops(query.device.type) is None:
        return False
    if not query.is_cuda:
        return True
    # PyTorch's FlashAttention-2: sm_80+, half precision, head_dim <= 256, and not switched
    # off by the user (torch.backends.cuda.enable_flash_sdp(False)).
    return (
        query.dtype in _FLASH_DTYPES
        and query.shape[-1] <= 256
        and torch.cuda.get_device_capability(query.device) >= (8, 0)
        and torch.backends.cuda.flash_sdp_enabled()
    )


def grouped_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention signature: ``[B, Hq, T, D]`` q, ``[B, Hkv, T, D]`` k/v -> ``[B, T, Hq, D]``."""
    if not _servable(module, query, key, attention_mask, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return grouped_causal_attention(query, key, value, scaling), None


def register() -> str:
    """Register :data:`NAME` with transformers (idempotent); returns the name."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def _pretrained(model: nn.Module) -> nn.Module:
    return base_transformers_model(
        model, "set_attn_implementation", "a transformers PreTrainedModel"
    )


def current_attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation ``model`` (a transformers model or PeftModel) runs.

    The compatibility point for ``config._attn_implementation``: transformers (5.17 to the
    newest release) sets it through the public ``set_attn_implementation`` but exposes it only
    under that private name. None where a release no longer has it; callers then treat the
    implementation as unknown.
    """
    value = getattr(_pretrained(model).config, "_attn_implementation", None)
    return value if isinstance(value, str) else None


def enable_grouped_attention(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a transformers model or a PeftModel) to grouped flash attention.

    Returns ``model``. The previous implementation is remembered for
    :func:`disable_grouped_attention`.
    """
    base = _pretrained(model)
    previous = current_attn_implementation(base)
    if previous != NAME:
        base._trilora_previous_attn = previous
    base.set_attn_implementation(register())
    return model


def disable_grouped_attention(model: nn.Module) -> nn.Module:
    """Restore the attention implementation that :func:`enable_grouped_attention` replaced.

    When that implementation could not be read (see :func:`current_attn_implementation`),
    transformers' default for the model (``get_correct_attn_implementation(None)``: SDPA
    where available) is restored.
    """
    base = _pretrained(model)
    if "_trilora_previous_attn" not in base.__dict__:
        return model
    previous = base.__dict__.pop("_trilora_previous_attn")
    if current_attn_implementation(base) in (NAME, None):
        if previous is None:
            previous = base.get_correct_attn_implementation(None)
        base.set_attn_implementation(previous)
    return model
