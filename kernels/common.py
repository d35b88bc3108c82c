"""``@triton.jit`` helpers shared by the kernel files: decoding the bitsandbytes 4-bit format
(:func:`dequant_gather`, :func:`block_scale`), the fp32 -> 16-bit cast that rounds to
nearest even also under the interpreter (:func:`cast_rne`), and 64-bit row offsets for
tensors past 2^31 elements (:func:`tile_rows`, :func:`needs_int64`).

Public names, so that kernel files never import each other's private helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "INT32_OFFSET_LIMIT",
    "block_scale",
    "cast_rne",
    "dequant_gather",
    "needs_int64",
    "tile_rows",
]


@triton.jit
def block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, blk, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 scale of quantization blocks ``blk`` (any shape)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        # Product then sum, each rounded, as bitsandbytes does; the dequantize kernel is
        # compiled with enable_fp_fusion=False so this does not become an FMA there.
        nested = tl.load(nabs_ptr + blk // 256, mask=mask, other=0.0)
        scale = tl.load(ncode_ptr + q) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def dequant_gather(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    idx,
    mask,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """fp32 values of the elements at flat indices ``idx`` (any shape, int32).

    A gather, not a byte-pair decode: the matmul tiles index ``n*K + k`` with arbitrary ``K``,
    so two neighbours in a tile need not share a byte. Both nibbles of a byte are requested by
    neighbouring lanes and served by the same L1 sector, so DRAM traffic stays at 0.5 B/elem.
    """
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nib = (byte >> ((1 - (idx & 1)) * 4)) & 0xF
    # 16-entry table: stays in L1, cheaper than a 16-way select in registers.
    val = tl.load(code_ptr + nib)
    scale = block_scale(
        absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, idx // BLOCKSIZE, mask, DOUBLE_QUANT
    )
    return val * scale


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """Cast fp32 ``v`` to ``dtype`` rounding to nearest even, also under the interpreter.

    The interpreter truncates fp32 -> bf16 casts; the GPU's cvt.rn rounds to nearest even. The
    integer form below is what cvt.rn does for every non-NaN input (NaN stays NaN), so
    dequantized bf16 matches bitsandbytes byte for byte in tests and on hardware, for four
    integer ops per element in a memory-bound kernel.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


# 64-bit indexing. Triton passes an integer argument as i32 when it fits, and program ids and
# aranges are i32, so ``offs_m * stride`` wraps once a token-major tensor holds 2^31 elements:
# at 150K tokens for an [M, 14336] MLP activation, at 524K for [M, 4096] hidden states. The
# kernels that index activations by row (the QLoRA linear's forward, input backward and LoRA
# grads) take ``INDEX64``; the launcher sets it from the tensors it passes (needs_int64), so
# the usual lengths keep 32-bit index math. The cost when it is on, by the analytical model:
# one i64 multiply per tile row, hoisted out of the K loop in the forward and the input
# backward (inside the M loop of the LoRA grads, against a [BMR, BQ] tile load); the
# pointers themselves are 64-bit either way. Registers: the input backward's INDEX64 variants
# spilled at r >= 128 and get smaller tiles (_BWD_TABLE_INDEX64); `trilora kernels` lists
# both variants of every config, without spills. Speed awaits a GPU.
INT32_OFFSET_LIMIT = 2**31


@triton.jit
def tile_rows(start, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    """Row indices ``start .. start + BLOCK - 1`` of a tile: int64 when ``INDEX64``, so that
    ``rows * stride`` cannot wrap; int32 otherwise."""
    rows = start + tl.arange(0, BLOCK)
    if INDEX64:
        rows = rows.to(tl.int64)
    return rows


def needs_int64(*tensors) -> bool:
    """Whether an element of any of ``tensors`` (``None`` skipped) lies 2^31 or more elements
    past its first, so that 32-bit offsets would wrap. Reads shapes and strides only: works on
    meta tensors."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if last >= INT32_OFFSET_LIMIT:
            return True
    return False
