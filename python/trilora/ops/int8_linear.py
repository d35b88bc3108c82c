"""bitsandbytes 8-bit weights: quantize, dequantize and the fused int8 LoRA linear.

``W`` ``[N, K]`` is int8 ``codes`` with one fp32 absmax per row (``scb``, bitsandbytes'
``SCB``); its value is ``(codes * scb[n]) * (1/127)`` in fp32, cast once to the compute
dtype. The linear is weight-only: activations stay in their dtype (bitsandbytes'
``Linear8bitLt`` quantizes them to int8 too; see docs/int8.md for the measured difference).

Two custom ops carry the LoRA linear, with the same math and dispatch as the 4-bit
``trilora::qlora_linear_*`` (:mod:`trilora.ops.qlora_linear`, whose format-independent
bodies they call):

* ``trilora::int8_lora_linear_fwd(x, codes, scb, lora_a, lora_b, scale, bias,
  dropout_mask, dropout_scale) -> (y, xa)``;
* ``trilora::int8_lora_linear_bwd`` -> ``(dx, dA, dB)``.

CUDA (or the Triton interpreter) with ``M <= config.fused_max_tokens`` runs the shared
fused kernels with the int8 gather (split-K for ``M <= 16``, the decode path); larger ``M``
dequantizes into a transient buffer for cuBLAS; the CPU dequantizes in one native pass
(``csrc/cpu/int8_linear.cpp``, torch without the extension) into a per-thread scratch buffer
and calls oneDNN (:mod:`trilora.ops.cpu_matmul`), and a forward of at most 8 rows (decode,
sampling) multiplies straight from the int8 codes (:func:`small_m_product`).
"""

from __future__ import annotations

import torch

from trilora.config import use_triton
from trilora.native import cpu_ext
from trilora.ops.qlora_linear import (
    check_qlora_inputs,
    dropout_keep_mask,
    eager_cpu,
    lora_linear_backward,
    lora_linear_forward,
    named_grads,
)
from trilora.ops.quantize import scratch_buffer, small_m_serves

_INV_127 = 7.874015718698502e-3  # bitsandbytes' 1/127 (int8_vectorwise_dequant)
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' row-wise int8 quantizer (``int8_vectorwise_quant`` on the fp16 weight,
    threshold 0): ``(codes int8 [N, K], scb fp32 [N])``. An all-zero row gets SCB 0 and
    codes 0 (bitsandbytes would divide by zero)."""
    w16 = weight.to(torch.float16)
    scb = w16.abs().amax(dim=1).float()
    factor = 127.0 / torch.where(scb == 0, torch.ones_like(scb), scb)
    codes = torch.round(w16 * factor.unsqueeze(1)).to(torch.int8)
    return codes, scb


def dequantize_int8_impl(
    codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype, scratch: bool = False
) -> torch.Tensor:
    """``[N, K]`` in ``dtype``: ``(codes * scb) * (1/127)`` in fp32, then one cast; float64
    is the exact ``codes * scb / 127``. On the CPU the native extension writes it in one pass
    (the same bits as the torch path). ``scratch=True`` (CPU): the result may be a view of a
    per-thread buffer that the next such call overwrites."""
    if dtype == torch.float64:
        return codes.double() * scb.double().unsqueeze(1) / 127
    cpu = codes.device.type == "cpu" and codes.dim() == 2
    native = cpu and dtype in _NATIVE_DTYPES and codes.is_contiguous() and scb.is_contiguous()
    if native and cpu_ext.load() is not None:
        shape = tuple(codes.shape)
        if scratch:
            out = scratch_buffer(codes.numel(), dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype)
        cpu_ext.dequantize_int8_into(out, codes, scb)
        return out
    if scratch and cpu:
        out32 = scratch_buffer(codes.numel(), torch.float32).view(tuple(codes.shape))
        torch.mul(codes, scb.unsqueeze(1), out=out32).mul_(_INV_127)
        if dtype == torch.float32:
            return out32
        out = scratch_buffer(codes.numel(), dtype).view(tuple(codes.shape))
        return out.copy_(out32)
    return (codes * scb.unsqueeze(1) * _INV_127).to(dtype)


def small_m_product(x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor | None:
    """``x @ W.T`` in fp32 ``[M, N]`` for a CPU ``x`` ``[M, K]`` of a few rows (decode,
    sampling), read straight from the codes by the native extension; ``None`` where it does
    not serve the call (more rows, no extension, not a plain CPU tensor).

    At M <= 8 the product is bound by reading the weight: 1 byte per weight here against 9
    for dequantize (1 read, 4 written) + GEMM (4 read back)."""
    if not (small_m_serves(x) and codes.is_contiguous() and scb.is_contiguous()):
        return None
    return cpu_ext.int8_small_m_linear(x.float().contiguous(), codes, scb)


@torch.library.custom_op("trilora::dequantize_int8", mutates_args=())
def dequantize_int8(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize int8 ``codes`` ``[N, K]`` with row absmax ``scb`` fp32 ``[N]`` to ``dtype``
    (fp32/fp16/bf16; fp64 exact, for references)."""
    return dequantize_int8_impl(codes, scb, dtype)


