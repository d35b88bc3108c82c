"""Grouped QLoRA for mixture-of-experts layers: E 4-bit expert weights + per-expert LoRA.

Tokens arrive sorted by expert: rows ``ends[e-1] .. ends[e]-1`` of ``x`` [S, K] belong to
expert ``e`` (``ends`` = ``expert_ends``, cumulative; empty groups allowed). Per group

Forward   y_e  = x_e @ W_e.T + s * (x_e @ A_e.T) @ B_e.T,   xa_e = x_e @ A_e.T  (fp32)
Backward  dx_e = dy_e @ W_e + s * (dy_e @ B_e) @ A_e
          dA_e = s * (dy_e @ B_e).T @ x_e,                    dB_e = s * dy_e.T @ xa_e

Each expert's weight is its own bitsandbytes 4-bit tensor (``Experts4bit``: blocks, the
double-quantization nesting and its offset restart at every expert), stored ``[N, K]``
(Qwen/Mixtral/OLMoE) or ``[K, N]`` (``transposed``, gpt-oss). As in ``qlora_linear.py`` the
kernels decode their W tile in registers right before ``tl.dot``: no dequantized expert exists.

Scheduling is the grouped-GEMM one: a tile table (int32 [slots, 3]: expert, first row, end
row) maps each program to one BM-row tile of one expert's group, so an empty expert costs
no program and no tile straddles two experts. The table is built on the device from
``expert_ends`` with a fixed number of slots, ``cdiv(S, BM) + min(E, S)`` (an upper bound of
the tiles any grouping needs), so no launcher reads ``expert_ends`` back to the host: no sync,
and CUDA-graph safe. Slots past the last tile hold expert -1 and their programs return at once.

All accumulation is fp32. Block configs follow the dense kernels' tables (same W-tile decode
cost and shared-memory limits, see ``qlora_linear.py``), checked by ``trilora kernels``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .common import INT32_OFFSET_LIMIT, dequant_gather, needs_int64, tile_rows
from .quantize import NESTED_BLOCKSIZE, VALID_BLOCKSIZES

GROUPED_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Experts4bit(NamedTuple):
    """E expert weights, each ``[rows, cols]`` row-major and 4-bit quantized on its own."""

    packed: torch.Tensor  # uint8 [E, (rows*cols+1)//2], contiguous; high nibble = even element
    absmax: torch.Tensor  # fp32 [E, nblocks] or uint8 [E, nblocks] when double-quantized
    code: torch.Tensor  # fp32 [16]
    nested_absmax: torch.Tensor | None  # fp32 [E, ceil(nblocks/256)]
    nested_code: torch.Tensor | None  # fp32 [256]
    offset: torch.Tensor | None  # fp32 [E]
    blocksize: int
    rows: int
    cols: int


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _expert_weight(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    offs_n,
    offs_k,
    mask,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """fp32 values of W_e[offs_n, offs_k] (broadcast index tensors); the pointers already point
    at expert e's tensors. Flat index n*K + k of a stored [N, K], k*N + n of a stored [K, N]."""
    if TRANSPOSED:
        idx = offs_k * N + offs_n
    else:
        idx = offs_n * K + offs_k
    return dequant_gather(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        nabs_ptr,
        ncode_ptr,
        offset_ptr,
        idx,
        mask,
        BLOCKSIZE,
        DOUBLE_QUANT,
    )


