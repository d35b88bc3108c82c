"""Fused linear cross-entropy: the causal-LM loss straight from the final hidden states.

``loss = CE(hidden @ W.T, labels)`` without ever holding the ``[tokens, vocab]`` logits.
The tokens are processed in chunks of ``chunk_size`` rows; for each chunk the forward

1. computes the chunk's logits ``[C, V]`` (one GEMM, in the hidden states' dtype),
2. runs ``trilora::cross_entropy_inplace_`` on them: loss and logsumexp per row, and the
   logits overwritten by their own gradient (Triton kernel on CUDA, torch on CPU),
3. turns that gradient into ``grad_hidden[chunk] = dlogits @ W`` and, when ``W`` is
   trainable, ``grad_W += dlogits.T @ hidden[chunk]`` (fp32 accumulator),

and then drops the chunk (Liger-Kernel's scheme). On the CPU the fp32 chunk GEMMs run
through oneDNN where it is faster than the BLAS (:mod:`trilora.ops.cpu_matmul`); bf16 ones
on a CPU without bf16 matrix units run in fp32 (``trilora.config.cpu_half_matmul``), with
the weight widened once per pass and the chunk's logits in fp32. Backward only multiplies the stored
gradients by the incoming scalar. Peak extra memory is one chunk of logits plus
``grad_hidden`` (the size of ``hidden``), instead of two or three ``[tokens, vocab]``
tensors (logits, their fp32 upcast, their gradient) for ``lm_head`` + ``F.cross_entropy``.

``reduction="none"`` cannot fold the incoming per-token gradient into ``grad_W`` ahead of
time, so it stores nothing extra in forward and recomputes the chunks in backward.

The chunk loop is an ``autograd.Function`` over aten GEMMs and one custom op (not one opaque
custom op) on purpose: under FakeTensorMode every chunk buffer is then a real fake
allocation, so ``trilora mem`` sees the true peak of this loss rather than only its outputs.

Semantics match ``F.cross_entropy`` on the full logits: ``reduction="mean"`` divides by the
number of non-ignored tokens, so a batch whose tokens are *all* ignored has loss ``nan``
(0/0), exactly like ``F.cross_entropy``; its gradients are zero (not nan), because every
row's gradient is masked to zero before the scale is applied. ``z_loss`` adds
``z_loss * logsumexp**2`` per non-ignored token (PaLM's auxiliary loss), inside the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import trilora.ops.cpu_matmul as cpu_matmul
from trilora.config import use_triton

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCTIONS = ("mean", "sum", "none")
# Default chunk: at most 2**26 logits (128 MiB in bf16), a power of two of tokens. For a
# 128k vocabulary that is 512 tokens, still a GEMM large enough to run near peak.
_CHUNK_ELEMS = 2**26


# ---------------------------------------------------------------------------------------
# cross-entropy of one chunk, gradient in place
# ---------------------------------------------------------------------------------------


def _cross_entropy_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # In place on an fp32 working copy (the logits themselves when they are fp32): five
    # passes over [M, V] (max, shift, exp, sum, scale) and no other temporary of that size,
    # where eager log_softmax + its backward allocate two or three.
    x = logits if logits.dtype == torch.float32 else logits.float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()[:, None]
    row_max = x.amax(dim=1, keepdim=True)
    x.sub_(row_max)
    shifted_target = x.gather(1, safe).squeeze(1)
    x.exp_()
    sum_exp = x.sum(dim=1)
    log_sum = sum_exp.log()
    lse = row_max.squeeze(1) + log_sum
    # lse - logit[label], from the shifted values (no cancellation against the max)
    loss = log_sum - shifted_target + z_loss * lse * lse
    s = scale.reshape(-1)
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    # dloss/dlogits = softmax * (1 + 2 z lse) - onehot(label), times the scale. where(), not a
    # multiply by the mask: an all-ignored mean has scale = 1/0 = inf.
    x.mul_(torch.where(valid, s * (1.0 + 2.0 * z_loss * lse) / sum_exp, zero)[:, None])
    x.scatter_add_(1, safe, torch.where(valid, -s, zero)[:, None])
    if x is not logits:
        logits.copy_(x)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


@torch.library.custom_op("trilora::cross_entropy_inplace_", mutates_args=("logits",))
def cross_entropy_inplace_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise CE of ``logits`` ``[M, V]``; overwrites ``logits`` with ``scale * dloss/dlogits``.

    ``labels`` int64 ``[M]``; ``scale`` fp32 ``[1]`` or ``[M]``. Returns ``(loss, lse)``, fp32
    ``[M]``, zero on ignored rows.
    """
    if use_triton(logits):
        from trilora.kernels.cross_entropy import cross_entropy_inplace

        return cross_entropy_inplace(logits, labels, scale, ignore_index, z_loss)
    return _cross_entropy_torch(logits, labels, scale, ignore_index, z_loss)