@dequantize_int8.register_fake
def _(codes, scb, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


def kernel_weight_int8(codes: torch.Tensor, scb: torch.Tensor):
    """The ``trilora.kernels.int8.Weight8bit`` the Triton launchers take."""
    from trilora.kernels.int8 import Weight8bit

    return Weight8bit(codes.contiguous(), scb, codes.shape[0], codes.shape[1])


# ---------------------------------------------------------------------------------------
# the fused LoRA linear
# ---------------------------------------------------------------------------------------


def _forward(
    x: torch.Tensor,
    codes: torch.Tensor,
    scb: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D ``x`` ``[M, K]``: ``(y [M, N] in x.dtype, xa [M, r] fp32)``."""
    return lora_linear_forward(
        x,
        lambda: kernel_weight_int8(codes, scb),
        lambda dtype: dequantize_int8_impl(codes, scb, dtype, scratch=True),
        lora_a,
        lora_b,
        scale,
        bias,
        dropout_mask,
        dropout_scale,
        small_m=lambda rows: small_m_product(rows, codes, scb),
    )


int8_lora_linear_fwd = torch.library.custom_op(
    "trilora::int8_lora_linear_fwd", _forward, mutates_args=()
)


@int8_lora_linear_fwd.register_fake
def _(x, codes, scb, lora_a, lora_b, scale, bias, dropout_mask, dropout_scale):
    r = 0 if lora_a is None else lora_a.shape[0]
    n_out = codes.shape[0]
    return x.new_empty((x.shape[0], n_out)), x.new_empty((x.shape[0], r), dtype=torch.float32)


def _backward_compute(
    dy: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    scb: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    xa: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
    needs_input_grad: bool,
    needs_lora_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx [M, K] x.dtype, dA [r, K] fp32, dB [N, r] fp32)``; unneeded ones empty."""
    return lora_linear_backward(
        dy,
        x,
        lambda: kernel_weight_int8(codes, scb),
        lambda dtype: dequantize_int8_impl(codes, scb, dtype, scratch=True),
        lora_a,
        lora_b,
        xa,
        scale,
        dropout_mask,
        dropout_scale,
        needs_input_grad,
        needs_lora_grad,
    )


int8_lora_linear_bwd = torch.library.custom_op(
    "trilora::int8_lora_linear_bwd", _backward_compute, mutates_args=()
)


@int8_lora_linear_bwd.register_fake
def _(
    dy,
    x,
    codes,
    scb,
    lora_a,
    lora_b,
    xa,
    scale,
    dropout_mask,
    dropout_scale,
    needs_input_grad,
    needs_lora_grad,
):
    dx = x.new_empty(x.shape) if needs_input_grad else x.new_empty((0,))
    if lora_a is None or not needs_lora_grad:
        return dx, x.new_empty((0,)), x.new_empty((0,))
    r, f32 = lora_a.shape[0], torch.float32
    return dx, x.new_empty((r, x.shape[1]), dtype=f32), x.new_empty((dy.shape[1], r), dtype=f32)


FORWARD_INPUTS = (
    "x",
    "codes",
    "scb",
    "lora_a",
    "lora_b",
    "scale",
    "bias",
    "dropout_mask",
    "dropout_scale",
)


def _setup_context(ctx, inputs, output):
    named = dict(zip(FORWARD_INPUTS, inputs))
    ctx.scale, ctx.dropout_scale = named["scale"], named["dropout_scale"]
    ctx.has_lora, ctx.has_bias = named["lora_a"] is not None, named["bias"] is not None
    # As for the 4-bit op: the weight and the factors are module state, outside the
    # saved-tensor hooks; only activations are saved.
    ctx.weight_state = {k: named[k] for k in ("codes", "scb", "lora_a", "lora_b")}
    ctx.save_for_backward(named["x"], output[1], named["dropout_mask"])


def _backward(ctx, dy, _dxa, compute=int8_lora_linear_bwd):
    x, xa, dropout_mask = ctx.saved_tensors
    w = ctx.weight_state
    needs = dict(zip(FORWARD_INPUTS, ctx.needs_input_grad))
    needs_lora = ctx.has_lora and (needs["lora_a"] or needs["lora_b"])
    dx, da, db = compute(
        dy.contiguous(),
        x,
        w["codes"],
        w["scb"],
        w["lora_a"],
        w["lora_b"],
        xa,
        ctx.scale,
        dropout_mask,
        ctx.dropout_scale,
        needs["x"],
        needs_lora,
    )
    grads = {
        "x": dx if needs["x"] else None,
        "lora_a": da.to(w["lora_a"].dtype) if needs_lora and needs["lora_a"] else None,
        "lora_b": db.to(w["lora_b"].dtype) if needs_lora and needs["lora_b"] else None,
        "bias": dy.sum(0) if ctx.has_bias and needs["bias"] else None,
    }
    return named_grads(grads, FORWARD_INPUTS)


int8_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerCPU(torch.autograd.Function):
    """The two ops without the custom-op dispatch, for plain eager CPU calls (as the 4-bit
    op does; anything that traces keeps the custom ops)."""

    @staticmethod
    def forward(ctx, *args):
        output = _forward(*args)
        _setup_context(ctx, args, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, dy, dxa):
        return _backward(ctx, dy, dxa, compute=_backward_compute)


def int8_lora_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scb: torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + scale * (drop(x) @ lora_a.T) @ lora_b.T + bias`` with ``W`` the int8
    weight ``codes`` ``[N, K]`` / ``scb`` ``[N]``.

    Args as :func:`trilora.ops.qlora_linear.qlora_linear` (``x`` ``[..., K]``, ``lora_a``
    ``[r, K]``, ``lora_b`` ``[N, r]``, ``bias`` ``[N]``). Returns ``[..., N]`` in ``x.dtype``.
    """
    weight = _Shape(codes)
    check_qlora_inputs(x, weight, lora_a, lora_b, bias, dropout_p, dropout_mask, kind="int8")
    if codes.dtype != torch.int8 or scb.dtype != torch.float32 or scb.shape != codes.shape[:1]:
        raise TypeError(
            f"int8 weight needs int8 codes [N, K] and fp32 scb [N], got {codes.dtype} "
            f"{tuple(codes.shape)} and {scb.dtype} {tuple(scb.shape)}"
        )
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    mask, dropout_scale = dropout_keep_mask(x2, lora_a, dropout_p, training, dropout_mask)
    op = _EagerCPU.apply if eager_cpu(x2) and not use_triton(x2) else int8_lora_linear_fwd
    y, _ = op(x2, codes, scb, lora_a, lora_b, float(scale), bias, mask, dropout_scale)
    return y.reshape(*lead, codes.shape[0])


class _Shape:
    """The shape/device view :func:`check_qlora_inputs` reads."""

    def __init__(self, codes: torch.Tensor) -> None:
        self.shape, self.device = codes.shape, codes.device