@triton.jit
def _grouped_qlora_fwd_kernel(
    x_ptr,
    tiles_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    xa_ptr,
    num_slots,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_we,
    stride_se,
    stride_ne,
    stride_ae,
    stride_ar,
    stride_ak,
    stride_be,
    stride_bn,
    stride_br,
    scale,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    R_PAD: tl.constexpr,
    GROUP_M: tl.constexpr,
    INDEX64: tl.constexpr,
):
    # GROUP_M consecutive programs share one N tile: table slots are expert-major, so
    # neighbouring programs mostly decode the same expert's W tile from L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_m = min(num_slots - first_m, GROUP_M)
    slot = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    expert = tl.load(tiles_ptr + slot * 3)
    if expert < 0:
        return
    row_end = tl.load(tiles_ptr + slot * 3 + 2)
    # int64 expert offsets: E * (bytes per expert) can pass 2^31 for a large layer.
    e64 = expert.to(tl.int64)
    packed_ptr += e64 * stride_we
    absmax_ptr += e64 * stride_se
    nabs_ptr += e64 * stride_ne
    offset_ptr += e64

    offs_m = tile_rows(tl.load(tiles_ptr + slot * 3 + 1), BM, INDEX64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, R_PAD)
    m_in = offs_m < row_end
    n_in = offs_n < N
    r_in = rr < R

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_xa = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + rk
        k_in = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_in[:, None] & k_in[None, :],
            other=0.0,
        )
        # W_e.T tile [BK, BN]
        w = _expert_weight(
            packed_ptr,
            absmax_ptr,
            code_ptr,
            nabs_ptr,
            ncode_ptr,
            offset_ptr,
            offs_n[None, :],
            offs_k[:, None],
            k_in[:, None] & n_in[None, :],
            N,
            K,
            BLOCKSIZE,
            DOUBLE_QUANT,
            TRANSPOSED,
        )
        acc = tl.dot(x, w.to(x.dtype), acc)
        if HAS_LORA:
            # x is in registers already: the down-projection costs no extra x traffic.
            a = tl.load(
                a_ptr + e64 * stride_ae + rr[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=k_in[:, None] & r_in[None, :],
                other=0.0,
            )
            acc_xa = tl.dot(x.to(a.dtype), a, acc_xa)

    if HAS_LORA:
        b = tl.load(
            b_ptr + e64 * stride_be + offs_n[None, :] * stride_bn + rr[:, None] * stride_br,
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
    tl.store(
        y_ptr + offs_m[:, None] * N + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_in[:, None] & n_in[None, :],
    )


@triton.jit
def _grouped_qlora_bwd_input_kernel(
    dy_ptr,
    tiles_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nabs_ptr,
    ncode_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    dx_ptr,
    num_slots,
    N,
    K,
    R,
    stride_gm,
    stride_gn,
    stride_we,
    stride_se,
    stride_ne,
    stride_ae,
    stride_ar,
    stride_ak,
    stride_be,
    stride_bn,
    stride_br,
    scale,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    R_PAD: tl.constexpr,
    GROUP_M: tl.constexpr,
    INDEX64: tl.constexpr,
):
    # Output tile dx[BM, BK] of one expert's rows; the reduction runs over N in BN steps.
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BK)
    width = GROUP_M * num_k
    first_m = (pid // width) * GROUP_M
    group_m = min(num_slots - first_m, GROUP_M)
    slot = first_m + (pid % width) % group_m
    pid_k = (pid % width) // group_m
    expert = tl.load(tiles_ptr + slot * 3)
    if expert < 0:
        return
    row_end = tl.load(tiles_ptr + slot * 3 + 2)
    e64 = expert.to(tl.int64)
    packed_ptr += e64 * stride_we
    absmax_ptr += e64 * stride_se
    nabs_ptr += e64 * stride_ne
    offset_ptr += e64

    offs_m = tile_rows(tl.load(tiles_ptr + slot * 3 + 1), BM, INDEX64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    rn = tl.arange(0, BN)
    rr = tl.arange(0, R_PAD)
    m_in = offs_m < row_end
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
        # W_e tile [BN, BK]
        w = _expert_weight(
            packed_ptr,
            absmax_ptr,
            code_ptr,
            nabs_ptr,
            ncode_ptr,
            offset_ptr,
            offs_n[:, None],
            offs_k[None, :],
            n_in[:, None] & k_in[None, :],
            N,
            K,
            BLOCKSIZE,
            DOUBLE_QUANT,
            TRANSPOSED,
        )
        acc = tl.dot(dy, w.to(dy.dtype), acc)
        if HAS_LORA:
            b = tl.load(
                b_ptr + e64 * stride_be + offs_n[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=n_in[:, None] & r_in[None, :],
                other=0.0,
            )
            acc_r = tl.dot(dy.to(b.dtype), b, acc_r)

    if HAS_LORA:
        a = tl.load(
            a_ptr + e64 * stride_ae + rr[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_in[:, None] & k_in[None, :],
            other=0.0,
        )
        acc += scale * tl.dot(acc_r.to(a.dtype), a)
    tl.store(
        dx_ptr + offs_m[:, None] * K + offs_k[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_in[:, None] & k_in[None, :],
    )


@triton.jit
def _grouped_lora_down_kernel(
    in_ptr,
    tiles_ptr,
    f_ptr,
    out_ptr,
    P,
    R,
    stride_im,
    stride_ip,
    stride_fe,
    stride_fp,
    stride_fr,
    BM: tl.constexpr,
    BP: tl.constexpr,
    R_PAD: tl.constexpr,
    INDEX64: tl.constexpr,
):
    # out[rows of e, R] = in[rows of e, P] @ F_e[P, R] in fp32: dy_e @ B_e for dA.
    slot = tl.program_id(0)
    expert = tl.load(tiles_ptr + slot * 3)
    if expert < 0:
        return
    row_end = tl.load(tiles_ptr + slot * 3 + 2)
    offs_m = tile_rows(tl.load(tiles_ptr + slot * 3 + 1), BM, INDEX64)
    f_ptr += expert.to(tl.int64) * stride_fe
    rp = tl.arange(0, BP)
    rr = tl.arange(0, R_PAD)
    m_in = offs_m < row_end
    r_in = rr < R
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for p0 in range(0, P, BP):
        offs_p = p0 + rp
        p_in = offs_p < P
        v = tl.load(
            in_ptr + offs_m[:, None] * stride_im + offs_p[None, :] * stride_ip,
            mask=m_in[:, None] & p_in[None, :],
            other=0.0,
        )
        f = tl.load(
            f_ptr + offs_p[:, None] * stride_fp + rr[None, :] * stride_fr,
            mask=p_in[:, None] & r_in[None, :],
            other=0.0,
        )
        acc = tl.dot(v.to(f.dtype), f, acc)
    tl.store(out_ptr + offs_m[:, None] * R + rr[None, :], acc, mask=m_in[:, None] & r_in[None, :])


@triton.jit
def _grouped_lora_tn_grad_kernel(
    l_ptr,
    r_ptr,
    tiles_ptr,
    out_ptr,
    P,
    Q,
    stride_lm,
    stride_lp,
    stride_rm,
    stride_rq,
    scale,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BMR: tl.constexpr,
    INDEX64: tl.constexpr,
):
    # out[e, P, Q] += s * L[rows].T @ R[rows] for one table slot's rows of expert e (fp32
    # atomics across the slots of one expert). dA: L = dyb, R = x; dB: L = dy, R = xa.
    # Operands reach tl.dot in fp32 (tf32 on the GPU), as in the dense LoRA grads.
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    expert = tl.load(tiles_ptr + slot * 3)
    if expert < 0:
        return
    row0 = tl.load(tiles_ptr + slot * 3 + 1)
    row_end = tl.load(tiles_ptr + slot * 3 + 2)
    num_q = tl.cdiv(Q, BQ)
    offs_p = (pid // num_q) * BP + tl.arange(0, BP)
    offs_q = (pid % num_q) * BQ + tl.arange(0, BQ)
    p_in = offs_p < P
    q_in = offs_q < Q
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m0 in range(row0, row_end, BMR):
        offs_m = tile_rows(m0, BMR, INDEX64)
        m_in = offs_m < row_end
        lt = tl.load(
            l_ptr + offs_p[:, None] * stride_lp + offs_m[None, :] * stride_lm,
            mask=p_in[:, None] & m_in[None, :],
            other=0.0,
        ).to(tl.float32)
        rt = tl.load(
            r_ptr + offs_m[:, None] * stride_rm + offs_q[None, :] * stride_rq,
            mask=m_in[:, None] & q_in[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(lt, rt, acc)
    tl.atomic_add(
        out_ptr + expert.to(tl.int64) * P * Q + offs_p[:, None] * Q + offs_q[None, :],
        acc * scale,
        mask=p_in[:, None] & q_in[None, :],
        sem="relaxed",
    )


# --------------------------------------------------------------------------------------------
# Block-config tables
# --------------------------------------------------------------------------------------------

# Forward and input backward: the dense kernels' tiles (qlora_linear.py explains them: the W
# tile's gathers, staged scales and the [BM, R_PAD] fp32 LoRA accumulator set the limits).
# MoE groups are 10s to 1000s of rows, in the dense tables' compute-bound class; the
# split-K decode kernel has no grouped twin (a decode step's groups are a row or two per expert,
# where the tiled kernel wastes BM - rows of each x tile but still streams each W once).
# fp32 activations double the x/dy tiles and their smem stages: their own rows.
_FWD_TABLE = (
    # (max_r_pad, BM, BN, BK, warps, stages)
    (128, 64, 64, 32, 8, 3),
    (256, 32, 32, 32, 8, 2),
)
# fp32, r = 256: BK = 32 spilled 8-24 B on sm_90 (the fp32 [BK, R_PAD] A tile).
_FWD_TABLE_FP32 = (
    (128, 64, 64, 32, 8, 2),
    (256, 32, 32, 16, 8, 2),
)
_BWD_TABLE = (
    (64, 128, 32, 32, 8, 3),
    (128, 64, 32, 64, 8, 3),
    (256, 64, 16, 32, 8, 2),
)
_BWD_TABLE_INDEX64 = (
    (64, 128, 32, 32, 8, 3),
    (128, 64, 32, 32, 8, 3),
    (256, 32, 16, 32, 8, 2),
)
_BWD_TABLE_FP32 = (
    (64, 64, 32, 32, 8, 2),
    (128, 64, 32, 32, 8, 2),
    (256, 32, 16, 32, 8, 2),
)
_GROUP_M = 8

# dy @ B (for dA): [BM, R_PAD] fp32 accumulator over P = N in BP steps; no W decode.
# Row = (max R_PAD, BM, BP, warps): the [BP, R_PAD] factor tile and the [BM, R_PAD]
# accumulator set the registers (at r = 256, BP 64 spilled 144 B on sm_80 with fp16 and BP 32
# spilled 112 B with fp32 operands; BP 16 keeps every dtype under 128 registers).
_DOWN_STAGES = 3
_DOWN_TABLE = ((64, 64, 64, 4), (256, 32, 16, 8))
# LoRA grads: the dense TN tiles; each table slot reduces GRAD_ROWS rows of one expert and
# adds its [BP, BQ] tile atomically, so the atomics per output tile are ~rows/GRAD_ROWS + 1.
_TN_CFG = {"BP": 64, "BQ": 64, "BMR": 32, "num_warps": 4, "num_stages": 3}
_GRAD_ROWS = 256


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _pick(table, r_pad: int):
    for max_r, *cfg in table:
        if r_pad <= max_r:
            return cfg
    raise AssertionError("unreachable: tables cover r_pad <= 256")


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def check_experts(w: Experts4bit, device: torch.device | None = None) -> bool:
    """Validate ``w``; returns True when it is double-quantized. Raises ValueError."""
    if not isinstance(w, Experts4bit):
        raise ValueError(f"expected an Experts4bit, got {type(w).__name__}")
    if w.blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {w.blocksize}")
    if w.code.dtype != torch.float32 or w.code.numel() != 16:
        raise ValueError(f"code must be fp32 [16], got {w.code.dtype} with {w.code.numel()}")
    if w.rows <= 0 or w.cols <= 0:
        raise ValueError(f"expert shape must be positive, got [{w.rows}, {w.cols}]")
    n = w.rows * w.cols
    if n >= INT32_OFFSET_LIMIT:
        raise ValueError(f"each expert must have fewer than 2**31 elements, got {n}")
    if w.packed.dim() != 2 or w.packed.shape[0] < 1:
        raise ValueError(f"packed must be [E, (rows*cols+1)//2], got {list(w.packed.shape)}")
    e = w.packed.shape[0]
    if w.packed.dtype != torch.uint8 or tuple(w.packed.shape) != (e, (n + 1) // 2):
        raise ValueError(
            f"packed must be uint8 [E, (rows*cols+1)//2 = {(n + 1) // 2}], "
            f"got {w.packed.dtype} {list(w.packed.shape)}"
        )
    nblocks = triton.cdiv(n, w.blocksize)
    if tuple(w.absmax.shape) != (e, nblocks):
        raise ValueError(f"absmax must be [E={e}, {nblocks}], got {list(w.absmax.shape)}")
    tensors = [w.packed, w.absmax, w.code]
    if w.absmax.dtype == torch.uint8:
        if w.nested_absmax is None or w.nested_code is None or w.offset is None:
            raise ValueError(
                "uint8 absmax (double quantization) needs nested_absmax, nested_code and offset"
            )
        n2 = triton.cdiv(nblocks, NESTED_BLOCKSIZE)
        if w.nested_absmax.dtype != torch.float32 or tuple(w.nested_absmax.shape) != (e, n2):
            raise ValueError(
                f"nested_absmax must be fp32 [E={e}, {n2}], got {w.nested_absmax.dtype} "
                f"{list(w.nested_absmax.shape)}"
            )
        if w.nested_code.dtype != torch.float32 or w.nested_code.numel() != 256:
            raise ValueError(f"nested_code must be fp32 [256], got {w.nested_code.dtype}")
        if w.offset.dtype != torch.float32 or tuple(w.offset.shape) != (e,):
            raise ValueError(f"offset must be fp32 [E={e}], got {w.offset.dtype}")
        tensors += [w.nested_absmax, w.nested_code, w.offset]
        double = True
    elif w.absmax.dtype == torch.float32:
        double = False
    else:
        raise ValueError(f"absmax must be fp32 or uint8 (double-quantized), got {w.absmax.dtype}")
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the tensors of Experts4bit must be contiguous")
        if t.device != (device if device is not None else w.packed.device):
            raise ValueError(f"expert tensors must be on {device}, got one on {t.device}")
    return double


def _weight_args(w: Experts4bit, double: bool) -> tuple:
    """Pointer arguments, then the per-expert strides of packed, absmax and nested_absmax.
    Unused nested pointers get ``absmax`` as a placeholder (DOUBLE_QUANT=False never reads them)."""
    if double:
        ptrs = (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset)
        return ptrs, (w.packed.stride(0), w.absmax.stride(0), w.nested_absmax.stride(0))
    ptrs = (w.packed, w.absmax, w.code, w.absmax, w.absmax, w.absmax)
    return ptrs, (w.packed.stride(0), w.absmax.stride(0), 0)


def _logical_shape(w: Experts4bit, transposed: bool) -> tuple[int, int]:
    """(N, K) of the logical W_e [N, K] (out x in)."""
    return (w.cols, w.rows) if transposed else (w.rows, w.cols)


def _check_act(name: str, t: torch.Tensor, cols: int) -> None:
    if t.dtype not in GROUPED_ACT_DTYPES:
        raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must be [S, {cols}], got {list(t.shape)}")
    if t.shape[0] >= INT32_OFFSET_LIMIT:
        raise ValueError(f"{name} must have fewer than 2**31 rows, got {t.shape[0]}")


def _check_ends(expert_ends: torch.Tensor, e: int, device: torch.device) -> None:
    if expert_ends.dtype != torch.int64 or tuple(expert_ends.shape) != (e,):
        raise ValueError(
            f"expert_ends must be int64 [E={e}], got {expert_ends.dtype} {list(expert_ends.shape)}"
        )
    if expert_ends.device != device:
        raise ValueError(f"expert_ends must be on {device}, got {expert_ends.device}")


def _check_lora(lora_a, lora_b, e: int, n: int, k: int, act_dtype, device) -> int:
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must both be given or both be None")
    if lora_a is None:
        return 0
    if lora_a.dim() != 3 or lora_a.shape[0] != e or lora_a.shape[2] != k:
        raise ValueError(f"lora_a must be [E={e}, r, K={k}], got {list(lora_a.shape)}")
    r = lora_a.shape[1]
    if not 1 <= r <= 256:
        raise ValueError(f"LoRA rank must be in 1..256, got {r}")
    if tuple(lora_b.shape) != (e, n, r):
        raise ValueError(f"lora_b must be [E={e}, N={n}, r={r}], got {list(lora_b.shape)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in (torch.float32, act_dtype):
            raise ValueError(f"{name} must be fp32 or {act_dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    return r


def expert_tile_table(expert_ends: torch.Tensor, rows: int, block: int) -> torch.Tensor:
    """The tile table of a grouped launch, built on ``expert_ends``' device without a sync.

    Args:
        expert_ends: int64 [E], cumulative end row of each expert's group.
        rows: S, the number of rows of the grouped tensor.
        block: rows per tile.

    Returns:
        int32 [cdiv(S, block) + min(E, S), 3]: (expert, first row, end row) of each tile, the
        tiles of expert 0 first; slots past the last tile are (-1, 0, 0). Ends are clamped to
        [0, S] and made non-decreasing first, so a bad ``expert_ends`` cannot send a kernel
        outside ``x``: rows it leaves to no group are not written.
    """
    e = expert_ends.numel()
    ends = torch.cummax(expert_ends.clamp(0, rows), 0).values
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block - 1) // block
    tile_end = torch.cumsum(tiles, 0)
    slots = triton.cdiv(rows, block) + min(e, rows)
    t = torch.arange(slots, device=ends.device)
    expert = torch.searchsorted(tile_end, t, right=True)
    valid = expert < e
    ex = expert.clamp(max=e - 1)
    first = starts[ex] + (t - (tile_end[ex] - tiles[ex])) * block
    end = torch.minimum(first + block, ends[ex])
    table = torch.stack([expert, first, end], 1)
    return torch.where(valid[:, None], table, table.new_tensor([-1, 0, 0])).to(torch.int32)


def grouped_qlora_forward(
    x: torch.Tensor,
    expert_ends: torch.Tensor,
    w: Experts4bit,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped fused QLoRA forward over E experts.

    Args:
        x: [S, K] fp16/bf16/fp32, any strides, rows sorted by expert.
        expert_ends: int64 [E], cumulative end row of each expert's group (expert e owns rows
            ``expert_ends[e-1] .. expert_ends[e]-1``; empty groups allowed; the last should be
            S: rows past it are left unwritten). Read on the device only (no host sync).
        w: the E expert weights; W_e [N, K] is stored [N, K], or [K, N] when ``transposed``.
        lora_a: [E, r, K] and lora_b: [E, N, r], fp32 or x.dtype, any strides, r in 1..256;
            both None for no LoRA.
        scale: LoRA scale s.
        transposed: the experts are stored [K, N] (gpt-oss layout).

    Returns:
        ``(y, xa)``: y [S, N] in x.dtype = x_e @ W_e.T + s * (x_e @ A_e.T) @ B_e.T per group,
        and xa = x_e @ A_e.T as fp32 [S, r] (None without LoRA).
    """
    double = check_experts(w, x.device)
    e = w.packed.shape[0]
    n, k = _logical_shape(w, transposed)
    _check_act("x", x, k)
    _check_ends(expert_ends, e, x.device)
    r = _check_lora(lora_a, lora_b, e, n, k, x.dtype, x.device)
    s = x.shape[0]
    has_lora = r > 0
    y = torch.empty((s, n), dtype=x.dtype, device=x.device)
    xa = torch.empty((s, r), dtype=torch.float32, device=x.device) if has_lora else None
    if s == 0:
        return y, xa
    r_pad = _r_pad(max(r, 1))
    a = lora_a if has_lora else x  # placeholders: HAS_LORA=False never dereferences them
    b = lora_b if has_lora else x
    a_strides = a.stride() if has_lora else (0, 0, 0)
    b_strides = b.stride() if has_lora else (0, 0, 0)
    bm, bn, bk, warps, stages = _pick(
        _FWD_TABLE_FP32 if x.dtype == torch.float32 else _FWD_TABLE, r_pad
    )
    tiles = expert_tile_table(expert_ends, s, bm)
    num_slots = tiles.shape[0]
    ptrs, w_strides = _weight_args(w, double)
    _grouped_qlora_fwd_kernel[(num_slots * triton.cdiv(n, bn),)](
        x,
        tiles,
        *ptrs,
        a,
        b,
        y,
        xa if has_lora else y,
        num_slots,
        n,
        k,
        r,
        x.stride(0),
        x.stride(1),
        *w_strides,
        *a_strides,
        *b_strides,
        float(scale),
        BLOCKSIZE=w.blocksize,
        DOUBLE_QUANT=double,
        TRANSPOSED=bool(transposed),
        HAS_LORA=has_lora,
        BM=bm,
        BN=bn,
        BK=bk,
        R_PAD=r_pad,
        GROUP_M=_GROUP_M,
        INDEX64=needs_int64(x, y),
        num_warps=warps,
        num_stages=stages,
    )
    return y, xa


def grouped_qlora_backward_input(
    dy: torch.Tensor,
    expert_ends: torch.Tensor,
    w: Experts4bit,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    transposed: bool,
) -> torch.Tensor:
    """Input gradient of the grouped QLoRA forward.

    Args:
        dy: [S, N] fp16/bf16/fp32, any strides, rows grouped as in the forward.
        expert_ends, w, lora_a, lora_b, scale, transposed: as in ``grouped_qlora_forward``
            (the factors fp32 or dy.dtype).

    Returns:
        dx [S, K] in dy.dtype = dy_e @ W_e + s * (dy_e @ B_e) @ A_e per group, W_e decoded
        tile by tile inside the reduction over N.
    """
    double = check_experts(w, dy.device)
    e = w.packed.shape[0]
    n, k = _logical_shape(w, transposed)
    _check_act("dy", dy, n)
    _check_ends(expert_ends, e, dy.device)
    r = _check_lora(lora_a, lora_b, e, n, k, dy.dtype, dy.device)
    s = dy.shape[0]
    dx = torch.empty((s, k), dtype=dy.dtype, device=dy.device)
    if s == 0:
        return dx
    has_lora = r > 0
    r_pad = _r_pad(max(r, 1))
    a = lora_a if has_lora else dy
    b = lora_b if has_lora else dy
    a_strides = a.stride() if has_lora else (0, 0, 0)
    b_strides = b.stride() if has_lora else (0, 0, 0)
    index64 = needs_int64(dy, dx)
    if dy.dtype == torch.float32:
        table = _BWD_TABLE_FP32
    else:
        table = _BWD_TABLE_INDEX64 if index64 else _BWD_TABLE
    bm, bn, bk, warps, stages = _pick(table, r_pad)
    tiles = expert_tile_table(expert_ends, s, bm)
    num_slots = tiles.shape[0]
    ptrs, w_strides = _weight_args(w, double)
    _grouped_qlora_bwd_input_kernel[(num_slots * triton.cdiv(k, bk),)](
        dy,
        tiles,
        *ptrs,
        a,
        b,
        dx,
        num_slots,
        n,
        k,
        r,
        dy.stride(0),
        dy.stride(1),
        *w_strides,
        *a_strides,
        *b_strides,
        float(scale),
        BLOCKSIZE=w.blocksize,
        DOUBLE_QUANT=double,
        TRANSPOSED=bool(transposed),
        HAS_LORA=has_lora,
        BM=bm,
        BN=bn,
        BK=bk,
        R_PAD=r_pad,
        GROUP_M=_GROUP_M,
        INDEX64=index64,
        num_warps=warps,
        num_stages=stages,
    )
    return dx


def _grouped_tn_grad(lhs, rhs, expert_ends, e: int, scale: float) -> torch.Tensor:
    """fp32 [E, P, Q] = s * lhs_e.T @ rhs_e per group (lhs [S, P], rhs [S, Q])."""
    s, p = lhs.shape
    q = rhs.shape[1]
    cfg = _TN_CFG
    out = torch.zeros((e, p, q), dtype=torch.float32, device=lhs.device)
    tiles = expert_tile_table(expert_ends, s, _GRAD_ROWS)
    pq_tiles = triton.cdiv(p, cfg["BP"]) * triton.cdiv(q, cfg["BQ"])
    _grouped_lora_tn_grad_kernel[(pq_tiles, tiles.shape[0])](
        lhs,
        rhs,
        tiles,
        out,
        p,
        q,
        lhs.stride(0),
        lhs.stride(1),
        rhs.stride(0),
        rhs.stride(1),
        float(scale),
        BP=cfg["BP"],
        BQ=cfg["BQ"],
        BMR=cfg["BMR"],
        INDEX64=needs_int64(lhs, rhs),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def grouped_lora_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    xa: torch.Tensor,
    expert_ends: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factor gradients of every expert, reduced over its rows.

    Split over rows with fp32 atomics: not bitwise deterministic. An empty expert gets zeros.

    Args:
        x: [S, K] fp16/bf16/fp32; dy: [S, N] in x.dtype; xa: fp32 [S, r] (the forward's second
            output); expert_ends: int64 [E] as in the forward; lora_a [E, r, K] and lora_b
            [E, N, r], fp32 or x.dtype, any strides.
        scale: LoRA scale s.

    Returns:
        ``(dA, dB)``: dA [E, r, K] in lora_a.dtype = s * (dy_e @ B_e).T @ x_e and dB [E, N, r]
        in lora_b.dtype = s * dy_e.T @ xa_e, accumulated in fp32.
    """
    if lora_a is None or lora_b is None:
        raise ValueError("grouped_lora_grads needs lora_a and lora_b")
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a must be [E, r, K], got {list(lora_a.shape)}")
    e, r, k = lora_a.shape
    if lora_b.dim() != 3:
        raise ValueError(f"lora_b must be [E, N, r], got {list(lora_b.shape)}")
    n = lora_b.shape[1]
    _check_act("x", x, k)
    s = x.shape[0]
    _check_act("dy", dy, n)
    if dy.shape[0] != s or dy.dtype != x.dtype:
        raise ValueError(f"dy must be [S={s}, N={n}] in {x.dtype}, got {dy.dtype} {list(dy.shape)}")
    _check_ends(expert_ends, e, x.device)
    _check_lora(lora_a, lora_b, e, n, k, x.dtype, x.device)
    if xa.dtype != torch.float32 or tuple(xa.shape) != (s, r) or xa.device != x.device:
        raise ValueError(f"xa must be fp32 [S={s}, r={r}], got {xa.dtype} {list(xa.shape)}")
    if s == 0:
        return torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    r_pad = _r_pad(r)
    bm, bp, warps = _pick(_DOWN_TABLE, r_pad)
    dyb = torch.empty((s, r), dtype=torch.float32, device=x.device)
    tiles = expert_tile_table(expert_ends, s, bm)
    _grouped_lora_down_kernel[(tiles.shape[0],)](
        dy,
        tiles,
        lora_b,
        dyb,
        n,
        r,
        dy.stride(0),
        dy.stride(1),
        *lora_b.stride(),
        BM=bm,
        BP=bp,
        R_PAD=r_pad,
        INDEX64=needs_int64(dy),
        num_warps=warps,
        num_stages=_DOWN_STAGES,
    )
    grad_a = _grouped_tn_grad(dyb, x, expert_ends, e, scale)
    grad_b = _grouped_tn_grad(dy, xa, expert_ends, e, scale)
    return grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)


# --------------------------------------------------------------------------------------------
# Ahead-of-time specs
# --------------------------------------------------------------------------------------------
# Compiled with LoRA on (the superset of the code), each table row at its largest R_PAD.
# (activation, LoRA factor, double-quantized, TRANSPOSED): every value of every flag, not the
# full product (~1.7 s of CPU per compile and arch); the flags change load, convert and index
# code, not tile shapes. The 64-bit (INDEX64) variants are compiled for the register-heaviest
# combo of each activation width: fp32 factors, double quantization, transposed.
_COMBOS = (
    ("bf16", "bf16", True, False),
    ("fp16", "fp16", False, True),
    ("bf16", "fp32", True, True),
)
_COMBOS_I64 = (("bf16", "fp32", True, True),)
_COMBOS_FP32 = (("fp32", "fp32", True, True), ("fp32", "fp32", False, False))
_COMBOS_FP32_I64 = (("fp32", "fp32", True, True),)

_PTR_TYPES = {
    "tiles_ptr": "*i32",
    "packed_ptr": "*u8",
    "code_ptr": "*fp32",
    "nabs_ptr": "*fp32",
    "ncode_ptr": "*fp32",
    "offset_ptr": "*fp32",
}


def _sig(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in _PTR_TYPES:
            sig[name] = _PTR_TYPES[name]
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _matmul_specs(fn, table, combos, index64: bool, io: tuple[str, str]) -> list[AotSpec]:
    """Specs of the forward (io = x, y) or input backward (io = dy, dx) for each row and combo."""
    specs = []
    for act, lora, double, transposed in combos:
        tag = f"{act},lora-{lora},{'dq' if double else 'fp32abs'}{',T' if transposed else ''}"
        types = {
            "absmax_ptr": "*u8" if double else "*fp32",
            "a_ptr": f"*{lora}",
            "b_ptr": f"*{lora}",
            io[0]: f"*{act}",
            io[1]: f"*{act}",
            "xa_ptr": "*fp32",
        }
        for r_pad, bm, bn, bk, warps, stages in table:
            ce = {
                "BLOCKSIZE": 64,
                "DOUBLE_QUANT": double,
                "TRANSPOSED": transposed,
                "HAS_LORA": True,
                "BM": bm,
                "BN": bn,
                "BK": bk,
                "R_PAD": r_pad,
                "GROUP_M": _GROUP_M,
                "INDEX64": index64,
            }
            i64 = ",i64" if index64 else ""
            specs.append(
                AotSpec(
                    f"{fn.__name__}[{tag},BM{bm},BN{bn},BK{bk},R{r_pad}{i64}]",
                    fn,
                    _sig(fn, types, ce),
                    ce,
                    {"num_warps": warps, "num_stages": stages},
                )
            )
    return specs


def _aot_specs() -> list[AotSpec]:
    fwd, bwd = _grouped_qlora_fwd_kernel, _grouped_qlora_bwd_input_kernel
    specs = []
    for index64, combos, combos_fp32 in (
        (False, _COMBOS, _COMBOS_FP32),
        (True, _COMBOS_I64, _COMBOS_FP32_I64),
    ):
        specs += _matmul_specs(fwd, _FWD_TABLE, combos, index64, ("x_ptr", "y_ptr"))
        specs += _matmul_specs(fwd, _FWD_TABLE_FP32, combos_fp32, index64, ("x_ptr", "y_ptr"))
        bwd_table = _BWD_TABLE_INDEX64 if index64 else _BWD_TABLE
        specs += _matmul_specs(bwd, bwd_table, combos, index64, ("dy_ptr", "dx_ptr"))
        specs += _matmul_specs(bwd, _BWD_TABLE_FP32, combos_fp32, index64, ("dy_ptr", "dx_ptr"))
    for act, lora, index64 in (
        ("bf16", "fp32", True),
        ("fp16", "fp16", False),
        ("fp32", "fp32", False),
    ):
        for r_pad, bm, bp, warps in _DOWN_TABLE:
            ce = {"BM": bm, "BP": bp, "R_PAD": r_pad, "INDEX64": index64}
            types = {"in_ptr": f"*{act}", "f_ptr": f"*{lora}", "out_ptr": "*fp32"}
            fn = _grouped_lora_down_kernel
            specs.append(
                AotSpec(
                    f"{fn.__name__}[{act},lora-{lora},BM{bm},R{r_pad}{',i64' if index64 else ''}]",
                    fn,
                    _sig(fn, types, ce),
                    ce,
                    {"num_warps": warps, "num_stages": _DOWN_STAGES},
                )
            )
    # dA: L = dyb (fp32), R = x (act); dB: L = dy (act), R = xa (fp32).
    opts = {"num_warps": _TN_CFG["num_warps"], "num_stages": _TN_CFG["num_stages"]}
    for act, index64 in (("bf16", True), ("fp16", False), ("fp32", False)):
        ce = {"INDEX64": index64, **{k: v for k, v in _TN_CFG.items() if k.startswith("B")}}
        for grad, lt, rt in (("dA", "fp32", act), ("dB", act, "fp32")):
            fn = _grouped_lora_tn_grad_kernel
            types = {"l_ptr": f"*{lt}", "r_ptr": f"*{rt}", "out_ptr": "*fp32"}
            specs.append(
                AotSpec(
                    f"{fn.__name__}[{grad},{act}{',i64' if index64 else ''}]",
                    fn,
                    _sig(fn, types, ce),
                    ce,
                    opts,
                )
            )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()

__all__ = [
    "AOT_SPECS",
    "GROUPED_ACT_DTYPES",
    "Experts4bit",
    "check_experts",
    "expert_tile_table",
    "grouped_lora_grads",
    "grouped_qlora_backward_input",
    "grouped_qlora_forward",
]
