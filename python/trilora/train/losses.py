"""Per-token losses straight from the final hidden states (no ``[tokens, vocab]`` logits).

Evaluation and DPO need per-token log-probabilities, not just the mean the model's own
loss returns. :func:`token_losses` runs the model with its output head replaced by
:class:`trilora.patches.fused_loss.HeadScorer` (the stand-in the training loss uses too),
which scores the tokens with :func:`trilora.ops.linear_cross_entropy` in chunks, so memory
stays at one chunk of logits whatever the vocabulary. Heads the fused op cannot serve
(:func:`~trilora.patches.fused_loss.fused_head_unsupported`: a bias, a quantized head,
logit soft-capping) take the plain logits path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trilora.distributed import parallel_info, unwrap
from trilora.patches.fused_loss import HeadScorer, fused_head_unsupported
from trilora.train.data import IGNORE

__all__ = ["compute_device", "sequence_logps", "sft_loss", "sft_loss_and_aux", "token_losses"]


def _causal_lm(model: nn.Module) -> nn.Module:

    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compute_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its process's device when wrapped for a distributed run
    (FSDP2's CPU offload keeps the parameters in host memory), else its parameters'."""

    info = parallel_info(model)
    if info is not None:
        return info.env.device
    return next(p.device for p in model.parameters())


def _inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def token_losses(
    model: nn.Module,
    batch: dict[str, Any],
    reduction: str = "none",
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of every next token: fp32 ``[B, T]`` (0 where ignored), or its sum.

    ``batch`` holds ``input_ids``, ``labels`` and ``attention_mask`` or ``position_ids``
    (see :func:`trilora.train.data.collate`); position ``t`` scores ``labels[t + 1]``.
    ``temperature`` divides the logits first (the distribution sampling drew from).
    Through the fused head when :func:`~trilora.patches.fused_loss.fused_head_unsupported`
    allows (the rule the training loss follows), else through the logits.
    """
    lm = _causal_lm(model)
    device = compute_device(model)
    labels = batch["labels"].to(device)
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )
    if fused_head_unsupported(lm) is None:
        scorer = HeadScorer(lm, labels, reduction, ignore_index=IGNORE, temperature=temperature)
        with scorer, ctx:
            out = model(**_inputs(batch, device), use_cache=False)
        return scorer.result(out)
    with ctx:
        logits = model(**_inputs(batch, device), use_cache=False).logits
    if temperature != 1.0:
        logits = logits / temperature
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none"
    )
    return losses.sum() if reduction == "sum" else losses


def sft_loss(
    model: nn.Module,
    batch: dict[str, Any],
    num_items: int,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``batch`` divided by ``num_items`` (plus a mixture
    of experts' router loss, see :func:`sft_loss_and_aux`)."""
    return sft_loss_and_aux(model, batch, num_items, autocast_dtype)[0]


def sft_loss_and_aux(
    model: nn.Module,
    batch: dict[str, Any],
    num_items: int,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, aux_loss)``: the summed next-token cross-entropy of ``batch`` divided by
    ``num_items``, plus, for a mixture of experts that returns router logits, the router's
    load-balancing loss as the model adds it (``router_aux_loss_coef * aux_loss``);
    ``aux_loss`` is that unscaled auxiliary loss (None for other models).

    ``num_items`` is the number of loss tokens in the whole optimizer step (every
    micro-batch), so accumulating the gradients of the micro-batches gives exactly the
    gradient of the token-mean loss over the step. The model's own forward computes it
    (trilora's fused cross-entropy when enabled), with ``num_items_in_batch``.
    """
    device = compute_device(model)
    inputs = {k: v.to(device) for k, v in batch.items()}
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )
    with ctx:
        out = model(**inputs, num_items_in_batch=num_items, use_cache=False)
    return out.loss, getattr(out, "aux_loss", None)


def sequence_logps(
    model: nn.Module,
    batch: dict[str, Any],
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """fp32 ``[rows]``: the summed log-probability of each row's labelled tokens."""
    return -token_losses(model, batch, "none", autocast_dtype, temperature).sum(dim=-1)
