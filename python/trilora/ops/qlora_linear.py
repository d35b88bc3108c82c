"""The fused QLoRA linear: ``y = x @ W.T + s * (drop(x) @ A.T) @ B.T + bias``.

``W`` ``[N, K]`` is a 4-bit :class:`~trilora.quant.QuantizedWeight`, ``A`` ``[r, K]`` and
``B`` ``[N, r]`` are the LoRA factors, ``s`` the LoRA scale and ``drop`` inverted dropout
with a keep-mask. Two custom ops carry the computation:

* ``trilora::qlora_linear_fwd`` returns ``y`` and ``xa = drop(x) @ A.T`` (fp32
  ``[M, r]``, kept for ``dB``);
* ``trilora::qlora_linear_bwd`` returns ``dx``, ``dA``, ``dB`` and ``dbias``.

Only ``x``, the dropout keep-mask, ``xa`` and the *packed* weight are saved for backward;
the dequantized weight never outlives one call (bitsandbytes keeps no copy either, but
materializes a full-size temporary in every backward; our fused path does not).

Dispatch, per call:

* CUDA (or ``trilora.config.backend == "triton"``) with ``M <= config.fused_max_tokens``:
  the fused Triton kernels, which dequantize ``W`` tile by tile inside the matmul's K loop
  and accumulate the LoRA down-projection in the same loop (``x`` and ``dy`` are read
  once). ``M <= 16`` uses a split-K kernel.
* CUDA forward with ``M <= config.decode_gemv_max_tokens`` (decode) and no dropout: the
  CUDA extension's 4-bit GEMV (:mod:`trilora.native.gemv`) when it builds, else as above.
* CUDA with larger ``M``: dequantize into a transient buffer and call cuBLAS, which wins
  when the GEMM is compute-bound (see :mod:`trilora.config` for the crossover model).
* Anything else (CPU): the torch reference below, which is also what tests compare with;
  a forward of at most 8 rows (decode, sampling) multiplies straight from the packed codes
  through the native extension (:func:`trilora.ops.quantize.small_m_product_4bit`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

import trilora.ops.cpu_matmul as cpu_matmul
from trilora.config import config, use_triton
from trilora.ops.quantize import dequantize_4bit_impl, kernel_weight, small_m_product_4bit

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dropped(x: torch.Tensor, mask: torch.Tensor | None, dropout_scale: float) -> torch.Tensor:
    return x if mask is None else x * mask.to(x.dtype) * dropout_scale


def _use_fused(x: torch.Tensor) -> bool:
    return use_triton(x) and x.shape[0] <= config.fused_max_tokens


def _empty_lora(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], 0), dtype=torch.float32)


def _no_grad(x: torch.Tensor) -> torch.Tensor:
    # A fresh tensor per unneeded gradient: a custom op's outputs may not alias each other.
    return x.new_empty((0,))


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


def _forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    n_out: int,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the QLoRA linear on 2-D ``x`` ``[M, K]``; returns ``(y [M, N], xa [M, r])``."""
    k = x.shape[1]
    if (
        x.is_cuda
        and config.backend == "auto"
        and dropout_mask is None
        and x.shape[0] <= config.decode_gemv_max_tokens
    ):
        # Decode: the CUDA extension's GEMV when it builds (see trilora.config).
        from trilora.native.gemv import decode_gemv_4bit

        out = decode_gemv_4bit(
            x,
            packed,
            absmax,
            code,
            nested_absmax,
            nested_code,
            offset,
            blocksize,
            n_out,
            lora_a,
            lora_b,
            scale,
            bias,
        )
        if out is not None:
            return out
    return lora_linear_forward(
        x,
        lambda: kernel_weight(
            packed, absmax, code, nested_absmax, nested_code, offset, blocksize, [n_out, k]
        ),
        lambda dtype: dequantize_4bit_impl(
            packed,
            absmax,
            code,
            nested_absmax,
            nested_code,
            offset,
            blocksize,
            [n_out, k],
            dtype,
            scratch=True,
        ),
        lora_a,
        lora_b,
        scale,
        bias,
        dropout_mask,
        dropout_scale,
        small_m=lambda rows: small_m_product_4bit(
            rows, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n_out
        ),
    )


