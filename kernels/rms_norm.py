"""RMSNorm forward and backward, with the exact rounding of transformers' Llama RMSNorm.

The module computes ``y = w * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)`` with
``x32 = x.float()``. Eager PyTorch keeps several fp32 ``[rows, hidden]`` copies alive for
its backward (the upcast input, the normalized rows) and allocates more inside it; at long
context those are the largest tensors of a decoder layer's backward. These kernels keep
one row in registers, save nothing but the input (already held by the caller) and one fp32
``rstd`` per row, and produce ``dx`` directly:

* forward: one program per row; ``n = x32 * rstd`` is rounded to ``x.dtype`` and multiplied
  by ``w`` in fp32 before the final rounding, exactly the two roundings of the eager module.
* backward: ``dx = rstd * (dn - n * mean(dn * n))`` with ``dn = dy * w``, in fp32 and rounded
  once (eager rounds ``dn`` to ``x.dtype`` first: ours is the more accurate of the two).
  ``dw = sum_rows(dy * n.to(x.dtype))``: each program walks a contiguous range of rows and
  keeps its partial ``dw`` in fp32 registers; the caller sums the ``[programs, hidden]``
  partials. One program per SM-sized share of the rows, not per row, so the partial buffer
  stays a few MiB at any sequence length.

A row of ``hidden`` values lives in registers: ``BLOCK`` is the next power of two (512 at
least) and the warp count grows with it, 8 values per thread, so the backward's row arrays
fit without spills (``trilora kernels`` checks). At 16,384 columns 32 warps would need 16
values per thread and the backward spills (64 registers per thread at 1,024 threads), so
rows wider than :data:`MAX_BLOCK` = 8,192 (Llama-3.1-405B's hidden size) go to the chunked
torch path of :mod:`trilora.ops.rms_norm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .common import cast_rne

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MIN_BLOCK = 512
MAX_BLOCK = 8192

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    stride_x,
    stride_y,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    ty = y_ptr.dtype.element_ty
    n = cast_rne(x * rstd, ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, cast_rne(w * n, ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    ty = dx_ptr.dtype.element_ty
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (start + i).to(tl.int64)
        if row < n_rows:
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            n = x * rstd
            dn = dy * w
            c = tl.sum(dn * n, axis=0) / n_cols
            tl.store(dx_ptr + row * stride_dx + cols, cast_rne(rstd * (dn - n * c), ty), mask=mask)
            if HAS_DW:
                dw += dy * cast_rne(n, ty).to(tl.float32)
    if HAS_DW:
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block(n_cols: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(n_cols))


def _num_warps(block: int) -> int:
    return min(32, max(2, block // 256))


def _check(name: str, t: torch.Tensor, n_cols: int, dtype: torch.dtype | None = None) -> None:
    if t.dim() != 2 or t.shape[1] != n_cols or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be [rows, {n_cols}] with unit column stride, got {tuple(t.shape)} "
            f"strides {t.stride()}"
        )
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = weight * (x32 * rstd).to(x.dtype)`` row by row.

    Args:
        x: ``[M, H]`` fp32/fp16/bf16, unit column stride.
        weight: ``[H]``, same dtype as ``x``.
        eps: added to the mean square before the reciprocal square root.

    Returns:
        ``(y [M, H] x.dtype, rstd [M] fp32)``.
    """
    if x.dtype not in _TL_DTYPE or weight.dtype != x.dtype:
        raise ValueError(
            f"x must be fp32/fp16/bf16 and weight the same dtype, got {x.dtype} and {weight.dtype}"
        )
    m, h = x.shape
    _check("x", x, h)
    if weight.shape != (h,) or h > MAX_BLOCK:
        raise ValueError(f"weight must be [{h}] with {h} <= {MAX_BLOCK}, got {tuple(weight.shape)}")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, rstd
    block = _block(h)
    _rms_norm_fwd_kernel[(m,)](
        x,
        weight.contiguous(),
        y,
        rstd,
        x.stride(0),
        y.stride(0),
        h,
        float(eps),
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return y, rstd


def _programs(device: torch.device, m: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # interpreter: a few programs exercise the partial-sum path
    return max(1, min(m, 2 * sms))


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`rms_norm_forward`.

    Args:
        dy: ``[M, H]``, ``x.dtype``, unit column stride.
        x, weight, rstd: the forward's input, weight and saved ``rstd``.
        need_dw: whether to compute ``dweight``.

    Returns:
        ``(dx [M, H] x.dtype, dweight [H] fp32 or None)``.
    """
    m, h = x.shape
    _check("x", x, h)
    _check("dy", dy, h, x.dtype)
    if rstd.shape != (m,) or rstd.dtype != torch.float32:
        raise ValueError(f"rstd must be fp32 [{m}], got {rstd.dtype} {tuple(rstd.shape)}")
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if m == 0:
        return dx, (torch.zeros(h, dtype=torch.float32, device=x.device) if need_dw else None)
    programs = _programs(x.device, m)
    per = -(-m // programs)
    programs = -(-m // per)
    partial = torch.empty((programs, h), dtype=torch.float32, device=x.device) if need_dw else rstd
    block = _block(h)
    _rms_norm_bwd_kernel[(programs,)](
        dy,
        x,
        weight.contiguous(),
        rstd,
        dx,
        partial,
        dy.stride(0),
        x.stride(0),
        dx.stride(0),
        m,
        h,
        per,
        HAS_DW=need_dw,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return dx, (partial.sum(0) if need_dw else None)


# --------------------------------------------------------------------------------------------
# Ahead-of-time specs
# --------------------------------------------------------------------------------------------


def _aot_specs() -> list[AotSpec]:
    specs = []
    block = MIN_BLOCK
    while block <= MAX_BLOCK:
        for name in _TL_DTYPE.values():
            fwd_sig = {
                "x_ptr": f"*{name}",
                "w_ptr": f"*{name}",
                "y_ptr": f"*{name}",
                "rstd_ptr": "*fp32",
                "stride_x": "i32",
                "stride_y": "i32",
                "n_cols": "i32",
                "eps": "fp32",
                "BLOCK": "constexpr",
            }
            specs.append(
                AotSpec(
                    name=f"_rms_norm_fwd_kernel[{name},{block}]",
                    fn=_rms_norm_fwd_kernel,
                    signature=fwd_sig,
                    constexprs={"BLOCK": block},
                    options={"num_warps": _num_warps(block)},
                )
            )
            for has_dw in (False, True):
                bwd_sig = {
                    "dy_ptr": f"*{name}",
                    "x_ptr": f"*{name}",
                    "w_ptr": f"*{name}",
                    "rstd_ptr": "*fp32",
                    "dx_ptr": f"*{name}",
                    "dw_ptr": "*fp32",
                    "stride_dy": "i32",
                    "stride_x": "i32",
                    "stride_dx": "i32",
                    "n_rows": "i32",
                    "n_cols": "i32",
                    "rows_per_program": "i32",
                    "HAS_DW": "constexpr",
                    "BLOCK": "constexpr",
                }
                specs.append(
                    AotSpec(
                        name=f"_rms_norm_bwd_kernel[{name},{block},{'dw' if has_dw else 'nodw'}]",
                        fn=_rms_norm_bwd_kernel,
                        signature=bwd_sig,
                        constexprs={"HAS_DW": has_dw, "BLOCK": block},
                        options={"num_warps": _num_warps(block)},
                    )
                )
        block *= 2
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()

__all__ = ["AOT_SPECS", "MAX_BLOCK", "rms_norm_backward", "rms_norm_forward"]
