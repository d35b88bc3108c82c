"""Make a transformers causal LM compute its training loss with the fused linear cross-entropy.

:func:`enable_fused_cross_entropy` patches the causal LM's ``forward`` (the instance, not the
class) so that, when ``labels`` are given, the output head is bypassed: its input (the final
hidden states) is captured, the model's own forward runs to the end with a zero-width stand-in
for the logits, and the loss is computed by :func:`trilora.ops.linear_cross_entropy.
linear_cross_entropy` from the hidden states and the head's weight. Full ``[tokens, vocab]``
logits never exist; the output's ``logits`` is None. Without labels (generation), or in eval
mode (metrics need logits), the model's standard forward runs.

Nothing is model-specific: the head is ``get_output_embeddings()``, and a PeftModel is
unwrapped with ``get_base_model()`` (PEFT's forward calls the base model's forward, so the
patch is on the path). Models whose logits are transformed after the head (Gemma-2's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``) or whose
head has a bias or is quantized keep the standard loss, with a warning.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from trilora.nn import QuantizedLinear
from trilora.ops.linear_cross_entropy import linear_cross_entropy
from trilora.patches.introspection import base_transformers_model

__all__ = ["disable_fused_cross_entropy", "enable_fused_cross_entropy"]

# config attributes that change logits after the head: the fused loss would be wrong
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def _causal_lm(model: nn.Module) -> nn.Module:
    return base_transformers_model(model, "get_output_embeddings", "a transformers causal LM")


def _unsupported(lm: nn.Module, head: nn.Module | None) -> str | None:
    if head is None:
        return "the model has no output embeddings"
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or isinstance(head, QuantizedLinear):
        return f"the output head is a {type(head).__name__}, not a float nn.Linear"
    if (
        weight is None
        or not weight.is_floating_point()
        or tuple(weight.shape) != (head.out_features, head.in_features)
    ):
        return "the output head's weight is not a [vocab, hidden] float tensor (quantized head?)"
    if getattr(head, "bias", None) is not None:
        return "the output head has a bias"
    cfg = getattr(lm, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None) if cfg is not None else None
        if value not in (None, 1, 1.0, 0, 0.0):
            return f"config.{name}={value} transforms the logits after the head"
    return None


def _fused_forward(orig, lm: nn.Module, z_loss: float, chunk_size: int | None, *args, **kwargs):
    labels = kwargs.get("labels")
    # fused_lm_head is TRL's own fused head (per-token log-probs without logits): its caller
    # needs that output, and it already avoids the full logits.
    if labels is None or not lm.training or kwargs.get("fused_lm_head"):
        # generation and evaluation keep real logits (metrics need them); memory is a
        # training-step problem
        return orig(*args, **kwargs)
    kwargs.pop("labels")
    head = lm.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def stand_in(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        # zero-width logits: whatever the model does to them afterwards costs nothing
        return hidden.new_empty((*hidden.shape[:-1], 0))

    head.forward = stand_in
    try:
        out = orig(*args, **kwargs)
    finally:
        del head.forward
    hidden = captured[-1]
    weight = head.weight
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the hidden states cover "
            f"{tuple(hidden.shape[:-1])} positions (logits_to_keep is not supported with labels)"
        )
    ignore_index = kwargs.get("ignore_index", -100)
    num_items = kwargs.get("num_items_in_batch")
    labels = labels.to(hidden.device)
    if num_items is not None:
        # Hugging Face's gradient-accumulation convention: sum, divided by the token count of
        # the whole accumulated batch.
        loss = linear_cross_entropy(hidden, weight, labels, ignore_index, "sum", chunk_size, z_loss)
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    else:
        loss = linear_cross_entropy(
            hidden, weight, labels, ignore_index, "mean", chunk_size, z_loss
        )
    if isinstance(out, tuple):
        return (loss, *out[1:])
    out["loss"] = loss
    out["logits"] = None
    return out


def enable_fused_cross_entropy(
    model: nn.Module, z_loss: float = 0.0, chunk_size: int | None = None
) -> bool:
    """Compute ``model``'s loss from hidden states with the fused linear cross-entropy.

    Args:
        model: a transformers causal LM (``*ForCausalLM``) or a PeftModel wrapping one.
        z_loss: optional ``z_loss * logsumexp**2`` auxiliary term per token.
        chunk_size: tokens per chunk of the fused loss (default: its own heuristic).

    Returns:
        True if the fused loss is installed; False (with a warning) if the model's head or
        config needs the standard path (see the module docstring).

    When ``labels`` are passed in training mode, the output's ``loss`` is the mean cross-entropy over
    non-ignored tokens (shifted, Hugging Face convention; ``num_items_in_batch`` is honored)
    and ``logits`` is None. Undo with :func:`disable_fused_cross_entropy`.
    """
    lm = _causal_lm(model)
    why = _unsupported(lm, lm.get_output_embeddings())
    if why is not None:
        warnings.warn(
            f"trilora fused cross-entropy not enabled: {why}", RuntimeWarning, stacklevel=2
        )
        return False
    disable_fused_cross_entropy(model)
    # Wrap the instance's current forward, not the class's: another instance-level patch
    # (TRL's fused LM head, say) stays underneath and is restored by disable.
    previous = lm.__dict__.get("forward")
    orig = lm.forward

    # wraps() keeps the original signature visible: transformers.Trainer drops every dataset
    # column that forward()'s signature does not name.
    @functools.wraps(orig)
    def forward(*args, **kwargs):
        return _fused_forward(orig, lm, float(z_loss), chunk_size, *args, **kwargs)

    lm.forward = forward
    lm._trilora_fused_ce = True
    lm._trilora_previous_forward = previous
    return True


def disable_fused_cross_entropy(model: nn.Module) -> None:
    """Restore the model's standard loss (no-op if the fused loss is not enabled)."""
    lm = _causal_lm(model)
    if getattr(lm, "_trilora_fused_ce", False):
        previous = lm.__dict__.pop("_trilora_previous_forward", None)
        if previous is None:
            lm.__dict__.pop("forward", None)
        else:
            lm.forward = previous
        del lm._trilora_fused_ce
