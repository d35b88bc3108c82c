"""Per-token losses straight from the final hidden states (no ``[tokens, vocab]`` logits).

Evaluation and DPO need per-token log-probabilities, not just the mean the model's own
loss returns. :func:`token_losses` runs the model with its output head replaced by a
stand-in that captures the head's input (as :mod:`trilora.patches.fused_loss` does for training),
then scores the tokens with :func:`trilora.ops.linear_cross_entropy` in chunks, so memory
stays at one chunk of logits whatever the vocabulary. Heads the fused op cannot serve
(a bias, a quantized head, logit soft-capping) take the plain logits path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trilora.distributed import parallel_info, unwrap
from trilora.ops.linear_cross_entropy import linear_cross_entropy
from trilora.train.data import IGNORE

__all__ = ["compute_device", "sft_loss", "token_losses"]

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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


def _fusable(lm: nn.Module) -> bool:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or not head.weight.is_floating_point():
        return False
    cfg = getattr(lm, "config", None)
    return not any(getattr(cfg, n, None) not in (None, 0, 0.0, 1, 1.0) for n in _LOGIT_TRANSFORMS)


@contextmanager
def _score_head_input(head: nn.Module, labels: torch.Tensor, reduction: str, into: list):
    """Replace ``head`` by a stand-in that scores its input against ``labels`` with the
    fused op, inside the model's forward, where FSDP2 holds the head's full weight.

    ``"none"`` (per-token losses, which DPO differentiates) leaves the model as its
    "logits" ``[B, T, 1]``: a model output, so FSDP2's pre-backward hook gathers the head
    again before the op's backward needs it. ``"sum"`` (evaluation) is kept in ``into``.
    """

    def stand_in(hidden: torch.Tensor) -> torch.Tensor:
        weight = head.weight
        h = hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype)
        with torch.autocast(h.device.type, enabled=False):  # the op picks its own precision
            scored = linear_cross_entropy(h, weight, labels, IGNORE, reduction)
        if reduction == "none":
            # a copy, not a view: FSDP2 warns that in-place ops on views would lose its hook
            return scored.unsqueeze(-1).clone()
        into.append(scored)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    head.forward = stand_in
    try:
        yield
    finally:
        del head.forward


def _inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def token_losses(
    model: nn.Module,
    batch: dict[str, Any],
    reduction: str = "none",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross-entropy of every next token: fp32 ``[B, T]`` (0 where ignored), or its sum.

    ``batch`` holds ``input_ids``, ``labels`` and ``attention_mask`` or ``position_ids``
    (see :func:`trilora.train.data.collate`); position ``t`` scores ``labels[t + 1]``.
    """
    lm = _causal_lm(model)
    device = compute_device(model)
    labels = batch["labels"].to(device)
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )
    if _fusable(lm):
        head = lm.get_output_embeddings()
        scored: list[torch.Tensor] = []
        with _score_head_input(head, labels, reduction, scored), ctx:
            out = model(**_inputs(batch, device), use_cache=False)
        return scored[-1] if scored else out.logits.squeeze(-1)
    with ctx:
        logits = model(**_inputs(batch, device), use_cache=False).logits
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
    """Summed next-token cross-entropy of ``batch`` divided by ``num_items``.

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
    return out.loss
