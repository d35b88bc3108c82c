"""RMSNorm with the semantics of transformers' Llama RMSNorm and a small memory footprint.

``y = weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)``, ``x32 = x.float()``:
the forward of ``LlamaRMSNorm`` and of the 140-odd transformers norms generated from it
(Qwen2/3, Mistral, Mixtral, Phi-3, ...). Gemma's ``(1 + weight)`` variant is a different
function and is not handled here.

Why an op: eager autograd saves the fp32 upcast of the input and the fp32 normalized rows
(16 bytes per element for a bf16 model) and allocates several more fp32 rows in backward.
For Llama-3.1-8B that is ~100 KB per token at the peak of a checkpointed layer's backward,
more than everything else in the layer. Here only ``x`` (which the caller already holds:
the layer input or the residual stream) and one fp32 ``rstd`` per row are saved, and the
backward allocates ``dx`` and nothing of size ``[rows, hidden]`` in fp32.

Two custom ops carry it: ``trilora::rms_norm_fwd`` -> ``(y, rstd)`` and
``trilora::rms_norm_bwd`` -> ``(dx, dweight)``. On CUDA they run the Triton kernels of
``trilora.kernels.rms_norm``; elsewhere a torch path that processes rows in chunks, so its
fp32 temporaries stay bounded too. The forward is bit-identical to the eager module on the
torch path; the backward is computed in fp32 and rounded once.

On the CPU this must also cost no more time than the eager module it replaces. The forward
runs the module's own ops (that is what makes it bit-identical) in one piece up to 2**22
elements, so it costs the eager forward plus the op's dispatch. The backward runs the
native CPU extension (``csrc/cpu/rms_norm.cpp``, two passes per row, no temporaries)
where it is available, several times faster than eager autograd through the module; without
it, the chunked torch path, which is about as fast as eager for large inputs and up to twice
as slow for small ones.
"""

from __future__ import annotations

import torch

from trilora.config import use_triton

# float64 only on the torch path (the eager module accepts it too, computing in fp32).
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Rows per torch-path chunk: at most 2**22 elements, so each fp32 temporary is <= 16 MiB.
_CHUNK_ELEMS = 2**22


def _chunks(m: int, h: int):
    step = max(1, _CHUNK_ELEMS // max(h, 1))
    for s in range(0, m, step):
        yield s, min(s + step, m)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def _use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    from trilora.kernels.rms_norm import MAX_BLOCK

    return (
        use_triton(x)
        and x.dtype in _KERNEL_DTYPES
        and weight.dtype == x.dtype
        and x.shape[1] <= MAX_BLOCK
    )


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("trilora::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, H]`` x and ``[H]`` weight -> ``(y [M, H], rstd [M] fp32)``.

    ``y`` has dtype ``promote_types(x.dtype, weight.dtype)`` (like ``weight * x``).
    """
    if _use_kernel(x, weight):
        from trilora.kernels.rms_norm import rms_norm_forward

        return rms_norm_forward(x, weight, eps)
    m, h = x.shape
    if m * h <= _CHUNK_ELEMS:
        # One chunk: the eager module's ops and nothing else (no output buffer, no copies).
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (xf * r).to(x.dtype), r.view(m)
    y = torch.empty((m, h), dtype=_out_dtype(x, weight), device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    for s, e in _chunks(m, h):
        xf = x[s:e].to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        # Same two roundings as the eager module: the normalized rows to x's dtype, then
        # the product with the weight to the promoted dtype.
        y[s:e] = weight * (xf * r).to(x.dtype)
        rstd[s:e] = r.squeeze(-1)
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    m, h = x.shape
    return (
        x.new_empty((m, h), dtype=_out_dtype(x, weight)),
        x.new_empty((m,), dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("trilora::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx [M, H] x.dtype, dweight [H] fp32)``; ``dweight`` is empty ``[0]`` unless asked for.

    ``dx = rstd * (dn - n * mean(dn * n))`` with ``n = x * rstd`` and ``dn = dy * weight``,
    and ``dweight = sum_rows(dy * n.to(x.dtype))``, all in fp32.
    """
    if _use_kernel(x, weight) and dy.dtype == x.dtype:
        from trilora.kernels.rms_norm import rms_norm_backward

        dx, dw = rms_norm_backward(dy, x, weight, rstd, need_weight_grad)
        return dx, dw if dw is not None else rstd.new_empty((0,))
    native = _native_backward(dy, x, weight, rstd, need_weight_grad)
    if native is not None:
        return native
    m, h = x.shape
    dx = torch.empty((m, h), dtype=x.dtype, device=x.device)
    dw = torch.zeros(h if need_weight_grad else 0, dtype=torch.float32, device=x.device)
    wf = weight.to(torch.float32)
    for s, e in _chunks(m, h):
        n = x[s:e].to(torch.float32) * rstd[s:e, None]
        g = dy[s:e].to(torch.float32)
        dn = g * wf
        c = (dn * n).mean(-1, keepdim=True)
        dx[s:e] = rstd[s:e, None] * (dn - n * c)
        if need_weight_grad:
            dw += (g * n.to(x.dtype).to(torch.float32)).sum(0)
    return dx, dw


def _native_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_w: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The CPU extension's backward, or None where it does not serve the call."""
    if (
        x.device.type != "cpu"
        or x.dtype not in _KERNEL_DTYPES
        or dy.dtype != x.dtype
        or x.stride(-1) != 1
        or dy.stride(-1) != 1
    ):
        return None
    from trilora.native import cpu_ext

    ext = cpu_ext.load()
    if ext is None:
        return None
    wf = weight.to(torch.float32).contiguous()
    return ext.rms_norm_backward(dy, x, wf, rstd.contiguous(), need_w)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, need_weight_grad):
    m, h = x.shape
    return x.new_empty((m, h)), x.new_empty((h if need_weight_grad else 0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_w = ctx.needs_input_grad[1]
    if not (ctx.needs_input_grad[0] or need_w):
        return None, None, None
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, dw = torch.ops.trilora.rms_norm_bwd(dy.to(x.dtype), x, weight, rstd, need_w)
    return dx, (dw.to(weight.dtype) if need_w else None), None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama-style RMSNorm over the last dimension.

    Args:
        x: ``[..., H]`` fp32/fp16/bf16.
        weight: ``[H]`` float; gets a gradient if it requires one.
        eps: added to the mean square.

    Returns:
        ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``, shape of ``x``,
        dtype ``promote_types(x.dtype, weight.dtype)``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be torch.Tensor")
    if x.dtype not in _ACT_DTYPES or not weight.is_floating_point():
        raise TypeError(
            f"x must be float16, bfloat16, float32 or float64 and weight floating point, got "
            f"{x.dtype} and {weight.dtype}"
        )
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"weight must have shape [{x.shape[-1] if x.dim() else '?'}] (x's last dimension), "
            f"got {tuple(weight.shape)} for x {tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x ({x.device}) and weight ({weight.device}) must be on one device")
    h = x.shape[-1]
    if (
        x.device.type == "cpu"
        and type(x) in _PLAIN
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        # Nothing to save for a backward: the module's own ops, without the op's dispatch
        # (the same values as the op's forward; evaluation and generation on a CPU).
        xf = x.to(torch.float32)
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    # A view for contiguous inputs, so the saved tensor is the caller's own storage.
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y, _ = torch.ops.trilora.rms_norm_fwd(x2, weight, float(eps))
    return y.reshape(x.shape)
