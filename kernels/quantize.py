"""bitsandbytes-compatible 4-bit (NF4/FP4) blockwise quantization and dequantization.

Format (byte-identical to bitsandbytes 0.50): the tensor is flattened row-major; element ``i``
lives in byte ``i // 2`` (high nibble when ``i`` is even, odd counts padded with one nibble) and
in quantization block ``i // blocksize``; its value is ``code[nibble] * scale[block]`` in fp32.
``scale`` is the fp32 ``absmax`` or, double-quantized, ``nested_code[absmax_u8] *
nested_absmax[block // 256] + offset``.

The ``@triton.jit`` helpers that decode the format (``dequant_gather``, ``block_scale``) live
in ``common.py``, shared with the fused QLoRA matmul kernels, so every kernel decodes the
format the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .common import block_scale, cast_rne

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the 8-bit absmax (double quantization)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ACT_DTYPES = (torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


class Weight4bit(NamedTuple):
    """A 4-bit weight ``W`` of shape ``[n_rows, n_cols]`` in the bitsandbytes layout."""

    packed: torch.Tensor  # uint8 [(N*K+1)//2], flat (callers view other storage dtypes as uint8)
    absmax: torch.Tensor  # fp32 [nblocks], or uint8 [nblocks] when double-quantized
    code: torch.Tensor  # fp32 [16], the NF4/FP4 table in bit order
    nested_absmax: torch.Tensor | None  # fp32 [ceil(nblocks/256)]
    nested_code: torch.Tensor | None  # fp32 [256]
    offset: torch.Tensor | None  # fp32, one element
    blocksize: int
    n_rows: int  # N
    n_cols: int  # K


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,
    bounds_ptr,
    order_ptr,
    packed_ptr,
    absmax_ptr,
    n,
    blk_start,
    blk_end,
    BLOCKSIZE: tl.constexpr,
    GROUP: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    # Tile [GROUP blocks, BLOCKSIZE/2 pairs]: even and odd elements are loaded as two tiles so
    # the byte (even << 4 | odd) is formed without a reshape. Blocks [blk_start, blk_end).
    pid = tl.program_id(0)
    blk = blk_start + pid * GROUP + tl.arange(0, GROUP)
    blk_in = blk < blk_end
    pair = tl.arange(0, BLOCKSIZE // 2)
    even = blk[:, None] * BLOCKSIZE + 2 * pair[None, :]
    in_e = (even < n) & blk_in[:, None]
    in_o = ((even + 1) < n) & blk_in[:, None]
    xe = tl.load(x_ptr + even, mask=in_e, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + even + 1, mask=in_o, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    # An explicit fp32 constant: triton <= 3.6 types a Python float below 2**-126 as fp64,
    # which would make amax_c fp64 (and div_rn refuse it).
    amax_c = tl.maximum(amax, tl.full(amax.shape, 1e-38, tl.float32))
    # bitsandbytes scales full blocks by x * (1/absmax) but the trailing partial block by
    # x / absmax, and returns the clamped absmax only for that partial block. Both copied so
    # the bytes match; div_rn keeps IEEE rounding on the GPU (plain '/' is approximate there).
    # The partial block is a separate launch (PARTIAL=True): computing both forms for every
    # element and selecting spilled registers at blocksize 32 on sm_90.
    if PARTIAL:
        amax_b = tl.broadcast_to(amax_c[:, None], xe.shape)
        se = tl.math.div_rn(xe, amax_b)
        so = tl.math.div_rn(xo, amax_b)
    else:
        recip = tl.math.div_rn(tl.full(amax_c.shape, 1.0, tl.float32), amax_c)
        se = xe * recip[:, None]
        so = xo * recip[:, None]
    se = tl.minimum(tl.maximum(se, -1.0), 1.0)
    so = tl.minimum(tl.maximum(so, -1.0), 1.0)
    # bucketize(right=False) = number of midpoints strictly below the value = 1 + the last j
    # with value > bounds[j], as the bounds ascend. The padding element of an odd count is a
    # scaled 0.0, as in bitsandbytes. A select per bound, not a sum of comparisons: LLVM turns
    # that sum into a popcount over <32 x i12> bit masks, which NVPTX legalizes through a
    # 64-byte stack frame (a spill under triton 3.6 for 16-bit inputs at every blocksize, and
    # under 3.9 at blocksize 32).
    qe = tl.zeros(xe.shape, dtype=tl.int32)
    qo = tl.zeros(xe.shape, dtype=tl.int32)
    for j in tl.static_range(15):
        b = tl.load(bounds_ptr + j)
        qe = tl.where(se > b, j + 1, qe)
        qo = tl.where(so > b, j + 1, qo)
    ne = tl.load(order_ptr + qe)
    no = tl.load(order_ptr + qo)
    byte = ((ne << 4) | no).to(tl.uint8)
    tl.store(packed_ptr + (even >> 1), byte, mask=in_e)
    tl.store(absmax_ptr + blk, amax_c if PARTIAL else amax, mask=blk_in)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIRS: tl.constexpr,
):
    # One byte = two neighbours in the same quantization block (blocksizes are even), so each
    # byte needs one scale; the two values are interleaved for a contiguous store.
    pid = tl.program_id(0)
    j = pid * PAIRS + tl.arange(0, PAIRS)
    in_b = 2 * j < n
    byte = tl.load(packed_ptr + j, mask=in_b, other=0).to(tl.int32)
    scale = block_scale(
        absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, (2 * j) // BLOCKSIZE, in_b, DOUBLE_QUANT
    )
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    vals = tl.interleave(hi, lo)
    offs = 2 * pid * PAIRS + tl.arange(0, 2 * PAIRS)
    tl.store(out_ptr + offs, cast_rne(vals, out_ptr.dtype.element_ty), mask=offs < n)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Quantize: memory-bound (load 2-4 B/elem, store 0.5 B/elem + 4 B/block); one-off at load time.
# 4096 elements per program = 32 fp32 values per thread at 4 warps (8 warps spilled 32 B): wide enough to hide
# latency, small enough for no spills. Blocks larger than that get one program each.
_QUANT_ELEMS_PER_PROG = 4096
_QUANT_WARPS = 4
# Dequantize: 1024 bytes (2048 outputs) per program, 4 warps: 8 outputs/thread, 16-byte bf16
# stores; at 3 TB/s the 2.5 B/elem (bf16 out) traffic is ~0.8 ms per 1e9 elements.
_DEQUANT_PAIRS = 1024
_DEQUANT_WARPS = 4


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")


def _check_code(code: torch.Tensor) -> None:
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(
            f"code must be an fp32 tensor of 16 entries, got {code.dtype} with {code.numel()}"
        )


def quantize_bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints (fp32 [15]) of the sorted ``code`` and ``order`` (int32 [16]) = argsort(code).

    Computed on the CPU with torch.argsort, as bitsandbytes does, so the tie between FP4's
    two zero codes (0 and 8) resolves identically. Callers that quantize often should cache the result.
    """
    _check_code(code)
    c = code.detach().cpu()
    order = torch.argsort(c)
    s = c[order]
    bounds = (s[:-1] + s[1:]) / 2
    return bounds.to(code.device), order.to(torch.int32).to(code.device)


