"""Fused AdamW update kernels: 32-bit state, and 8-bit blockwise state (bitsandbytes layout).

One launch updates one parameter (or one page of it: any contiguous element range whose start
is a multiple of 256). Every tensor is a flat contiguous view of ``n`` elements:

* 32-bit: ``p`` (fp32/bf16/fp16), ``g``, ``exp_avg`` and ``exp_avg_sq`` (fp32). Each is read
  once and ``p``, ``exp_avg`` and ``exp_avg_sq`` are written once: 16 bytes of state traffic
  per element plus ``p`` and ``g``.
* 8-bit: ``state1`` / ``state2`` are uint8 codes into the 256-entry signed / unsigned dynamic
  maps, ``absmax1`` / ``absmax2`` one fp32 scale per 256 elements (bitsandbytes' optimizer
  blocksize). A program owns whole 256-element blocks: it dequantizes the moments in registers
  (``qmap[code] * absmax``), applies the update, takes a fresh absmax of each block and
  requantizes to the nearest code. The parameter update uses the new moments before
  requantization, as bitsandbytes does. 2 bytes of state traffic per element.

The update is torch's single-tensor AdamW, operation by operation (``torch.optim.AdamW``
with ``foreach=False``; decoupled weight decay applied first)::

    p   = p * (1 - lr * wd)
    m   = lerp(m, g, 1 - beta1)
    v   = v * beta2 + (1 - beta2) * g * g
    p   = p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

with the bias corrections ``bc = 1 - beta ** step`` computed by the caller in float64, as
torch does, and passed as fp32 scalars. Division and square root are IEEE-rounded
(``div_rn`` / ``sqrt_rn``), so results agree with torch's CPU kernels to fp32 rounding
(the GPU may contract a multiply-add into an FMA). ``p`` is written back rounding to
nearest even.

Nearest-code quantization is a branch-free binary search over the 255 midpoints between
adjacent codes (``bounds``, padded to 256 with +inf): 8 gathers from a 1 KiB table that stays
in L1, the same search bitsandbytes' CUDA kernel does in shared memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .common import cast_rne

QBLOCK = 256
"""Elements per absmax block of the 8-bit state (bitsandbytes' optimizer blocksize)."""

_BLOCK_32 = 1024
_ROWS_8 = 4  # 256-element blocks per 8-bit program
_NUM_WARPS = 4
_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (param dtype, grad dtype) pairs with a compiled kernel; any other grad dtype is upcast.
_DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
)

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _adamw_math(p, g, m, v, decay, w1, beta2, w2, step_size, bc2_sqrt, eps):
    p = p * decay
    # torch's lerp: the formula depends on the weight, so rounding matches for any beta1.
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
    v = v * beta2 + w2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    return p, m, v