@cross_entropy_inplace_.register_fake
def _(logits, labels, scale, ignore_index, z_loss):
    m = logits.shape[0]
    return logits.new_empty((m,), dtype=torch.float32), logits.new_empty((m,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# chunk loop
# ---------------------------------------------------------------------------------------


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two with at most 2**26 logits, capped at ``n_tokens``."""
    c = 1 << max(0, (_CHUNK_ELEMS // max(vocab, 1)).bit_length() - 1)
    return max(1, min(c, n_tokens))


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _accumulate_weight_grad(grad_w: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    # Accumulated in fp32 across chunks: summing hundreds of bf16 partial products in bf16
    # would lose the small contributions.
    grad_w.addmm_(dlogits.t().float(), h.float())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk, z_loss):
        n = hidden.shape[0]
        valid = labels != ignore_index
        n_valid = valid.sum()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction, ctx.ignore_index, ctx.chunk, ctx.z_loss = (
            reduction,
            ignore_index,
            chunk,
            z_loss,
        )
        if reduction == "mean":
            scale = (1.0 / n_valid.to(torch.float32)).reshape(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
        fold = reduction != "none" and (need_h or need_w)
        grad_h = torch.empty_like(hidden) if fold and need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if fold and need_w
            else None
        )
        losses = hidden.new_empty((n,), dtype=torch.float32)
        weight_product = cpu_matmul.widen(weight)
        for s, e in _chunks(n, chunk):
            h = hidden[s:e]
            logits = cpu_matmul.linear(h, weight_product)
            loss_c, _ = cross_entropy_inplace_(logits, labels[s:e], scale, ignore_index, z_loss)
            losses[s:e] = loss_c
            if grad_h is not None:
                cpu_matmul.matmul_into(grad_h[s:e], logits, weight_product)
            if grad_w is not None:
                _accumulate_weight_grad(grad_w, logits, h)
            del logits
        del weight_product
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, labels)
            return losses
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        total = losses.sum()
        return total / n_valid.to(torch.float32) if reduction == "mean" else total

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            grad_h, grad_w = ctx.saved_tensors
            # In place: these buffers exist only for this backward (like Liger, the graph
            # supports one backward pass; retain_graph=True reuses already-scaled values).
            g = grad_out.reshape(())
            if grad_h is not None:
                grad_h.mul_(g.to(grad_h.dtype))
            if grad_w is not None:
                grad_w.mul_(g.to(grad_w.dtype))
            return grad_h, grad_w, None, None, None, None, None
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        row_scale = grad_out.to(torch.float32)
        weight_product = cpu_matmul.widen(weight)
        for s, e in _chunks(hidden.shape[0], ctx.chunk):
            h = hidden[s:e]
            logits = cpu_matmul.linear(h, weight_product)
            cross_entropy_inplace_(
                logits, labels[s:e], row_scale[s:e].contiguous(), ctx.ignore_index, ctx.z_loss
            )
            if grad_h is not None:
                cpu_matmul.matmul_into(grad_h[s:e], logits, weight_product)
            if grad_w is not None:
                _accumulate_weight_grad(grad_w, logits, h)
            del logits
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


# ---------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    z_loss: float = 0.0,
    shift_labels: bool = True,
) -> torch.Tensor:
    """Causal-LM cross-entropy of ``hidden @ lm_head_weight.T`` without materializing logits.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` final hidden states, fp32/fp16/bf16.
        lm_head_weight: ``[V, H]``, same dtype as ``hidden``; gets a gradient if it requires one.
        labels: ``[B, T]`` or ``[N]`` integer token ids, ``ignore_index`` for masked positions.
        ignore_index: label value excluded from the loss (and from the mean's denominator).
        reduction: ``"mean"`` (over non-ignored tokens; ``nan`` if there are none, as in
            ``F.cross_entropy``), ``"sum"``, or ``"none"`` (per position, 0 where ignored).
        chunk_size: tokens per chunk; default keeps a chunk's logits at or under 2**26 values.
        z_loss: weight of the auxiliary ``logsumexp**2`` term per non-ignored token.
        shift_labels: predict token ``t+1`` from position ``t`` (Hugging Face causal-LM
            convention): labels are shifted left within each sequence and the last position
            is ignored. For 2-D ``hidden`` the ``N`` rows are treated as one sequence. Pass
            False when the labels are already aligned with ``hidden``.

    Returns:
        fp32 scalar for ``"mean"``/``"sum"``; fp32 ``[B, T]`` / ``[N]`` for ``"none"``.
    """
    _check_inputs(hidden, lm_head_weight, labels, reduction, chunk_size, z_loss)
    if shift_labels:
        # Shift the labels, not the hidden states: slicing hidden[:, :-1] would copy it.
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    lead = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1).to(torch.int64)
    n, v = h2.shape[0], lm_head_weight.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n, v)
    # The chunks manage their own dtypes (fp32 loss and weight-gradient accumulation); under
    # autocast the chunk matmuls would come out in the autocast dtype and no longer fit the
    # preallocated gradient buffers.
    with torch.autocast(hidden.device.type, enabled=False):
        out = _LinearCrossEntropy.apply(
            h2, lm_head_weight, lab, int(ignore_index), reduction, int(chunk), float(z_loss)
        )
    return out.reshape(lead) if reduction == "none" else out


def _check_inputs(hidden, weight, labels, reduction, chunk_size, z_loss) -> None:
    for name, t in (("hidden", hidden), ("lm_head_weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _ACT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16 or float32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"lm_head_weight dtype {weight.dtype} must equal hidden's dtype {hidden.dtype}"
        )
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device or weight.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), lm_head_weight ({weight.device}) and labels "
            f"({labels.device}) must be on one device"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
