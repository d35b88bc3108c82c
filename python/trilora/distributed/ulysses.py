"""Ulysses sequence parallelism: attention over a sequence split across ranks.

Each of the ``P`` ranks of a sequence-parallel group holds ``T / P`` consecutive tokens of
every sequence, so every activation outside attention (projections, MLP, norms, the loss)
is ``1/P`` of the single-GPU size. Attention needs all ``T`` keys, so around it
:func:`ulysses_attention` swaps the split with two all-to-alls (DeepSpeed-Ulysses, as
used by Snowflake's ALST and axolotl):

* before: ``q, k, v`` ``[B, H, T/P, D]`` (all heads, this rank's tokens) become
  ``[B, H/P, T, D]`` (this rank's heads, all tokens);
* attention runs unchanged on ``H/P`` heads of the full causal sequence (flash attention
  keeps it O(T) in memory);
* after: the output ``[B, H/P, T, D]`` goes back to ``[B, H, T/P, D]``.

Each all-to-all moves ``(P - 1) / P`` of the tensor; both are differentiable (their
backward is the reverse all-to-all). Grouped-query attention splits its ``KV`` key/value
heads too when ``P`` divides ``KV``; otherwise they are repeated up to the query heads
first (more traffic, same result).

:func:`enable_ulysses` installs this around the model's own attention implementation
through transformers' public ``AttentionInterface``. The caller feeds each rank its slice
of the tokens (:func:`shard_sequence`) with the *global* ``position_ids`` (so rotary
embeddings are right), without a padding mask (sequences are packed or of equal length,
``T`` divisible by ``P``), and computes the loss on labels shifted *before* slicing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["enable_ulysses", "shard_sequence", "ulysses_attention"]

ATTENTION_NAME = "trilora_ulysses"


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` ``[P, ...]``: chunk ``i`` goes to rank ``i``; returns ``[P, ...]`` where chunk
    ``i`` came from rank ``i``. Differentiable."""

    x = x.contiguous()
    return all_to_all_single(torch.empty_like(x), x, group=group)


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, H, T/P, D]`` (all heads of this rank's tokens) -> ``[B, H/P, T, D]``."""
    p = dist.get_world_size(group)
    b, h, t, d = x.shape
    if h % p:
        raise ValueError(f"{h} heads cannot be split over {p} sequence-parallel ranks")
    x = x.reshape(b, p, h // p, t, d).permute(1, 0, 2, 3, 4)  # [P, B, H/P, T/P, D]
    y = _all_to_all(x, group)  # chunk i: rank i's tokens, my heads
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * t, d)


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, H/P, T, D]`` (this rank's heads, all tokens) -> ``[B, H, T/P, D]``."""
    p = dist.get_world_size(group)
    b, hp, t, d = x.shape
    if t % p:
        raise ValueError(f"sequence length {t} is not divisible by {p} ranks")
    x = x.reshape(b, hp, p, t // p, d).permute(2, 0, 1, 3, 4)  # [P, B, H/P, T/P, D]
    y = _all_to_all(x, group)  # chunk i: rank i's heads, my tokens
    return y.permute(1, 0, 2, 3, 4).reshape(b, p * hp, t // p, d)


class _LocalHeads:
    """The attention module as the inner attention function sees it on ``H/P`` heads:
    everything is the module's, except the query-per-key/value-head ratio."""

    def __init__(self, module: torch.nn.Module, groups: int) -> None:
        self._module = module
        self.num_key_value_groups = groups

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    inner,
    group=None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of this rank's ``T/P`` tokens against the whole sequence.

    Args:
        module: the attention module (passed to ``inner``).
        query: ``[B, H, T/P, D]``; key, value: ``[B, KV, T/P, D]``; this rank's tokens.
        attention_mask: must be None (causal attention over unpadded sequences): a mask
            built for ``T/P`` tokens cannot describe the full sequence.
        inner: a transformers attention function (e.g. ``sdpa_attention_forward``) run on
            ``H/P`` heads of the full sequence; returns ``([B, T, H/P, D], weights)``.
        group: the sequence-parallel process group (default: the whole world).
        **kwargs: passed to ``inner`` (``scaling``, ``dropout``, ...).

    Returns:
        ``([B, T/P, H, D], None)``, as transformers' attention functions.
    """
    if attention_mask is not None:
        raise ValueError(
            "Ulysses sequence parallelism runs causal attention without a padding mask: "
            "pack or pad sequences to equal length and pass no attention_mask"
        )
    p = dist.get_world_size(group)
    h, kv = query.shape[1], key.shape[1]
    if h % p:
        raise ValueError(f"{h} attention heads cannot be split over {p} ranks")
    if kv % p:
        # too few key/value heads to split: repeat them up to one per query head
        key = key.repeat_interleave(h // kv, dim=1)
        value = value.repeat_interleave(h // kv, dim=1)
        kv = h
    q = heads_to_sequence(query, group)
    k = heads_to_sequence(key, group)
    v = heads_to_sequence(value, group)
    kwargs.pop("is_causal", None)
    out, _ = inner(_LocalHeads(module, h // kv), q, k, v, None, **kwargs)  # [B, T, H/P, D]
    out = sequence_to_heads(out.transpose(1, 2), group)  # [B, H, T/P, D]
    return out.transpose(1, 2).contiguous(), None


def enable_ulysses(model: torch.nn.Module, group=None) -> str:
    """Run ``model``'s attention as :func:`ulysses_attention` around its current
    implementation (e.g. ``"sdpa"``); returns the previous implementation's name.

    Uses transformers' public ``AttentionInterface`` and ``set_attn_implementation``.
    """

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = getattr(base.config, "_attn_implementation", None) or "sdpa"
    if previous == ATTENTION_NAME:
        previous = getattr(base, "_trilora_ulysses_inner", "sdpa")
    if previous == "eager":
        raise ValueError(
            "Ulysses wraps a transformers attention function; the model uses eager attention "
            "(load it with attn_implementation='sdpa' or 'flash_attention_2')"
        )
    inner = ALL_ATTENTION_FUNCTIONS[previous]

    def attention(module, query, key, value, attention_mask, **kwargs):
        return ulysses_attention(
            module, query, key, value, attention_mask, inner=inner, group=group, **kwargs
        )

    AttentionInterface.register(ATTENTION_NAME, attention)
    base.set_attn_implementation(ATTENTION_NAME)
    base._trilora_ulysses_inner = previous
    return previous


def shard_sequence(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    group=None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """This rank's slice of a ``[B, T]`` batch for sequence parallelism.

    Returns ``input_ids`` and ``position_ids`` ``[B, T/P]`` (global positions) and, when
    ``labels`` are given, ``shift_labels`` ``[B, T/P]``: the labels shifted by one token
    *before* slicing (the last position gets ``ignore_index``), so that a loss that does
    not shift again (transformers' ``shift_labels=``) sees every target exactly once.
    """
    p = dist.get_world_size(group)
    r = dist.get_rank(group)
    t = input_ids.shape[-1]
    if t % p:
        raise ValueError(f"sequence length {t} is not divisible by {p} sequence-parallel ranks")
    n = t // p
    sl = slice(r * n, (r + 1) * n)
    positions = torch.arange(t, device=input_ids.device).expand_as(input_ids)
    out = {"input_ids": input_ids[..., sl], "position_ids": positions[..., sl]}
    if labels is not None:
        shifted = torch.full_like(labels, ignore_index)
        shifted[..., :-1] = labels[..., 1:]
        out["shift_labels"] = shifted[..., sl]
    return out