@triton.jit
def _adamw32_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    n,
    decay,
    w1,
    beta2,
    w2,
    step_size,
    bc2_sqrt,
    eps,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p, m, v = _adamw_math(p, g, m, v, decay, w1, beta2, w2, step_size, bc2_sqrt, eps)
    tl.store(p_ptr + offs, cast_rne(p, p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _nearest_code(x, bounds_ptr):
    # Number of midpoints strictly below x (torch.bucketize(x, bounds[:255], right=False)):
    # binary lifting over the sorted table; bounds[255] = +inf is never below x.
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for s in tl.static_range(8):
        probe = tl.load(bounds_ptr + idx + ((128 >> s) - 1))
        idx = tl.where(probe < x, idx + (128 >> s), idx)
    return idx


@triton.jit
def _adamw8bit_kernel(
    p_ptr,
    g_ptr,
    q1_ptr,
    q2_ptr,
    a1_ptr,
    a2_ptr,
    map1_ptr,
    map2_ptr,
    bnd1_ptr,
    bnd2_ptr,
    n,
    decay,
    w1,
    beta2,
    w2,
    step_size,
    bc2_sqrt,
    eps,
    ROWS: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offs < n
    row_mask = rows * QBLOCK < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(q1_ptr + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(q2_ptr + offs, mask=mask, other=0).to(tl.int32)
    a1 = tl.load(a1_ptr + rows, mask=row_mask, other=0.0)
    a2 = tl.load(a2_ptr + rows, mask=row_mask, other=0.0)
    m = tl.load(map1_ptr + c1) * a1[:, None]
    v = tl.load(map2_ptr + c2) * a2[:, None]
    p, m, v = _adamw_math(p, g, m, v, decay, w1, beta2, w2, step_size, bc2_sqrt, eps)
    tl.store(p_ptr + offs, cast_rne(p, p_ptr.dtype.element_ty), mask=mask)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    new_a1 = tl.max(tl.abs(m), axis=1)
    new_a2 = tl.max(tl.abs(v), axis=1)
    # An all-zero block keeps absmax 0 and the code of 0 (its moments stay 0 either way).
    x1 = tl.div_rn(m, tl.where(new_a1 > 0.0, new_a1, 1.0)[:, None])
    x2 = tl.div_rn(v, tl.where(new_a2 > 0.0, new_a2, 1.0)[:, None])
    tl.store(q1_ptr + offs, _nearest_code(x1, bnd1_ptr).to(tl.uint8), mask=mask)
    tl.store(q2_ptr + offs, _nearest_code(x2, bnd2_ptr).to(tl.uint8), mask=mask)
    tl.store(a1_ptr + rows, new_a1, mask=row_mask)
    tl.store(a2_ptr + rows, new_a2, mask=row_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_flat(name: str, t: torch.Tensor, n: int, dtype: torch.dtype | None, device) -> None:
    if t.dim() != 1 or t.numel() != n or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor of {n} elements, got {t.shape}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _param_and_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if p.dtype not in _TL_DTYPE:
        raise ValueError(f"p must be fp32, bf16 or fp16, got {p.dtype}")
    if (p.dtype, g.dtype) not in _DTYPE_PAIRS:
        g = g.float()
    return g


def _scalars(decay, w1, beta2, w2, step_size, bc2_sqrt, eps) -> tuple[float, ...]:
    return tuple(float(x) for x in (decay, w1, beta2, w2, step_size, bc2_sqrt, eps))


def adamw_step_32bit(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    decay: float,
    w1: float,
    beta2: float,
    w2: float,
    step_size: float,
    bc2_sqrt: float,
    eps: float,
) -> None:
    """One AdamW step in place, 32-bit state.

    Args:
        p: ``[n]`` fp32/bf16/fp16, contiguous; updated in place.
        g: ``[n]`` gradient (p's dtype or fp32; anything else is upcast first).
        exp_avg, exp_avg_sq: ``[n]`` fp32; updated in place.
        decay: ``1 - lr * weight_decay``; w1: ``1 - beta1``; w2: ``1 - beta2``;
        step_size: ``lr / (1 - beta1**step)``; bc2_sqrt: ``sqrt(1 - beta2**step)``.
    """
    n = p.numel()
    g = _param_and_grad(p, g)
    for name, t, dt in (
        ("p", p, None),
        ("g", g, None),
        ("exp_avg", exp_avg, torch.float32),
        ("exp_avg_sq", exp_avg_sq, torch.float32),
    ):
        _check_flat(name, t, n, dt, p.device)
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK_32),)
    _adamw32_kernel[grid](
        p,
        g,
        exp_avg,
        exp_avg_sq,
        n,
        *_scalars(decay, w1, beta2, w2, step_size, bc2_sqrt, eps),
        BLOCK=_BLOCK_32,
        num_warps=_NUM_WARPS,
    )


def adamw_step_8bit(
    p: torch.Tensor,
    g: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    bounds1: torch.Tensor,
    bounds2: torch.Tensor,
    *,
    decay: float,
    w1: float,
    beta2: float,
    w2: float,
    step_size: float,
    bc2_sqrt: float,
    eps: float,
) -> None:
    """One AdamW step in place, 8-bit blockwise state (see the module docstring).

    Args:
        p, g: ``[n]`` as in :func:`adamw_step_32bit`.
        state1, state2: ``[n]`` uint8 codes of the first / second moment; updated in place.
        absmax1, absmax2: ``[ceil(n / 256)]`` fp32 block scales; updated in place.
        qmap1, qmap2: ``[256]`` fp32 signed / unsigned dynamic maps (sorted).
        bounds1, bounds2: ``[256]`` fp32 midpoints of the maps, last entry +inf.
        decay, w1, beta2, w2, step_size, bc2_sqrt, eps: as in :func:`adamw_step_32bit`.
    """
    n = p.numel()
    blocks = triton.cdiv(n, QBLOCK)
    g = _param_and_grad(p, g)
    _check_flat("p", p, n, None, p.device)
    _check_flat("g", g, n, None, p.device)
    for name, t in (("state1", state1), ("state2", state2)):
        _check_flat(name, t, n, torch.uint8, p.device)
    for name, t in (("absmax1", absmax1), ("absmax2", absmax2)):
        _check_flat(name, t, blocks, torch.float32, p.device)
    for name, t in (("qmap1", qmap1), ("qmap2", qmap2), ("bounds1", bounds1), ("bounds2", bounds2)):
        _check_flat(name, t, 256, torch.float32, p.device)
    if n == 0:
        return
    grid = (triton.cdiv(blocks, _ROWS_8),)
    _adamw8bit_kernel[grid](
        p,
        g,
        state1,
        state2,
        absmax1,
        absmax2,
        qmap1,
        qmap2,
        bounds1,
        bounds2,
        n,
        *_scalars(decay, w1, beta2, w2, step_size, bc2_sqrt, eps),
        ROWS=_ROWS_8,
        QBLOCK=QBLOCK,
        num_warps=_NUM_WARPS,
    )


# --------------------------------------------------------------------------------------------
# Ahead-of-time specs
# --------------------------------------------------------------------------------------------

_SCALARS = ("decay", "w1", "beta2", "w2", "step_size", "bc2_sqrt", "eps")


def _aot_specs() -> list[AotSpec]:
    specs = []
    for p_dtype, g_dtype in _DTYPE_PAIRS:
        pt, gt = _TL_DTYPE[p_dtype], _TL_DTYPE[g_dtype]
        sig32 = {
            "p_ptr": f"*{pt}",
            "g_ptr": f"*{gt}",
            "m_ptr": "*fp32",
            "v_ptr": "*fp32",
            "n": "i32",
            **dict.fromkeys(_SCALARS, "fp32"),
            "BLOCK": "constexpr",
        }
        specs.append(
            AotSpec(
                name=f"_adamw32_kernel[{pt},{gt}]",
                fn=_adamw32_kernel,
                signature=sig32,
                constexprs={"BLOCK": _BLOCK_32},
                options={"num_warps": _NUM_WARPS},
            )
        )
        sig8 = {
            "p_ptr": f"*{pt}",
            "g_ptr": f"*{gt}",
            "q1_ptr": "*u8",
            "q2_ptr": "*u8",
            "a1_ptr": "*fp32",
            "a2_ptr": "*fp32",
            "map1_ptr": "*fp32",
            "map2_ptr": "*fp32",
            "bnd1_ptr": "*fp32",
            "bnd2_ptr": "*fp32",
            "n": "i32",
            **dict.fromkeys(_SCALARS, "fp32"),
            "ROWS": "constexpr",
            "QBLOCK": "constexpr",
        }
        specs.append(
            AotSpec(
                name=f"_adamw8bit_kernel[{pt},{gt}]",
                fn=_adamw8bit_kernel,
                signature=sig8,
                constexprs={"ROWS": _ROWS_8, "QBLOCK": QBLOCK},
                options={"num_warps": _NUM_WARPS},
            )
        )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()

__all__ = ["AOT_SPECS", "QBLOCK", "adamw_step_8bit", "adamw_step_32bit"]
