"""Fused QLoRA linear: 4-bit base weight + LoRA adapter, forward and backward.

Forward   y   = x @ W.T + s * (drop(x) @ A.T) @ B.T + bias,   xa  = drop(x) @ A.T  (fp32)
Backward  dx  = dy @ W + s * drop'((dy @ B) @ A),              dyb = dy @ B         (fp32)
          dA  = s * dyb.T @ drop(x),                           dB  = s * dy.T @ xa
with drop(x) = x * mask * dropout_scale. ``W`` [N, K] stays packed in the bitsandbytes 4-bit
layout: every kernel dequantizes its tile in registers right before ``tl.dot``, so a full-size
dequantized weight never exists (bitsandbytes re-materializes one per layer per backward).

All accumulation is fp32. Block configs come from fixed tables keyed by shape class (there is
no GPU to autotune on); each table documents its reasoning against H100 SXM rates:
~3.0 TB/s HBM, ~790 dense bf16/fp16 TFLOP/s, ~395 tf32 TFLOP/s, 132 SMs. The ridge point is
~260 FLOP/byte: a 4-bit weight (0.5 B/elem) GEMM is memory-bound below M ~ 64 tokens and
compute-bound above, which is where the table switches class.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .common import dequant_gather, needs_int64, tile_rows
from .int8 import WEIGHT_FORMAT_INT8, Weight8bit, check_weight8, int8_gather, weight8_args
from .quantize import ACT_DTYPES, Weight4bit, check_weight, weight_args

_NUM_SMS = 132  # H100 SXM; only used to size split-K / split-M grids (2 waves).
_SPLITK_MAX_M = 16


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _qlora_fwd_tiled_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    mask_ptr,
    y_ptr,
    xa_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_dm,
    stride_dk,
    scale,
    drop_scale,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    R_PAD: tl.constexpr,
    GROUP_M: tl.constexpr,
    INDEX64: tl.constexpr,
):
    # Grouped launch order: GROUP_M consecutive programs share one W column tile, so each
    # dequantized-from-L2 W tile serves GROUP_M x-tiles before it is evicted.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    offs_m = tile_rows(pid_m * BM, BM, INDEX64)  # int64 past 2^31 elements: kernels/common.py
    offs_n = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, R_PAD)
    m_in = offs_m < M
    n_in = offs_n < N
    r_in = rr < R

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_xa = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + rk
        k_in = offs_k < K
        xm = m_in[:, None] & k_in[None, :]
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=xm, other=0.0
        )
        # W.T tile [BK, BN]: flat index n*K + k of the row-major [N, K] weight.
        wm = k_in[:, None] & n_in[None, :]
        if WEIGHT_FORMAT == 1:
            w = int8_gather(
                packed_ptr,
                absmax_ptr,
                offs_n[None, :] * K + offs_k[:, None],
                wm,
                offs_n[None, :],
                n_in[None, :],
            )
        else:
            w = dequant_gather(
                packed_ptr,
                absmax_ptr,
                code_ptr,
                nabs_ptr,
                ncode_ptr,
                offset_ptr,
                offs_n[None, :] * K + offs_k[:, None],
                wm,
                BLOCKSIZE,
                DOUBLE_QUANT,
            )
        acc = tl.dot(x, w.to(x.dtype), acc)
        if HAS_LORA:
            # x is already in registers: the LoRA down-projection costs no extra x traffic.
            a = tl.load(
                a_ptr + rr[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=k_in[:, None] & r_in[None, :],
                other=0.0,
            )
            xd = x
            if HAS_DROPOUT:
                keep = tl.load(
                    mask_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk,
                    mask=xm,
                    other=0,
                )
                xd = tl.where(keep != 0, x.to(tl.float32) * drop_scale, 0.0)
            acc_xa = tl.dot(xd.to(a.dtype), a, acc_xa)

    if HAS_LORA:
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + rr[:, None] * stride_br,
            mask=r_in[:, None] & n_in[None, :],
            other=0.0,
        )
        acc += scale * tl.dot(acc_xa.to(b.dtype), b)
        if pid_n == 0:
            tl.store(
                xa_ptr + offs_m[:, None] * R + rr[None, :],
                acc_xa,
                mask=m_in[:, None] & r_in[None, :],
            )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * N + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_in[:, None] & n_in[None, :],
    )


@triton.jit
def _qlora_fwd_splitk_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    a_ptr,
    mask_ptr,
    ybuf_ptr,
    xabuf_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_dm,
    stride_dk,
    k_per_split,
    drop_scale,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    RB: tl.constexpr,
):
    # Decode (M <= 16): W streaming is everything, so the grid is (N tiles + LoRA tiles) x
    # SPLIT_K to put ~2 waves of programs on the SMs even for narrow layers. Programs past the
    # last N tile each compute an RB-row slice of xa = drop(x) @ A.T for their K slice; an
    # RB x BK A tile is the same byte count as a BN x BK 4-bit W tile, so no program straggles.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    offs_m = tl.arange(0, BM)
    m_in = offs_m < M
    rk = tl.arange(0, BK)
    if pid_n < num_n:
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_in = offs_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            offs_k = k0 + rk
            k_in = offs_k < k_end
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_in[:, None] & k_in[None, :],
                other=0.0,
            )
            if WEIGHT_FORMAT == 1:
                w = int8_gather(
                    packed_ptr,
                    absmax_ptr,
                    offs_n[None, :] * K + offs_k[:, None],
                    k_in[:, None] & n_in[None, :],
                    offs_n[None, :],
                    n_in[None, :],
                )
            else:
                w = dequant_gather(
                    packed_ptr,
                    absmax_ptr,
                    code_ptr,
                    nabs_ptr,
                    ncode_ptr,
                    offset_ptr,
                    offs_n[None, :] * K + offs_k[:, None],
                    k_in[:, None] & n_in[None, :],
                    BLOCKSIZE,
                    DOUBLE_QUANT,
                )
            acc = tl.dot(x, w.to(x.dtype), acc)
        tl.atomic_add(
            ybuf_ptr + offs_m[:, None] * N + offs_n[None, :],
            acc,
            mask=m_in[:, None] & n_in[None, :],
            sem="relaxed",
        )
    elif HAS_LORA:
        rr = (pid_n - num_n) * RB + tl.arange(0, RB)
        r_in = rr < R
        acc_xa = tl.zeros((BM, RB), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            offs_k = k0 + rk
            k_in = offs_k < k_end
            xm = m_in[:, None] & k_in[None, :]
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=xm,
                other=0.0,
            )
            a = tl.load(
                a_ptr + rr[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=k_in[:, None] & r_in[None, :],
                other=0.0,
            )
            xd = x
            if HAS_DROPOUT:
                keep = tl.load(
                    mask_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk,
                    mask=xm,
                    other=0,
                )
                xd = tl.where(keep != 0, x.to(tl.float32) * drop_scale, 0.0)
            acc_xa = tl.dot(xd.to(a.dtype), a, acc_xa)
        tl.atomic_add(
            xabuf_ptr + offs_m[:, None] * R + rr[None, :],
            acc_xa,
            mask=m_in[:, None] & r_in[None, :],
            sem="relaxed",
        )


@triton.jit
def _qlora_splitk_epilogue_kernel(
    ybuf_ptr,
    xa_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    R,
    stride_bn,
    stride_br,
    scale,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    R_PAD: tl.constexpr,
):
    # Runs after every split has landed: y = ybuf + s * xa @ B.T + bias, cast once.
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_in = offs_m < M
    n_in = offs_n < N
    out_m = m_in[:, None] & n_in[None, :]
    acc = tl.load(ybuf_ptr + offs_m[:, None] * N + offs_n[None, :], mask=out_m, other=0.0)
    if HAS_LORA:
        rr = tl.arange(0, R_PAD)
        r_in = rr < R
        xa = tl.load(
            xa_ptr + offs_m[:, None] * R + rr[None, :],
            mask=m_in[:, None] & r_in[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + rr[:, None] * stride_br,
            mask=r_in[:, None] & n_in[None, :],
            other=0.0,
        )
        acc += scale * tl.dot(xa.to(b.dtype), b)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_m
    )


@triton.jit
def _qlora_bwd_input_kernel(
    dy_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    mask_ptr,
    dx_ptr,
    dyb_ptr,
    M,
    N,
    K,
    R,
    stride_gm,
    stride_gn,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_dm,
    stride_dk,
    scale,
    drop_scale,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    R_PAD: tl.constexpr,
    GROUP_M: tl.constexpr,
    INDEX64: tl.constexpr,
):
    # Output tile dx[BM, BK]; the reduction runs over N. W is read in its natural [N, K]
    # orientation here (flat n*K + k along the tile's fast axis), the same packed bytes.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_k = tl.cdiv(K, BK)
    width = GROUP_M * num_k
    first_m = (pid // width) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_k = (pid % width) // group_m

    offs_m = tile_rows(pid_m * BM, BM, INDEX64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    rn = tl.arange(0, BN)
    rr = tl.arange(0, R_PAD)
    m_in = offs_m < M
    k_in = offs_k < K
    r_in = rr < R

    acc = tl.zeros((BM, BK), dtype=tl.float32)
    acc_r = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + rn
        n_in = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
            mask=m_in[:, None] & n_in[None, :],
            other=0.0,
        )
        if WEIGHT_FORMAT == 1:
            w = int8_gather(
                packed_ptr,
                absmax_ptr,
                offs_n[:, None] * K + offs_k[None, :],
                n_in[:, None] & k_in[None, :],
                offs_n[:, None],
                n_in[:, None],
            )
        else:
            w = dequant_gather(
                packed_ptr,
                absmax_ptr,
                code_ptr,
                nabs_ptr,
                ncode_ptr,
                offset_ptr,
                offs_n[:, None] * K + offs_k[None, :],
                n_in[:, None] & k_in[None, :],
                BLOCKSIZE,
                DOUBLE_QUANT,
            )
        acc = tl.dot(dy, w.to(dy.dtype), acc)
        if HAS_LORA:
            # dy is in registers already: dy @ B rides along at r/BK extra FLOPs.
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=n_in[:, None] & r_in[None, :],
                other=0.0,
            )
            acc_r = tl.dot(dy.to(b.dtype), b, acc_r)

    out_m = m_in[:, None] & k_in[None, :]
    if HAS_LORA:
        a = tl.load(
            a_ptr + rr[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_in[:, None] & k_in[None, :],
            other=0.0,
        )
        lo = tl.dot(acc_r.to(a.dtype), a)
        if HAS_DROPOUT:
            keep = tl.load(
                mask_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk,
                mask=out_m,
                other=0,
            )
            lo = tl.where(keep != 0, lo * drop_scale, 0.0)
        acc += scale * lo
        if pid_k == 0:
            tl.store(
                dyb_ptr + offs_m[:, None] * R + rr[None, :],
                acc_r,
                mask=m_in[:, None] & r_in[None, :],
            )
    tl.store(
        dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=out_m
    )


@triton.jit
def _lora_tn_grad_kernel(
    l_ptr,
    r_ptr,
    mask_ptr,
    out_ptr,
    M,
    P,
    Q,
    stride_lm,
    stride_lp,
    stride_rm,
    stride_rq,
    stride_dm,
    stride_dq,
    m_per_split,
    scale,
    drop_scale,
    HAS_DROPOUT: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BMR: tl.constexpr,
    INDEX64: tl.constexpr,
):
    # out[P, Q] += s * L[m0:m1].T @ drop(R[m0:m1]) for this program's M slice (fp32 atomics).
    # One kernel serves both dA (L = dyb, R = x with dropout) and dB (L = dy, R = xa).
    # Operands go to tl.dot in fp32 (tf32 on the GPU): one side is always the fp32 LoRA
    # intermediate, and these GEMMs are r/N of the base GEMM's FLOPs.
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    num_q = tl.cdiv(Q, BQ)
    pid_p = pid // num_q
    pid_q = pid % num_q
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    p_in = offs_p < P
    q_in = offs_q < Q
    m_start = pid_m * m_per_split
    m_end = min(m_start + m_per_split, M)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m0 in range(m_start, m_end, BMR):
        offs_m = tile_rows(m0, BMR, INDEX64)
        m_in = offs_m < m_end
        lt = tl.load(
            l_ptr + offs_p[:, None] * stride_lp + offs_m[None, :] * stride_lm,
            mask=p_in[:, None] & m_in[None, :],
            other=0.0,
        ).to(tl.float32)
        rmask = m_in[:, None] & q_in[None, :]
        rt = tl.load(
            r_ptr + offs_m[:, None] * stride_rm + offs_q[None, :] * stride_rq, mask=rmask, other=0.0
        ).to(tl.float32)
        if HAS_DROPOUT:
            keep = tl.load(
                mask_ptr + offs_m[:, None] * stride_dm + offs_q[None, :] * stride_dq,
                mask=rmask,
                other=0,
            )
            rt = tl.where(keep != 0, rt * drop_scale, 0.0)
        acc = tl.dot(lt, rt, acc)
    tl.atomic_add(
        out_ptr + offs_p[:, None] * Q + offs_q[None, :],
        acc * scale,
        mask=p_in[:, None] & q_in[None, :],
        sem="relaxed",
    )


# --------------------------------------------------------------------------------------------
# Block-config tables
# --------------------------------------------------------------------------------------------

# Tiled forward, M > 16. Row = (max M, max R_PAD) -> (BM, BN, BK, warps, stages).
# Measured with `trilora kernels` (sm_80/sm_90, no spills); the limits that shaped it:
# - The W tile is decoded by gathers (byte, code[nibble], per-element block scale). Triton's
#   pipeliner stages the fp32 scale gathers through shared memory, so a [BK, BN] W tile costs
#   ~stages * BK*BN*4 B of smem on top of the x/A tiles; BK = 32 keeps every row under
#   sm_80's 163 KiB. The decode's index math also costs ~2 registers per W element/thread.
# - One 64 x 64 x 32, 8-warp tile for r <= 128: 128 x 64 and 4-warp variants spilled on sm_80
#   (255 regs + 16-240 B), so M classes share it. For M <= 64 (memory-bound: a 4-bit W moves
#   0.5 B/elem, AI = 4*M FLOP/B below the ~260 ridge) N/64 programs stream W once each;
#   for large M each W element is decoded once per 64 rows of x (decode-bound, see README).
# - r = 256: the [BM, 256] fp32 LoRA accumulator needs 64 more regs/thread at BM = 64, so
#   BM and BN drop to 32 (BN = 64 spilled 32 B on sm_90 with fp32 factors), stages to 2.
# The LoRA down-projection is recomputed by each N tile (R_PAD/BN extra FLOPs): the price of
# reading x once and not writing xa in a separate pass; small for r <= 16.
_FWD_TILED_TABLE = (
    # (max_m, max_r_pad, BM, BN, BK, warps, stages)
    (None, 128, 64, 64, 32, 8, 3),
    (None, 256, 32, 32, 32, 8, 2),
)
_GROUP_M = 8

# Split-K decode forward, M <= 16: BM = 16 (smallest tl.dot M), BN = 64, BK = 32 (BK = 128
# spilled and staged 217 KiB of scale gathers). A W tile is 64 x 32 x 0.5 B = 1 KB per step; SPLIT_K is chosen so that
# (N/64 + r/16) * SPLIT_K ~ 2 waves of 132 SMs. RB = 16 LoRA rows per xa program.
_SPLITK_CFG = {"BM": 16, "BN": 64, "BK": 32, "RB": 16, "num_warps": 4, "num_stages": 3}
_EPILOGUE_CFG = {"BM": 16, "BN": 32, "num_warps": 8}

# Backward input dx = dy @ W: output tile [BM, BK] over (M, K), reduction over N in BN steps
# (the W tile is [BN, BK]: same smem/register reasoning as the forward with N and K swapped).
# The reduction step BN = 32 (16 for r = 256) bounds the staged scale gathers.
_BWD_TABLE = (
    # (max_m, max_r_pad, BM, BN, BK, warps, stages)
    (None, 64, 128, 32, 32, 8, 3),
    (None, 128, 64, 32, 64, 8, 3),
    (None, 256, 64, 16, 32, 8, 2),
)
# The same with 64-bit row offsets (INDEX64): the [BM] int64 row vector and the 64-bit
# address math held across the N loop cost registers, and the r = 128 (BK 64, fp32 factors)
# and r = 256 rows spilled 16-56 B on sm_80/sm_90. Half the output tile keeps them in
# registers: BK 32 at r <= 128, BM 32 at r = 256. Only tensors past 2^31 elements use it.
_BWD_TABLE_INDEX64 = (
    (None, 64, 128, 32, 32, 8, 3),
    (None, 128, 64, 32, 32, 8, 3),
    (None, 256, 32, 16, 32, 8, 2),
)

# LoRA weight grads: tf32 GEMMs of 2*M*r*(N+K) FLOPs, ~r/N of the base; BP = BQ = 64 keeps
# enough (P, Q) tiles that SPLIT_M (fp32 atomics) only needs to add a few M slices.
_TN_CFG = {"BP": 64, "BQ": 64, "BMR": 32, "num_warps": 4, "num_stages": 3}


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _pick(table, m: int, r_pad: int):
    for max_m, max_r, *cfg in table:
        if (max_m is None or m <= max_m) and r_pad <= max_r:
            return cfg
    raise AssertionError("unreachable: tables cover r_pad <= 256")


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_act(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    if t.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be fp16 or bf16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _check_lora(lora_a, lora_b, act_dtype, n: int, k: int) -> int:
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must both be given or both be None")
    if lora_a is None:
        return 0
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must be [r, K={k}], got {list(lora_a.shape)}")
    r = lora_a.shape[0]
    if not 1 <= r <= 256:
        raise ValueError(f"LoRA rank must be in 1..256, got {r}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must be [N={n}, r={r}], got {list(lora_b.shape)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in (torch.float32, act_dtype):
            raise ValueError(f"{name} must be fp32 or {act_dtype}, got {t.dtype}")
    return r


def _check_mask(mask, m: int, k: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"dropout_mask must be bool or uint8, got {mask.dtype}")
    if tuple(mask.shape) != (m, k):
        raise ValueError(f"dropout_mask must be [M={m}, K={k}], got {list(mask.shape)}")
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _check_device(device: torch.device, *tensors) -> None:
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on {device}, got one on {t.device}")


def _weight_launch_args(w, device: torch.device) -> tuple[tuple, int, bool, int]:
    """``(pointer args, BLOCKSIZE, DOUBLE_QUANT, WEIGHT_FORMAT)`` of a weight tuple of any
    format the kernels decode: ``Weight4bit`` (format 0) or ``Weight8bit`` (format 1)."""
    if isinstance(w, Weight8bit):
        check_weight8(w, device)
        # BLOCKSIZE / DOUBLE_QUANT are dead constexprs for int8; fixed so they add no variants.
        return weight8_args(w), 64, False, WEIGHT_FORMAT_INT8
    double = check_weight(w, device)
    return weight_args(w, double), w.blocksize, double, 0


def qlora_forward(
    x: torch.Tensor,
    w: Weight4bit | Weight8bit,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
    variant: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused QLoRA forward.

    Args:
        x: [M, K] fp16/bf16, any strides.
        w: the weight [N, K]: 4-bit (plain fp32 absmax or double-quantized uint8 absmax) or
            int8 (``Weight8bit``: int8 codes and fp32 row absmax).
        lora_a: [r, K] and lora_b: [N, r], fp32 or x.dtype, r in 1..256; both None for no LoRA.
        scale: LoRA scale s.
        bias: [N] in x.dtype, or None.
        dropout_mask: [M, K] bool/uint8 keep-mask, or None; dropout_scale = 1/(1-p).
        variant: "auto" (split-K for M <= 16, else tiled), "tiled" or "splitk".

    Returns:
        ``(y, xa)``: y [M, N] in x.dtype = x @ W.T + s * drop(x) @ A.T @ B.T + bias, and
        xa = drop(x) @ A.T as fp32 [M, r] (None without LoRA).
    """
    wargs, blocksize, double, weight_format = _weight_launch_args(w, x.device)
    n, k = w.n_rows, w.n_cols
    _check_act("x", x)
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}] to match the weight, got {list(x.shape)}")
    if m == 0:
        raise ValueError("x must have at least one row")
    r = _check_lora(lora_a, lora_b, x.dtype, n, k)
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be [N={n}] in {x.dtype}, got {bias.dtype} {list(bias.shape)}")
    mask = _check_mask(dropout_mask, m, k) if r else None
    _check_device(x.device, lora_a, lora_b, bias, mask)
    if variant == "auto":
        variant = "splitk" if m <= _SPLITK_MAX_M else "tiled"
    if variant not in ("tiled", "splitk"):
        raise ValueError(f"variant must be 'auto', 'tiled' or 'splitk', got {variant!r}")
    if variant == "splitk" and m > _SPLITK_MAX_M:
        raise ValueError(f"variant 'splitk' needs M <= {_SPLITK_MAX_M}, got M={m}")

    has_lora = r > 0
    r_pad = _r_pad(max(r, 1))
    a = lora_a if has_lora else x  # placeholders: HAS_LORA=False never dereferences them
    b = lora_b if has_lora else x
    d = mask if mask is not None else x
    bias_arg = bias if bias is not None else x
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    xa = torch.zeros((m, r), dtype=torch.float32, device=x.device) if has_lora else None

    if variant == "tiled":
        bm, bn, bk, warps, stages = _pick(_FWD_TILED_TABLE, m, r_pad)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _qlora_fwd_tiled_kernel[grid](
            x,
            *wargs,
            a,
            b,
            bias_arg,
            d,
            y,
            xa if has_lora else y,
            m,
            n,
            k,
            r,
            x.stride(0),
            x.stride(1),
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            d.stride(0),
            d.stride(1),
            float(scale),
            float(dropout_scale),
            BLOCKSIZE=blocksize,
            DOUBLE_QUANT=double,
            WEIGHT_FORMAT=weight_format,
            HAS_LORA=has_lora,
            HAS_BIAS=bias is not None,
            HAS_DROPOUT=mask is not None,
            BM=bm,
            BN=bn,
            BK=bk,
            R_PAD=r_pad,
            GROUP_M=_GROUP_M,
            INDEX64=needs_int64(x, mask, y),
            num_warps=warps,
            num_stages=stages,
        )
        return y, xa

    cfg = _SPLITK_CFG
    ybuf = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    n_tiles = triton.cdiv(n, cfg["BN"]) + (triton.cdiv(r, cfg["RB"]) if has_lora else 0)
    k_steps = triton.cdiv(k, cfg["BK"])
    split = max(1, min(2 * _NUM_SMS // n_tiles, k_steps))
    k_per_split = triton.cdiv(k_steps, split) * cfg["BK"]
    split = triton.cdiv(k, k_per_split)
    _qlora_fwd_splitk_kernel[(n_tiles, split)](
        x,
        *wargs,
        a,
        d,
        ybuf,
        xa if has_lora else ybuf,
        m,
        n,
        k,
        r,
        x.stride(0),
        x.stride(1),
        a.stride(0),
        a.stride(1),
        d.stride(0),
        d.stride(1),
        k_per_split,
        float(dropout_scale),
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double,
        WEIGHT_FORMAT=weight_format,
        HAS_LORA=has_lora,
        HAS_DROPOUT=mask is not None,
        BM=cfg["BM"],
        BN=cfg["BN"],
        BK=cfg["BK"],
        RB=cfg["RB"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    ecfg = _EPILOGUE_CFG
    _qlora_splitk_epilogue_kernel[(triton.cdiv(n, ecfg["BN"]),)](
        ybuf,
        xa if has_lora else ybuf,
        b,
        bias_arg,
        y,
        m,
        n,
        r,
        b.stride(0),
        b.stride(1),
        float(scale),
        HAS_LORA=has_lora,
        HAS_BIAS=bias is not None,
        BM=ecfg["BM"],
        BN=ecfg["BN"],
        R_PAD=r_pad,
        num_warps=ecfg["num_warps"],
    )
    return y, xa


def qlora_backward_input(
    dy: torch.Tensor,
    w: Weight4bit | Weight8bit,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input gradient of the QLoRA linear.

    Args:
        dy: [M, N] fp16/bf16, any strides.
        w, lora_a, lora_b, scale, dropout_mask, dropout_scale: as in ``qlora_forward``.

    Returns:
        ``(dx, dyb)``: dx [M, K] in dy.dtype = dy @ W + s * mask*ds * ((dy @ B) @ A), and
        dyb = dy @ B as fp32 [M, r] (None without LoRA).
    """
    wargs, blocksize, double, weight_format = _weight_launch_args(w, dy.device)
    n, k = w.n_rows, w.n_cols
    _check_act("dy", dy)
    m = dy.shape[0]
    if dy.shape[1] != n:
        raise ValueError(f"dy must be [M, N={n}] to match the weight, got {list(dy.shape)}")
    if m == 0:
        raise ValueError("dy must have at least one row")
    r = _check_lora(lora_a, lora_b, dy.dtype, n, k)
    mask = _check_mask(dropout_mask, m, k) if r else None
    _check_device(dy.device, lora_a, lora_b, mask)
    has_lora = r > 0
    r_pad = _r_pad(max(r, 1))
    a = lora_a if has_lora else dy
    b = lora_b if has_lora else dy
    d = mask if mask is not None else dy
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    dyb = torch.empty((m, r), dtype=torch.float32, device=dy.device) if has_lora else None
    index64 = needs_int64(dy, mask, dx)
    bm, bn, bk, warps, stages = _pick(_BWD_TABLE_INDEX64 if index64 else _BWD_TABLE, m, r_pad)
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
    _qlora_bwd_input_kernel[grid](
        dy,
        *wargs,
        a,
        b,
        d,
        dx,
        dyb if has_lora else dx,
        m,
        n,
        k,
        r,
        dy.stride(0),
        dy.stride(1),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        d.stride(0),
        d.stride(1),
        float(scale),
        float(dropout_scale),
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double,
        WEIGHT_FORMAT=weight_format,
        HAS_LORA=has_lora,
        HAS_DROPOUT=mask is not None,
        BM=bm,
        BN=bn,
        BK=bk,
        R_PAD=r_pad,
        GROUP_M=_GROUP_M,
        INDEX64=index64,
        num_warps=warps,
        num_stages=stages,
    )
    return dx, dyb


def _tn_grad(lhs, rhs, mask, scale: float, drop_scale: float) -> torch.Tensor:
    m, p = lhs.shape
    q = rhs.shape[1]
    cfg = _TN_CFG
    out = torch.zeros((p, q), dtype=torch.float32, device=lhs.device)
    tiles = triton.cdiv(p, cfg["BP"]) * triton.cdiv(q, cfg["BQ"])
    m_steps = triton.cdiv(m, cfg["BMR"])
    split = max(1, min(2 * _NUM_SMS // tiles, m_steps))
    m_per_split = triton.cdiv(m_steps, split) * cfg["BMR"]
    split = triton.cdiv(m, m_per_split)
    d = mask if mask is not None else rhs
    _lora_tn_grad_kernel[(tiles, split)](
        lhs,
        rhs,
        d,
        out,
        m,
        p,
        q,
        lhs.stride(0),
        lhs.stride(1),
        rhs.stride(0),
        rhs.stride(1),
        d.stride(0),
        d.stride(1),
        m_per_split,
        float(scale),
        float(drop_scale),
        HAS_DROPOUT=mask is not None,
        BP=cfg["BP"],
        BQ=cfg["BQ"],
        BMR=cfg["BMR"],
        INDEX64=needs_int64(lhs, rhs, mask),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def lora_weight_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    xa: torch.Tensor,
    dyb: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factor gradients, reduced over M (split M, fp32 atomics: not bitwise deterministic).

    Args:
        x: [M, K] fp16/bf16; dy: [M, N] in x.dtype; xa: [M, r] fp32 and dyb: [M, r] fp32 (the
        second outputs of ``qlora_forward`` / ``qlora_backward_input``); dropout as in forward.

    Returns:
        ``(dA, dB)``: fp32 [r, K] = s * dyb.T @ drop(x) and fp32 [N, r] = s * dy.T @ xa.
    """
    _check_act("x", x)
    m, k = x.shape
    _check_act("dy", dy)
    if dy.shape[0] != m or dy.dtype != x.dtype:
        raise ValueError(f"dy must be [M={m}, N] in {x.dtype}, got {dy.dtype} {list(dy.shape)}")
    if xa.dtype != torch.float32 or xa.dim() != 2 or xa.shape[0] != m:
        raise ValueError(f"xa must be fp32 [M={m}, r], got {xa.dtype} {list(xa.shape)}")
    r = xa.shape[1]
    if dyb.dtype != torch.float32 or tuple(dyb.shape) != (m, r):
        raise ValueError(f"dyb must be fp32 [M={m}, r={r}], got {dyb.dtype} {list(dyb.shape)}")
    if m == 0 or r == 0:
        raise ValueError("x must have at least one row and the LoRA rank must be >= 1")
    mask = _check_mask(dropout_mask, m, k)
    _check_device(x.device, dy, xa, dyb, mask)
    grad_a = _tn_grad(dyb, x, mask, scale, dropout_scale)
    grad_b = _tn_grad(dy, xa, None, scale, 1.0)
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------
# Ahead-of-time specs
# --------------------------------------------------------------------------------------------
# Compiled with every feature on (LoRA, bias, dropout): the superset of the code, hence the
# worst case for registers and shared memory. Each table row is compiled at its largest R_PAD
# (smaller R_PAD only shrinks the LoRA tiles). Dtype combos: fp16 and bf16 activations with
# LoRA factors in the activation dtype, plus bf16 activations with fp32 factors; each with
# fp32 absmax and with uint8 (double-quantized) absmax.

_WEIGHT_SIG = {
    "packed_ptr": "*u8",
    "code_ptr": "*fp32",
    "nabs_ptr": "*fp32",
    "ncode_ptr": "*fp32",
    "offset_ptr": "*fp32",
}
# (activation, LoRA factor, double-quantized): both activation dtypes, both absmax kinds and
# both factor dtypes, without the full cross product (the compile budget is ~3 min on 2 cores;
# these flags change load/convert code, not tile shapes).
_DTYPE_COMBOS = (("bf16", "bf16", True), ("fp16", "fp16", False), ("bf16", "fp32", True))
# (activation, LoRA factor, double-quantized, WEIGHT_FORMAT): the 4-bit combos, then int8
# (codes *i8, row scales *fp32; no absmax kinds) for the same activation/factor pairs.
_COMBOS = tuple((act, lora, dq, 0) for act, lora, dq in _DTYPE_COMBOS) + tuple(
    (act, lora, False, 1) for act, lora, _ in _DTYPE_COMBOS
)


def _sig(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = _WEIGHT_SIG[name]
        elif name in ("scale", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _with_index64(table):
    """Each table row with INDEX64 off, then on: the launcher picks either for any row (the
    flag depends on the tensors' sizes, not on M's class)."""
    return [(row, index64) for row in table for index64 in (False, True)]


def _i64(index64: bool) -> str:
    return ",i64" if index64 else ""


def _aot_specs() -> list[AotSpec]:
    specs = []
    for act, lora, double, fmt in _COMBOS:
        if fmt == 0:
            absmax = "*u8" if double else "*fp32"
            tag = f"{act},lora-{lora},{'dq' if double else 'fp32abs'}"
        else:
            absmax = "*fp32"
            tag = f"int8,{act},lora-{lora}"
        common = {
            "packed_ptr": "*i8" if fmt else "*u8",
            "absmax_ptr": absmax,
            "a_ptr": f"*{lora}",
            "b_ptr": f"*{lora}",
            "mask_ptr": "*u8",
        }
        for (_max_m, r_pad, bm, bn, bk, warps, stages), index64 in _with_index64(_FWD_TILED_TABLE):
            ce = {
                "BLOCKSIZE": 64,
                "DOUBLE_QUANT": double,
                "WEIGHT_FORMAT": fmt,
                "HAS_LORA": True,
                "HAS_BIAS": True,
                "HAS_DROPOUT": True,
                "BM": bm,
                "BN": bn,
                "BK": bk,
                "R_PAD": r_pad,
                "GROUP_M": _GROUP_M,
                "INDEX64": index64,
            }
            types = {
                **common,
                "x_ptr": f"*{act}",
                "bias_ptr": f"*{act}",
                "y_ptr": f"*{act}",
                "xa_ptr": "*fp32",
            }
            specs.append(
                AotSpec(
                    f"_qlora_fwd_tiled_kernel[{tag},BM{bm},BN{bn},BK{bk},R{r_pad}{_i64(index64)}]",
                    _qlora_fwd_tiled_kernel,
                    _sig(_qlora_fwd_tiled_kernel, types, ce),
                    ce,
                    {"num_warps": warps, "num_stages": stages},
                )
            )
        bwd_rows = [(row, False) for row in _BWD_TABLE] + [
            (row, True) for row in _BWD_TABLE_INDEX64
        ]
        for (_max_m, r_pad, bm, bn, bk, warps, stages), index64 in bwd_rows:
            ce = {
                "BLOCKSIZE": 64,
                "DOUBLE_QUANT": double,
                "WEIGHT_FORMAT": fmt,
                "HAS_LORA": True,
                "HAS_DROPOUT": True,
                "BM": bm,
                "BN": bn,
                "BK": bk,
                "R_PAD": r_pad,
                "GROUP_M": _GROUP_M,
                "INDEX64": index64,
            }
            types = {**common, "dy_ptr": f"*{act}", "dx_ptr": f"*{act}", "dyb_ptr": "*fp32"}
            specs.append(
                AotSpec(
                    f"_qlora_bwd_input_kernel[{tag},BM{bm},BN{bn},BK{bk},R{r_pad}{_i64(index64)}]",
                    _qlora_bwd_input_kernel,
                    _sig(_qlora_bwd_input_kernel, types, ce),
                    ce,
                    {"num_warps": warps, "num_stages": stages},
                )
            )
        cfg = _SPLITK_CFG
        ce = {
            "BLOCKSIZE": 64,
            "DOUBLE_QUANT": double,
            "WEIGHT_FORMAT": fmt,
            "HAS_LORA": True,
            "HAS_DROPOUT": True,
            **{key: cfg[key] for key in ("BM", "BN", "BK", "RB")},
        }
        types = {**common, "x_ptr": f"*{act}", "ybuf_ptr": "*fp32", "xabuf_ptr": "*fp32"}
        specs.append(
            AotSpec(
                f"_qlora_fwd_splitk_kernel[{tag}]",
                _qlora_fwd_splitk_kernel,
                _sig(_qlora_fwd_splitk_kernel, types, ce),
                ce,
                {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
            )
        )
        if fmt:
            continue  # the epilogue reads no weight: its specs come from the 4-bit combos
        for r_pad in (64, 256):
            ce = {
                "HAS_LORA": True,
                "HAS_BIAS": True,
                "R_PAD": r_pad,
                **{k: v for k, v in _EPILOGUE_CFG.items() if k != "num_warps"},
            }
            types = {
                "ybuf_ptr": "*fp32",
                "xa_ptr": "*fp32",
                "b_ptr": f"*{lora}",
                "bias_ptr": f"*{act}",
                "y_ptr": f"*{act}",
            }
            specs.append(
                AotSpec(
                    f"_qlora_splitk_epilogue_kernel[{act},lora-{lora},R{r_pad}]",
                    _qlora_splitk_epilogue_kernel,
                    _sig(_qlora_splitk_epilogue_kernel, types, ce),
                    ce,
                    {"num_warps": _EPILOGUE_CFG["num_warps"]},
                )
            )
    # dA: L = dyb (fp32), R = x (act, with dropout); dB: L = dy (act), R = xa (fp32).
    opts = {"num_warps": _TN_CFG["num_warps"], "num_stages": _TN_CFG["num_stages"]}
    for act, index64 in ((act, i) for act in ("bf16", "fp16") for i in (False, True)):
        ce = {
            "HAS_DROPOUT": True,
            "INDEX64": index64,
            **{k: v for k, v in _TN_CFG.items() if k.startswith("B")},
        }
        for grad, lt, rt in (("dA", "fp32", act), ("dB", act, "fp32")):
            types = {"l_ptr": f"*{lt}", "r_ptr": f"*{rt}", "mask_ptr": "*u8", "out_ptr": "*fp32"}
            specs.append(
                AotSpec(
                    f"_lora_tn_grad_kernel[{grad},{act}{_i64(index64)}]",
                    _lora_tn_grad_kernel,
                    _sig(_lora_tn_grad_kernel, types, ce),
                    ce,
                    opts,
                )
            )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()

__all__ = ["AOT_SPECS", "lora_weight_grads", "qlora_backward_input", "qlora_forward"]
