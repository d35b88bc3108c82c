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
head has a bias or is quantized keep the standard loss, with a warning
(:func:`fused_head_unsupported`, the rule evaluation and log-probabilities follow too).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from trilora.ops.linear_cross_entropy import linear_cross_entropy
from trilora.patches.introspection import base_transformers_model

__all__ = [
    "HeadScorer",
    "disable_fused_cross_entropy",
    "enable_fused_cross_entropy",
    "fused_head_unsupported",
]

# config attributes that change logits after the head: the fused loss would be wrong
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def _causal_lm(model: nn.Module) -> nn.Module:
    return base_transformers_model(model, "get_output_embeddings", "a transformers causal LM")


def fused_head_unsupported(lm: nn.Module) -> str | None:
    """Why ``lm``'s output head cannot be scored from its input with the fused op, or None.

    The one rule for every fused path (the training loss, evaluation, log-probabilities):
    the head must be exactly ``h @ W.T`` with a float ``[vocab, hidden]`` weight: a plain
    ``nn.Linear`` (a subclass may change its forward; trilora's quantized layers are), no
    bias, and no config setting that transforms the logits after it.
    """
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings"
    if type(head) is not nn.Linear:
        return f"the output head is a {type(head).__name__}, not a float nn.Linear"
    weight = head.weight
    if not weight.is_floating_point() or tuple(weight.shape) != (
        head.out_features,
        head.in_features,
    ):
        return "the output head's weight is not a [vocab, hidden] float tensor (quantized head?)"
    if head.bias is not None:
        return "the output head has a bias"
    cfg = getattr(lm, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None) if cfg is not None else None
        if value not in (None, 1, 1.0, 0, 0.0):
            return f"config.{name}={value} transforms the logits after the head"
    return None


class HeadScorer:
    """Stands in for ``lm``'s output head during one forward and scores the head's input
    against ``labels`` with :func:`~trilora.ops.linear_cross_entropy.linear_cross_entropy`
    (position ``t`` scores ``labels[t + 1]``), so ``[tokens, vocab]`` logits never exist.

    Use as a context manager around the forward, then :meth:`result` on its output.
    The scores are computed inside the forward, where FSDP2 holds the head's full weight.
    ``reduction="none"`` (per-token losses, differentiated by DPO and GRPO) comes back
    through the model output as its "logits" ``[B, T, 1]``, so FSDP2's pre-backward hook
    gathers the head again before the op's backward needs it; ``"sum"`` and ``"mean"`` are
    kept aside (the logits are zero-width). ``after_forward=True`` (the training loss,
    whose backward runs through the model's own output hooks) keeps the hidden states and
    scores them in :meth:`result` instead. ``temperature`` divides the logits
    (``(h / t) @ W.T``), as sampling at that temperature does.
    """

    def __init__(
        self,
        lm: nn.Module,
        labels: torch.Tensor,
        reduction: str,
        *,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        z_loss: float = 0.0,
        temperature: float = 1.0,
        after_forward: bool = False,
    ) -> None:
        self.head = lm.get_output_embeddings()
        self.after_forward = after_forward
        self.scored: torch.Tensor | None = None
        self.labels, self.reduction = labels, reduction
        self.ignore_index, self.chunk_size, self.z_loss = ignore_index, chunk_size, z_loss
        self.temperature = temperature
        self.hidden: torch.Tensor | None = None

    def _score(self, hidden: torch.Tensor, reduction: str) -> torch.Tensor:
        weight = self.head.weight
        if hidden.shape[:-1] != self.labels.shape:
            raise ValueError(
                f"labels have shape {tuple(self.labels.shape)} but the hidden states cover "
                f"{tuple(hidden.shape[:-1])} positions (logits_to_keep is not supported with "
                "labels)"
            )
        h = hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype)
        if self.temperature != 1.0:
            h = h / self.temperature
        labels = self.labels.to(h.device)
        with torch.autocast(h.device.type, enabled=False):  # the op picks its own precision
            return linear_cross_entropy(
                h, weight, labels, self.ignore_index, reduction, self.chunk_size, self.z_loss
            )

    def _stand_in(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            # a copy, not a view: FSDP2 warns that in-place ops on views would lose its hook
            return self._score(hidden, "none").unsqueeze(-1).clone()
        if self.after_forward:
            self.hidden = hidden
        else:
            self.scored = self._score(hidden, self.reduction)
        # zero-width logits: whatever the model does to them afterwards costs nothing
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def __enter__(self) -> HeadScorer:
        self.head.forward = self._stand_in
        return self

    def __exit__(self, *exc) -> None:
        del self.head.forward

    def result(self, out) -> torch.Tensor:
        """fp32 ``[B, T]`` per-token losses (``"none"``, 0 where ignored) or the reduced
        loss, from the forward's output ``out``."""
        if self.reduction == "none":
            logits = out[0] if isinstance(out, tuple) else out.logits
            return logits.squeeze(-1)
        if self.scored is not None:
            return self.scored
        assert self.hidden is not None, "the output head was not called in the forward"
        return self._score(self.hidden, self.reduction)


def _fused_forward(orig, lm: nn.Module, z_loss: float, chunk_size: int | None, *args, **kwargs):
    labels = kwargs.get("labels")
    # fused_lm_head is TRL's own fused head (per-token log-probs without logits): its caller
    # needs that output, and it already avoids the full logits.
    if labels is None or not lm.training or kwargs.get("fused_lm_head"):
        # generation and evaluation keep real logits (metrics need them); memory is a
        # training-step problem
        return orig(*args, **kwargs)
    kwargs.pop("labels")
    num_items = kwargs.get("num_items_in_batch")
    # Hugging Face's gradient-accumulation convention: with num_items_in_batch, the sum
    # divided by the token count of the whole accumulated batch.
    scorer = HeadScorer(
        lm,
        labels,
        "sum" if num_items is not None else "mean",
        ignore_index=kwargs.get("ignore_index", -100),
        chunk_size=chunk_size,
        z_loss=z_loss,
        after_forward=True,
    )
    with scorer:
        out = orig(*args, **kwargs)
    loss = scorer.result(out)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    aux = None if isinstance(out, tuple) else out.get("aux_loss")
    if aux is not None:
        # A mixture of experts returning router logits adds its load-balancing loss to the
        # labelled loss; the labels went to the fused loss, so add it as the model would.
        coef = getattr(lm, "router_aux_loss_coef", None)
        if coef is None:
            coef = getattr(getattr(lm, "config", None), "router_aux_loss_coef", 0.0)
        loss = loss + coef * aux.to(loss.device)
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
    why = fused_head_unsupported(lm)
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
