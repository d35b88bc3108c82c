"""Causal flash attention run one key/value head group at a time.

FlashAttention-2's backward (PyTorch's flash backend and the flash-attn package alike)
allocates, besides ``dq``/``dk``/``dv``, an fp32 ``dq`` accumulator ``[B, T, Hq, D]`` and,
for grouped-query attention, ``dk``/``dv`` for every *query* head (``[B, T, Hq, D]`` each)
that it then sums per key/value head. For Llama-3.1-8B (32 query heads, 8 key/value heads,
D = 128) that is 32 KB per token on top of the 12 KB of real gradients, the largest
allocation of a checkpointed layer's backward at long context.

:func:`grouped_causal_attention` calls the same flash kernels once per key/value head, with
its ``Hq / Hkv`` query heads (itself a GQA call), so those buffers exist for one group at a
time: ``Hkv`` times smaller. Forward writes each group's output into one ``[B, T, Hq, D]``
buffer (the layout ``o_proj`` reads); backward writes each group's gradients into
``dq``/``dk``/``dv``. Nothing is recomputed: the per-group logsumexp from the forward feeds
the backward, exactly as in one big call. Kernel launches grow from 1 to ``Hkv`` per layer,
each still ``B * T / 128 * Hq / Hkv`` blocks (thousands at the context lengths where the
memory matters).

Kernels: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``) on CUDA,
``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``) elsewhere. They are
private aten ops (no public op returns the logsumexp and RNG state a separate backward call
needs), so they are looked up in one place, :func:`flash_attention_ops`, which returns None
where a torch release no longer has them: :func:`grouped_causal_attention` then raises, and
the transformers integration (``trilora.patches.grouped_attention``) serves every call with transformers'
SDPA attention instead. Under FakeTensorMode (``trilora mem``) the CPU kernels' meta
functions run, which allocate only the outputs, so the CUDA kernel's internal workspace
(:func:`flash_backward_workspace`) is allocated explicitly around each backward call.
Dropout is not supported (0.0 only).
"""

from __future__ import annotations

from typing import Any

import torch