def lora_linear_forward(
    x: torch.Tensor,
    kernel_args: Callable[[], Any],
    dequantize: Callable[[torch.dtype], torch.Tensor],
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
    small_m: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The format-independent forward on 2-D ``x`` ``[M, K]``: ``(y [M, N], xa [M, r])``.

    ``kernel_args()`` gives the weight tuple the fused Triton launchers take (any format
    they know: ``Weight4bit``, ``Weight8bit``); ``dequantize(dtype)`` gives the ``[N, K]``
    weight in ``dtype``, possibly in a per-thread scratch buffer (used and dropped at once);
    ``small_m(x)``, where the format has one, gives ``x @ W.T`` in fp32 for a CPU call it
    serves without a dequantized weight (few rows), else ``None``.
    """
    if _use_fused(x):
        from trilora.kernels.qlora_linear import qlora_forward

        y, xa = qlora_forward(
            x, kernel_args(), lora_a, lora_b, scale, bias, dropout_mask, dropout_scale
        )
        return y, (xa if xa is not None else _empty_lora(x))
    # The dequantized weight lives in a reused per-thread buffer (no page faults), consumed
    # by the GEMM before anything else dequantizes. It is dequantized straight into the
    # product dtype (fp32 for bf16 activations on a CPU without bf16 matrix units), and y
    # then stays in that dtype until the bias and the LoRA term are in: one rounding.
    y = small_m(x) if small_m is not None else None
    if y is None:
        weight = dequantize(cpu_matmul.product_dtype(x.dtype))
        y = cpu_matmul.linear(x, weight)
        del weight
    if bias is not None:
        y += bias.to(y.dtype)
    if lora_a is None:
        return y.to(x.dtype), _empty_lora(x)
    # PEFT runs the LoRA branch in the factors' dtype (fp32 after
    # prepare_model_for_kbit_training) and adds it in the activation dtype; so do we.
    xa = _dropped(x, dropout_mask, dropout_scale).to(lora_a.dtype) @ lora_a.t()
    if xa.dtype == lora_b.dtype == y.dtype:
        # y += scale * xa @ B.T inside the GEMM: no [M, N] LoRA product, scaled copy or sum.
        y.addmm_(xa, lora_b.t(), alpha=scale)
    else:
        y = y + (scale * (xa @ lora_b.t())).to(y.dtype)
    return y.to(x.dtype), xa.float()


qlora_linear_fwd = torch.library.custom_op("trilora::qlora_linear_fwd", _forward, mutates_args=())


@qlora_linear_fwd.register_fake
def _(
    x,
    packed,
    absmax,
    code,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    n_out,
    lora_a,
    lora_b,
    scale,
    bias,
    dropout_mask,
    dropout_scale,
):
    r = 0 if lora_a is None else lora_a.shape[0]
    return x.new_empty((x.shape[0], n_out)), x.new_empty((x.shape[0], r), dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------


def _backward_compute(
    dy: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    xa: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
    needs_input_grad: bool,
    needs_lora_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`qlora_linear_fwd` for 2-D ``dy`` ``[M, N]``.

    Returns ``(dx [M, K] in x.dtype, dA [r, K] fp32, dB [N, r] fp32)``; a gradient that is
    not needed comes back as an empty tensor.
    """
    n_out, k = dy.shape[1], x.shape[1]
    return lora_linear_backward(
        dy,
        x,
        lambda: kernel_weight(
            packed, absmax, code, nested_absmax, nested_code, offset, blocksize, [n_out, k]
        ),
        lambda dtype: dequantize_4bit_impl(
            packed,
            absmax,
            code,
            nested_absmax,
            nested_code,
            offset,
            blocksize,
            [n_out, k],
            dtype,
            scratch=True,
        ),
        lora_a,
        lora_b,
        xa,
        scale,
        dropout_mask,
        dropout_scale,
        needs_input_grad,
        needs_lora_grad,
    )


def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    kernel_args: Callable[[], Any],
    dequantize: Callable[[torch.dtype], torch.Tensor],
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    xa: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
    needs_input_grad: bool,
    needs_lora_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The format-independent backward (see :func:`lora_linear_forward` for the weight
    callables): ``(dx [M, K] in x.dtype, dA [r, K] fp32, dB [N, r] fp32)``, an unneeded
    gradient as an empty tensor."""
    has_lora = lora_a is not None
    if use_triton(dy):
        from trilora.kernels.qlora_linear import lora_weight_grads, qlora_backward_input

        dyb = None
        dx = _no_grad(x)
        if needs_input_grad and dy.shape[0] <= config.fused_max_tokens:
            dx, dyb = qlora_backward_input(
                dy, kernel_args(), lora_a, lora_b, scale, dropout_mask, dropout_scale
            )
        elif needs_input_grad:
            weight = dequantize(dy.dtype)
            dx = dy @ weight
            del weight
            if has_lora:
                dyb = dy.float() @ lora_b.float()
                dx += (scale * _dropped(dyb @ lora_a.float(), dropout_mask, dropout_scale)).to(
                    dx.dtype
                )
        if not (has_lora and needs_lora_grad):
            return dx.to(x.dtype), _no_grad(x), _no_grad(x)
        if dyb is None:
            dyb = dy.float() @ lora_b.float()
        da, db = lora_weight_grads(x, dy, xa, dyb, scale, dropout_mask, dropout_scale)
        return dx.to(x.dtype) if needs_input_grad else dx, da, db

    # The torch path (CPU): one dequantization, the LoRA terms folded into GEMMs with their
    # scale, and [M, r]-sized temporaries only (bitsandbytes + PEFT also scale and sum
    # [M, N] and [M, K] tensors here).
    # dx stays in the product dtype (see the forward) until the LoRA term is in.
    dx = _no_grad(x)
    if needs_input_grad:
        weight = dequantize(cpu_matmul.product_dtype(dy.dtype))
        dx = cpu_matmul.matmul(dy, weight)
        del weight
    if not has_lora:
        return dx.to(x.dtype), _no_grad(x), _no_grad(x)
    dy_lora = dy.to(lora_b.dtype)
    dyb = dy_lora @ lora_b
    if needs_input_grad:
        if dropout_mask is None and dx.dtype == dyb.dtype == lora_a.dtype:
            dx.addmm_(dyb, lora_a, alpha=scale)
        else:
            dx_lora = _dropped(dyb @ lora_a, dropout_mask, dropout_scale)
            dx = dx + (scale * dx_lora).to(dx.dtype)
        dx = dx.to(x.dtype)
    if not needs_lora_grad:
        return dx, _no_grad(x), _no_grad(x)
    x_dropped = _dropped(x, dropout_mask, dropout_scale).to(lora_a.dtype)
    da = torch.mm(dyb.t(), x_dropped).mul_(scale)
    db = torch.mm(dy_lora.t(), xa.to(lora_b.dtype)).mul_(scale)
    return dx, da.float(), db.float()


qlora_linear_bwd = torch.library.custom_op(
    "trilora::qlora_linear_bwd", _backward_compute, mutates_args=()
)


@qlora_linear_bwd.register_fake
def _(
    dy,
    x,
    packed,
    absmax,
    code,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    lora_a,
    lora_b,
    xa,
    scale,
    dropout_mask,
    dropout_scale,
    needs_input_grad,
    needs_lora_grad,
):
    dx = x.new_empty(x.shape) if needs_input_grad else _no_grad(x)
    if lora_a is None or not needs_lora_grad:
        return dx, _no_grad(x), _no_grad(x)
    r = lora_a.shape[0]
    f32 = torch.float32
    return dx, x.new_empty((r, x.shape[1]), dtype=f32), x.new_empty((dy.shape[1], r), dtype=f32)


# ---------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    (
        x,
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        _n_out,
        lora_a,
        lora_b,
        scale,
        bias,
        dropout_mask,
        dropout_scale,
    ) = inputs
    _, xa = output
    ctx.blocksize, ctx.scale, ctx.dropout_scale = blocksize, scale, dropout_scale
    ctx.has_lora, ctx.has_bias = lora_a is not None, bias is not None
    # Only the activations go through save_for_backward. The weight state and the LoRA
    # factors are module parameters and buffers that outlive the step; passing them through
    # the saved-tensor hooks of gradient checkpointing (a pack and an unpack per tensor, per
    # call, in the forward and again in the recompute) costs time and saves nothing.
    ctx.weight_state = (packed, absmax, code, nested_absmax, nested_code, offset, lora_a, lora_b)
    ctx.save_for_backward(x, xa, dropout_mask)


# The forward op's inputs by name, in schema order: the backward reads which gradients
# autograd needs by name, and returns them by name.
FORWARD_INPUTS = tuple(inspect.signature(_forward).parameters)


def named_grads(grads: dict[str, torch.Tensor | None], names: tuple[str, ...]) -> tuple:
    """``grads`` (input name -> gradient) as the positional tuple autograd expects for an op
    whose inputs are ``names``; unnamed inputs get None."""
    unknown = set(grads) - set(names)
    if unknown:
        raise AssertionError(f"gradients for inputs the op does not have: {sorted(unknown)}")
    return tuple(grads.get(name) for name in names)


def _backward(ctx, dy, _dxa, compute=qlora_linear_bwd):
    x, xa, dropout_mask = ctx.saved_tensors
    packed, absmax, code, nested_absmax, nested_code, offset, lora_a, lora_b = ctx.weight_state
    needs = dict(zip(FORWARD_INPUTS, ctx.needs_input_grad))
    needs_lora = ctx.has_lora and (needs["lora_a"] or needs["lora_b"])
    dx, da, db = compute(
        dy.contiguous(),
        x,
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        ctx.blocksize,
        lora_a,
        lora_b,
        xa,
        ctx.scale,
        dropout_mask,
        ctx.dropout_scale,
        needs["x"],
        needs_lora,
    )
    grads = {
        "x": dx if needs["x"] else None,
        "lora_a": da.to(lora_a.dtype) if needs_lora and needs["lora_a"] else None,
        "lora_b": db.to(lora_b.dtype) if needs_lora and needs["lora_b"] else None,
        "bias": dy.sum(0) if ctx.has_bias and needs["bias"] else None,
    }
    return named_grads(grads, FORWARD_INPUTS)


qlora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerCPU(torch.autograd.Function):
    """The two custom ops' forward and backward, called without the custom-op dispatch.

    A custom op's Python dispatch (autograd wrapper, schema defaults, alias checks) costs
    about 65 us per forward and 30 us per backward: a few percent of a CPU training step of
    a small model, where a layer's GEMMs take a millisecond. Plain eager calls on CPU tensors
    take this Function instead; anything that traces (FakeTensorMode and ``trilora mem``, the
    meta device, ``torch.compile``, any other TorchDispatchMode) keeps the custom ops, so
    what it sees is unchanged. Same functions, same values.
    """

    @staticmethod
    def forward(ctx, *args):
        # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips
        # binding the arguments to a signature (inspect.signature on every call).
        output = _forward(*args)
        _setup_context(ctx, args, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, dy, dxa):
        return _backward(ctx, dy, dxa, compute=_backward_compute)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_cpu(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or type(x) not in _PLAIN or use_triton(x):
        return False
    try:
        if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False
        # No torch.func transform, and no TorchDispatchMode (FakeTensorMode, MemTracker, ...)
        # may be active: they must see the custom op. Without these (private) probes, stay
        # on the custom op.
        return torch._C._len_torch_dispatch_stack() == 0
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------


def qlora_linear(
    x: torch.Tensor,
    weight,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """QLoRA linear: ``x @ W.T + scale * (drop(x) @ lora_a.T) @ lora_b.T + bias``.

    Args:
        x: ``[..., K]`` activations, fp16/bf16 (fp32 on the torch path). Any strides.
        weight: :class:`~trilora.quant.QuantizedWeight` of shape ``[N, K]``.
        lora_a: ``[r, K]`` LoRA down-projection (fp32 or the activation dtype), or None.
        lora_b: ``[N, r]`` LoRA up-projection, same dtype as ``lora_a``, or None.
        scale: LoRA scale (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).
        bias: ``[N]`` base-layer bias, or None.
        dropout_p: dropout probability on the LoRA branch's input.
        training: apply dropout (only when ``dropout_p > 0``).
        dropout_mask: an explicit keep-mask ``[..., K]`` (bool), used instead of drawing one;
            the kept values are scaled by ``1 / (1 - dropout_p)``.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    check_qlora_inputs(x, weight, lora_a, lora_b, bias, dropout_p, dropout_mask)
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    n_out = weight.shape[0]
    mask, dropout_scale = dropout_keep_mask(x2, lora_a, dropout_p, training, dropout_mask)
    op = _EagerCPU.apply if _eager_cpu(x2) else qlora_linear_fwd
    y, _ = op(
        x2,
        weight.packed,
        weight.absmax,
        weight.code,
        weight.nested_absmax,
        weight.nested_code,
        weight.offset,
        weight.blocksize,
        n_out,
        lora_a,
        lora_b,
        float(scale),
        bias,
        mask,
        dropout_scale,
    )
    return y.reshape(*lead, n_out)


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may skip the custom-op dispatch (plain eager CPU tensors, no
    tracing or dispatch mode active); the other formats' ops share the rule."""
    return _eager_cpu(x)


def dropout_keep_mask(
    x2: torch.Tensor,
    lora_a: torch.Tensor | None,
    dropout_p: float,
    training: bool,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, float]:
    """The bool keep-mask ``[M, K]`` for the LoRA branch of 2-D ``x2`` (drawn, or
    ``dropout_mask`` reshaped) and its scale ``1 / (1 - p)``; ``(None, 1.0)`` without dropout."""
    if lora_a is None or not (dropout_mask is not None or (training and dropout_p > 0)):
        return None, 1.0
    k = x2.shape[1]
    if dropout_mask is None:
        return torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p), 1.0 / (
            1.0 - dropout_p
        )
    return dropout_mask.reshape(-1, k).to(torch.bool), 1.0 / (1.0 - dropout_p)


def check_qlora_inputs(
    x, weight, lora_a, lora_b, bias, dropout_p, dropout_mask, kind: str = "4-bit"
) -> None:
    """Validate the arguments of a quantized LoRA linear (``kind`` names the format in errors)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features]")
    if len(weight.shape) != 2:
        raise ValueError(
            f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}"
        )
    n_out, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, weight expects {k}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the {kind} weight is on {weight.device}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_a.shape[1] != k:
            raise ValueError(f"lora_a must be [r, {k}], got {tuple(lora_a.shape)}")
        r = lora_a.shape[0]
        if lora_b.dim() != 2 or tuple(lora_b.shape) != (n_out, r):
            raise ValueError(f"lora_b must be [{n_out}, {r}], got {tuple(lora_b.shape)}")
        if lora_a.dtype != lora_b.dtype or lora_a.dtype not in _ACT_DTYPES:
            raise TypeError(
                f"lora_a and lora_b must share a float dtype, got {lora_a.dtype} and {lora_b.dtype}"
            )
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must be [{n_out}], got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(
            f"dropout_mask must have x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}"
        )