def quantize_4bit(
    x: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    bounds: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to 4 bits, byte-identical to ``bitsandbytes.functional.quantize_4bit``.

    Args:
        x: any shape, fp32/fp16/bf16, flattened row-major (non-contiguous input is copied).
        code: fp32 [16], the 4-bit table in bit order (NF4 or FP4).
        blocksize: elements per absmax block, a power of two in 32..4096.
        bounds, order: optional precomputed ``quantize_bounds(code)`` (avoids a host sync);
            the bounds must ascend, as bucketize requires.

    Returns:
        ``(packed, absmax)``: uint8 ``[(n+1)//2]`` and fp32 ``[ceil(n/blocksize)]``.
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    _check_blocksize(blocksize)
    _check_code(code)
    if bounds is None or order is None:
        bounds, order = quantize_bounds(code)
    if bounds.dtype != torch.float32 or bounds.numel() != 15:
        raise ValueError(f"bounds must be fp32 [15], got {bounds.dtype} {tuple(bounds.shape)}")
    if order.dtype != torch.int32 or order.numel() != 16:
        raise ValueError(f"order must be int32 [16], got {order.dtype} {tuple(order.shape)}")
    n = x.numel()
    if n == 0:
        raise ValueError("x must have at least one element")
    if n >= 2**31:
        raise ValueError(f"x must have fewer than 2**31 elements, got {n}")
    flat = x.reshape(-1)
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    group = max(1, _QUANT_ELEMS_PER_PROG // blocksize)
    full = n // blocksize
    if full:
        _quantize_4bit_kernel[(triton.cdiv(full, group),)](
            flat,
            bounds,
            order,
            packed,
            absmax,
            n,
            0,
            full,
            BLOCKSIZE=blocksize,
            GROUP=group,
            PARTIAL=False,
            num_warps=_QUANT_WARPS,
        )
    if full < nblocks:
        _quantize_4bit_kernel[(1,)](
            flat,
            bounds,
            order,
            packed,
            absmax,
            n,
            full,
            nblocks,
            BLOCKSIZE=blocksize,
            GROUP=1,
            PARTIAL=True,
            num_warps=_QUANT_WARPS,
        )
    return packed, absmax


def check_weight(w: Weight4bit, device: torch.device | None = None) -> bool:
    """Validate ``w``; returns True when it is double-quantized. Raises ValueError."""
    if not isinstance(w, Weight4bit):
        raise ValueError(f"expected a Weight4bit, got {type(w).__name__}")
    _check_blocksize(w.blocksize)
    _check_code(w.code)
    n_rows, n_cols = w.n_rows, w.n_cols
    if n_rows <= 0 or n_cols <= 0:
        raise ValueError(f"weight shape must be positive, got [{n_rows}, {n_cols}]")
    n = n_rows * n_cols
    if n >= 2**31:
        raise ValueError(f"weight must have fewer than 2**31 elements, got {n}")
    if w.packed.dtype != torch.uint8 or w.packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with (N*K+1)//2 = {(n + 1) // 2} elements, "
            f"got {w.packed.dtype} with {w.packed.numel()}"
        )
    if not w.packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    nblocks = triton.cdiv(n, w.blocksize)
    if w.absmax.numel() != nblocks or not w.absmax.is_contiguous():
        raise ValueError(
            f"absmax must be contiguous with ceil(N*K/blocksize) = {nblocks} elements, "
            f"got {w.absmax.numel()}"
        )
    if w.absmax.dtype == torch.uint8:
        nested = (w.nested_absmax, w.nested_code, w.offset)
        if any(t is None for t in nested):
            raise ValueError(
                "uint8 absmax (double quantization) needs nested_absmax, nested_code and offset"
            )
        n2 = triton.cdiv(nblocks, NESTED_BLOCKSIZE)
        if w.nested_absmax.dtype != torch.float32 or w.nested_absmax.numel() != n2:
            raise ValueError(
                f"nested_absmax must be fp32 [{n2}], got {w.nested_absmax.dtype} "
                f"with {w.nested_absmax.numel()} elements"
            )
        if w.nested_code.dtype != torch.float32 or w.nested_code.numel() != 256:
            raise ValueError(f"nested_code must be fp32 [256], got {w.nested_code.dtype}")
        if w.offset.dtype != torch.float32 or w.offset.numel() != 1:
            raise ValueError(f"offset must be an fp32 tensor of one element, got {w.offset.dtype}")
        tensors = (w.packed, w.absmax, w.code, *nested)
        double = True
    elif w.absmax.dtype == torch.float32:
        tensors = (w.packed, w.absmax, w.code)
        double = False
    else:
        raise ValueError(f"absmax must be fp32 or uint8 (double-quantized), got {w.absmax.dtype}")
    device = device if device is not None else w.packed.device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"weight tensors must be on {device}, got one on {t.device}")
    return double


def weight_args(w: Weight4bit, double: bool) -> tuple[torch.Tensor, ...]:
    """The six pointer arguments every kernel takes for a 4-bit weight.

    Unused nested pointers get ``absmax`` as a placeholder: the DOUBLE_QUANT=False branch
    never reads them.
    """
    if double:
        return (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset.reshape(1))
    return (w.packed, w.absmax, w.code, w.absmax, w.absmax, w.absmax)


def dequantize_4bit(w: Weight4bit, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``w`` to a new ``[N, K]`` tensor of ``dtype`` (fp32/fp16/bf16).

    Identical to ``bitsandbytes.functional.dequantize_4bit`` for plain and double-quantized
    weights. Only for export/merge paths: the matmul kernels never materialize ``W``.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be fp32, fp16 or bf16, got {dtype}")
    double = check_weight(w)
    n = w.n_rows * w.n_cols
    out = torch.empty((w.n_rows, w.n_cols), dtype=dtype, device=w.packed.device)
    grid = (triton.cdiv(triton.cdiv(n, 2), _DEQUANT_PAIRS),)
    _dequantize_4bit_kernel[grid](
        *weight_args(w, double),
        out,
        n,
        BLOCKSIZE=w.blocksize,
        DOUBLE_QUANT=double,
        PAIRS=_DEQUANT_PAIRS,
        num_warps=_DEQUANT_WARPS,
        enable_fp_fusion=False,
    )
    return out


# --------------------------------------------------------------------------------------------
# Ahead-of-time specs
# --------------------------------------------------------------------------------------------


def _aot_specs() -> list[AotSpec]:
    specs = []
    # The blocksize sets the tile shape of quantize: compile the extremes, the default and
    # 256 (the most registers, 187 on sm_90 under triton 3.6) for every input dtype (the
    # dtype changes what LLVM vectorizes: 16-bit inputs once spilled where fp32 did not).
    # The partial-block launch is one small program: one blocksize per dtype covers it.
    full = [(bs, dt) for dt in (torch.float32, *ACT_DTYPES) for bs in (32, 64, 256, 4096)]
    partial_combos = [(32, torch.float32), (64, torch.bfloat16), (4096, torch.float16)]
    combos = [(bs, dt, False) for bs, dt in full] + [(bs, dt, True) for bs, dt in partial_combos]
    for bs, dt, partial in combos:
        group = 1 if partial else max(1, _QUANT_ELEMS_PER_PROG // bs)
        specs.append(
            AotSpec(
                name=f"_quantize_4bit_kernel[{_TL_DTYPE[dt]},bs{bs}{',partial' if partial else ''}]",
                fn=_quantize_4bit_kernel,
                signature={
                    "x_ptr": f"*{_TL_DTYPE[dt]}",
                    "bounds_ptr": "*fp32",
                    "order_ptr": "*i32",
                    "packed_ptr": "*u8",
                    "absmax_ptr": "*fp32",
                    "n": "i32",
                    "blk_start": "i32",
                    "blk_end": "i32",
                    "BLOCKSIZE": "constexpr",
                    "GROUP": "constexpr",
                    "PARTIAL": "constexpr",
                },
                constexprs={"BLOCKSIZE": bs, "GROUP": group, "PARTIAL": partial},
                options={"num_warps": _QUANT_WARPS},
            )
        )
    # BLOCKSIZE only changes a constant divisor in dequantize; one per dtype and absmax kind,
    # plus the extremes of the blocksize range.
    dq_combos = [
        (torch.bfloat16, False, 64),
        (torch.bfloat16, True, 64),
        (torch.float16, True, 4096),
        (torch.float32, True, 32),
    ]
    for dt, double, bs in dq_combos:
        specs.append(
            AotSpec(
                name=f"_dequantize_4bit_kernel[{_TL_DTYPE[dt]},{'dq' if double else 'fp32abs'},bs{bs}]",
                fn=_dequantize_4bit_kernel,
                signature={
                    "packed_ptr": "*u8",
                    "absmax_ptr": "*u8" if double else "*fp32",
                    "code_ptr": "*fp32",
                    "nabs_ptr": "*fp32",
                    "ncode_ptr": "*fp32",
                    "offset_ptr": "*fp32",
                    "out_ptr": f"*{_TL_DTYPE[dt]}",
                    "n": "i32",
                    "BLOCKSIZE": "constexpr",
                    "DOUBLE_QUANT": "constexpr",
                    "PAIRS": "constexpr",
                },
                constexprs={
                    "BLOCKSIZE": bs,
                    "DOUBLE_QUANT": double,
                    "PAIRS": _DEQUANT_PAIRS,
                },
                options={"num_warps": _DEQUANT_WARPS, "enable_fp_fusion": False},
            )
        )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()

__all__ = [
    "AOT_SPECS",
    "Weight4bit",
    "check_weight",
    "dequantize_4bit",
    "quantize_4bit",
    "quantize_bounds",
    "weight_args",
]