def flash_backward_workspace(
    query: torch.Tensor, key: torch.Tensor
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Internal buffers of FlashAttention-2's backward for ``[B, Hq, T, D]`` q, ``[B, Hkv, T, D]`` k.

    ``(shape, dtype)`` of: the fp32 ``dq`` accumulator (``T`` rounded up to 128, ``D`` to 32),
    the fp32 ``rowsum(dO * O)`` and, when ``Hkv < Hq``, ``dk``/``dv`` per query head.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    t_round = -(-t // 128) * 128
    d_round = -(-d // 32) * 32 if d <= 192 else 256
    shapes = [((b, t_round, hq, d_round), torch.float32), ((b, hq, t_round), torch.float32)]
    if hkv != hq:
        shapes += [((b, t, hq, d), query.dtype)] * 2
    return shapes


# Private aten ops (see the module docstring): forward, backward.
_FLASH_OPS = {
    "cuda": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
    ),
    "cpu": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
}


def flash_attention_ops(device_type: str) -> tuple[Any, Any] | None:
    """torch's FlashAttention-2 ``(forward, backward)`` aten ops for ``device_type``, or None.

    The compatibility point for these private ops: ``"cuda"`` gets the CUDA kernels, any
    other device type the CPU ones (whose meta functions also serve fake tensors). None when
    the installed torch has no op of that name (a release that renamed them); callers fall
    back to public SDPA or raise. Checked against torch 2.11 and the newest release.
    """
    names = _FLASH_OPS["cuda" if device_type == "cuda" else "cpu"]
    ops = tuple(getattr(torch.ops.aten, name, None) for name in names)
    return None if None in ops else ops


def is_fake_tensor(t: torch.Tensor) -> bool:
    """True for a ``FakeTensor`` (``FakeTensorMode``: ``trilora mem``'s traces).

    The compatibility point for ``torch._subclasses.fake_tensor`` (private; no public
    name exists). Where a torch release no longer has it, False: trilora's memory tracer
    imports ``FakeTensorMode`` from the same module, so no fake tensor can reach here then.
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:
        return False
    return isinstance(t, FakeTensor)


def _flash_forward(q, k, v, scale):
    """``(out [B, H, T, D], lse [B, H, T] fp32, state)``; ``state`` is what backward needs."""
    forward, _ = flash_attention_ops(q.device.type)
    if q.is_cuda:
        out, lse, cq, ck, mq, mk, seed, offset, _ = forward(q, k, v, 0.0, True, False, scale=scale)
        return out, lse, (cq, ck, mq, mk, seed, offset)
    out, lse = forward(q, k, v, 0.0, True, scale=scale)
    return out, lse, None


def _flash_backward(dout, q, k, v, out, lse, state, scale):
    _, backward = flash_attention_ops(q.device.type)
    if q.is_cuda:
        cq, ck, mq, mk, seed, offset = state
        return backward(
            dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale
        )
    return backward(dout, q, k, v, out, lse, 0.0, True, scale=scale)


class _GroupedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        out = q.new_empty((b, t, hq, d))
        # One contiguous logsumexp per group: the kernels expect [B, g, T] contiguous, in the
        # dtype they return (fp32, but fp64 for fp64 inputs on CPU, which the backward checks).
        lse = None
        states = []
        for i in range(hkv):
            heads = slice(i * g, (i + 1) * g)
            o, s, state = _flash_forward(q[:, heads], k[:, i : i + 1], v[:, i : i + 1], scale)
            out[:, :, heads].copy_(o.transpose(1, 2))
            if lse is None:
                lse = s.new_empty((hkv, *s.shape))
            lse[i].copy_(s)
            states.append(state)
            del o, s
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.states = scale, states
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        hq = q.shape[1]
        hkv = k.shape[1]
        g = hq // hkv
        # dq in out's [B, T, Hq, D] layout (q's own layout when it comes from the projections).
        dq = torch.empty_like(out).transpose(1, 2)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        fake = is_fake_tensor(q)
        for i in range(hkv):
            heads = slice(i * g, (i + 1) * g)
            qi, ki, vi = q[:, heads], k[:, i : i + 1], v[:, i : i + 1]
            # Memory traces: what the CUDA kernel allocates inside, for this group only.
            workspace = (
                [
                    torch.empty(s, dtype=dt, device=q.device)
                    for s, dt in flash_backward_workspace(qi, ki)
                ]
                if fake
                else []
            )
            gq, gk, gv = _flash_backward(
                dout[:, :, heads].transpose(1, 2),
                qi,
                ki,
                vi,
                out[:, :, heads].transpose(1, 2),
                lse[i],
                ctx.states[i],
                ctx.scale,
            )
            dq[:, heads].copy_(gq)
            dk[:, i : i + 1].copy_(gk)
            dv[:, i : i + 1].copy_(gv)
            del gq, gk, gv, workspace
        return dq, dk, dv, None


def grouped_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal softmax attention, computed per key/value head group.

    Args:
        query: ``[B, Hq, T, D]`` fp16/bf16 (also fp32/fp64 on CPU), any strides with unit
            last stride.
        key, value: ``[B, Hkv, T, D]`` with ``Hq % Hkv == 0``.
        scale: softmax scale; default ``D ** -0.5``.

    Returns:
        ``[B, T, Hq, D]`` in query's dtype (transformers' attention-output layout), equal to
        ``scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)``
        transposed, up to the kernels' rounding.
    """
    if query.dim() != 4 or key.shape != value.shape or key.dim() != 4:
        raise ValueError(
            f"expected query [B, Hq, T, D] and key/value [B, Hkv, T, D], got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, hq, t, d = query.shape
    if key.shape[0] != b or key.shape[2] != t or key.shape[3] != d or hq % key.shape[1]:
        raise ValueError(
            f"key/value {tuple(key.shape)} must be [{b}, Hkv, {t}, {d}] with {hq} % Hkv == 0"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if flash_attention_ops(query.device.type) is None:
        names = _FLASH_OPS["cuda" if query.device.type == "cuda" else "cpu"]
        raise RuntimeError(
            f"torch {torch.__version__} has no aten.{names[0]} / aten.{names[1]}, which grouped "
            "attention calls; use torch.nn.functional.scaled_dot_product_attention (the "
            "transformers integration falls back to it by itself)"
        )
    return _GroupedCausalAttention.apply(query, key, value, scale)
