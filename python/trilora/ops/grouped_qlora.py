"""The grouped QLoRA linear of MoE experts: each token group through its own expert.

For rows ``x`` ``[S, K]`` sorted by expert (expert ``e`` owns rows
``expert_ends[e-1]:expert_ends[e]``), expert ``e``'s weight ``W_e`` ``[N, K]`` and its LoRA
factors ``A_e`` ``[r, K]``, ``B_e`` ``[N, r]``::

    y[rows of e] = x_e @ W_e.T + scale * (x_e @ A_e.T) @ B_e.T

``W`` is an experts tensor: a :class:`trilora.moe.QuantizedExperts` (each expert's matrix
quantized on its own) or a plain float tensor ``[E, rows, cols]``. Each expert's matrix is
stored as the MoE parameter stores it: ``[N, K]``, or ``[K, N]`` when ``transposed``
(gpt-oss). The LoRA factors are PEFT's ``target_parameters`` factors of that parameter,
``lora_A.weight`` ``[r*E, K]`` viewed ``[E, r, K]`` and ``lora_B.weight`` ``[N, r*E]``
viewed ``[E, N, r]`` (:func:`peft_expert_factors`); gradients flow back through the views.

Memory: no full-size dequantized experts tensor and no full LoRA delta ``[E, N, K]`` ever
exist. On the Triton path (CUDA 4-bit experts, or ``trilora.config.backend == "triton"``)
each expert's weight is dequantized tile by tile inside the K loop
(``kernels/grouped_qlora.py``); on the torch path (CPU) one expert's matrix is dequantized
at a time, in forward and again in backward, and only ``x`` and ``x @ A.T`` are saved.
"""

from __future__ import annotations

from typing import Protocol

import torch

import trilora.ops.cpu_matmul as cpu_matmul
from trilora.config import use_triton

__all__ = ["ExpertsWeight", "grouped_lora_linear", "peft_expert_factors"]


class ExpertsWeight(Protocol):
    """A quantized experts tensor (:class:`trilora.moe.QuantizedExperts`)."""

    num_experts: int
    rows: int
    cols: int
    format_name: str

    def expert(self, e: int): ...


def peft_expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``ParamWrapper`` factors of one experts parameter, per expert (views).

    ``lora_a`` ``[r*E, K]`` -> ``[E, r, K]`` (expert ``e`` owns rows ``e*r:(e+1)*r``);
    ``lora_b`` ``[N, r*E]`` -> ``[E, N, r]`` (expert ``e`` owns columns ``e::E``), as
    ``peft.tuners.lora.layer.ParamWrapper.get_delta_weight`` reads them.
    """
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


def _bounds(expert_ends: torch.Tensor) -> list[tuple[int, int, int]]:
    # One host read of E integers: the groups' row ranges (empty experts skipped).
    ends = expert_ends.tolist()
    out, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            out.append((e, start, end))
        start = end
    return out


def _expert_matrix(weight, e: int, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """Expert ``e``'s weight as ``[N, K]`` (a transposed view when stored ``[K, N]``)."""
    if isinstance(weight, torch.Tensor):
        w = weight[e].to(dtype)
    else:
        w = weight.expert(e).dequantize(dtype)
    return w.t() if transposed else w


def _dense_factors(lora_a, lora_b, pdt):
    # PEFT's lora_B view [E, N, r] strides r by E (expert e owns columns e::E): a oneDNN
    # product with such a weight takes its reference path, 100x slower than a dense one.
    # One contiguous copy per call (E * N * r values, the size of the factor) avoids that.
    if lora_a is None:
        return None, None
    return lora_a.to(pdt).contiguous(), lora_b.to(pdt).contiguous()


def _forward_torch(x, bounds, weight, lora_a, lora_b, scale, transposed, n_out):
    pdt = cpu_matmul.product_dtype(x.dtype) if x.device.type == "cpu" else x.dtype
    y = x.new_empty(x.shape[0], n_out)
    xa = None if lora_a is None else x.new_zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
    a, b = _dense_factors(lora_a, lora_b, pdt)
    for e, lo, hi in bounds:
        xe = x[lo:hi].to(pdt)
        out = cpu_matmul.linear(xe, _expert_matrix(weight, e, pdt, transposed))
        if lora_a is not None:
            xa_e = cpu_matmul.linear(xe, a[e]).float()
            xa[lo:hi] = xa_e
            out.add_(cpu_matmul.linear(xa_e.to(pdt), b[e]), alpha=scale)
        y[lo:hi] = out
    # Rows past the last group (expert-parallel sentinels) are zeros, as in transformers.
    y[bounds[-1][2] if bounds else 0 :] = 0
    return y, xa


def _backward_torch(dy, x, xa, bounds, weight, lora_a, lora_b, scale, transposed, needs):
    pdt = cpu_matmul.product_dtype(dy.dtype) if dy.device.type == "cpu" else dy.dtype
    dx = torch.zeros_like(x) if needs[0] else None
    da = torch.zeros_like(lora_a, dtype=torch.float32) if needs[1] else None
    db = torch.zeros_like(lora_b, dtype=torch.float32) if needs[2] else None
    a, b = _dense_factors(lora_a, lora_b, pdt)
    for e, lo, hi in bounds:
        dye = dy[lo:hi].to(pdt)
        if lora_a is not None:
            # dy_e @ B_e: [m, r], shared by dx and dA
            dyb = cpu_matmul.matmul(dye, b[e]).float()
        if dx is not None:
            w = _expert_matrix(weight, e, pdt, transposed)
            dxe = cpu_matmul.matmul(dye, w)
            if lora_a is not None:
                dxe.add_(cpu_matmul.matmul(dyb.to(pdt), a[e]), alpha=scale)
            dx[lo:hi] = dxe
        if da is not None:
            da[e] = scale * cpu_matmul.matmul(dyb.t(), x[lo:hi].float())
        if db is not None:
            db[e] = scale * cpu_matmul.matmul(dye.float().t(), xa[lo:hi])
    return (
        dx,
        None if da is None else da.to(lora_a.dtype),
        None if db is None else db.to(lora_b.dtype),
    )


def _triton_ok(x: torch.Tensor, weight) -> bool:
    return use_triton(x) and not isinstance(weight, torch.Tensor) and weight.format_name == "4bit"


def _kernel_weight(weight):
    from trilora.kernels.grouped_qlora import Experts4bit

    buffers = dict(weight.named_buffers(recurse=False))
    return Experts4bit(
        packed=weight.weight.data.reshape(weight.num_experts, -1).view(torch.uint8),
        absmax=buffers["weight_absmax"],
        code=buffers["weight_quant_map"][0],
        nested_absmax=buffers.get("weight_nested_absmax"),
        nested_code=None
        if buffers.get("weight_nested_quant_map") is None
        else buffers["weight_nested_quant_map"][0],
        offset=buffers.get("weight_offset"),
        blocksize=int(weight.expert(0).blocksize),
        rows=weight.rows,
        cols=weight.cols,
    )


def _trainable_dense(x, expert_ends, weight, lora_a, lora_b, scale, transposed, n_out):
    # 16-bit experts being trained themselves: plain autograd, which keeps each expert's
    # weight for its own gradient anyway.
    pieces, covered = [], 0
    for e, lo, hi in _bounds(expert_ends):
        w = (weight[e].t() if transposed else weight[e]).to(x.dtype)
        y = x[lo:hi] @ w.t()
        if lora_a is not None:
            xa = x[lo:hi] @ lora_a[e].to(x.dtype).t()
            y = y + scale * (xa @ lora_b[e].to(x.dtype).t())
        pieces.append(y)
        covered = hi
    # Rows past the last group (expert-parallel sentinels) get zeros.
    pieces.append(x.new_zeros(x.shape[0] - covered, n_out))
    return torch.cat(pieces)


class _GroupedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_ends, lora_a, lora_b, weight, scale, transposed, n_out):
        ctx.weight, ctx.scale, ctx.transposed = weight, scale, transposed
        if _triton_ok(x, weight):
            from trilora.kernels import grouped_qlora as kernels

            y, xa = kernels.grouped_qlora_forward(
                x, expert_ends, _kernel_weight(weight), lora_a, lora_b, scale, transposed
            )
            ctx.bounds = None
        else:
            ctx.bounds = _bounds(expert_ends)
            y, xa = _forward_torch(x, ctx.bounds, weight, lora_a, lora_b, scale, transposed, n_out)
        ctx.save_for_backward(x, expert_ends, xa, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, expert_ends, xa, lora_a, lora_b = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        dy = dy.contiguous()
        if ctx.bounds is None:
            from trilora.kernels import grouped_qlora as kernels

            kw = _kernel_weight(ctx.weight)
            dx = da = db = None
            if needs[0]:
                dx = kernels.grouped_qlora_backward_input(
                    dy, expert_ends, kw, lora_a, lora_b, ctx.scale, ctx.transposed
                )
            if lora_a is not None and (needs[1] or needs[2]):
                da, db = kernels.grouped_lora_grads(
                    x, dy, xa, expert_ends, lora_a, lora_b, ctx.scale
                )
        else:
            dx, da, db = _backward_torch(
                dy, x, xa, ctx.bounds, ctx.weight, lora_a, lora_b, ctx.scale, ctx.transposed, needs
            )
        return dx, None, da, db, None, None, None, None


def grouped_lora_linear(
    x: torch.Tensor,
    expert_ends: torch.Tensor,
    weight: ExpertsWeight | torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Every expert's rows through its (quantized) weight and LoRA (see the module docstring).

    Args:
        x: ``[S, K]`` float, rows sorted by expert; the product runs in ``x.dtype``.
        expert_ends: int64 ``[E]``, cumulative end row of each expert's group.
        weight: :class:`trilora.moe.QuantizedExperts` or a float ``[E, rows, cols]`` tensor,
            expert matrices ``[N, K]`` (``[K, N]`` when ``transposed``).
        lora_a: ``[E, r, K]`` or None (no LoRA); ``lora_b``: ``[E, N, r]``.
        scale: the LoRA scale.
        transposed: the experts are stored ``[K, N]``.

    Returns:
        ``[S, N]`` in ``x.dtype``. A float ``weight`` that requires grad gets its gradient
        through plain autograd (full fine-tuning of 16-bit experts); quantized experts are
        frozen.
    """
    num_experts = weight.shape[0] if isinstance(weight, torch.Tensor) else weight.num_experts
    rows, cols = (
        tuple(weight.shape[1:]) if isinstance(weight, torch.Tensor) else (weight.rows, weight.cols)
    )
    n_out, k_in = (cols, rows) if transposed else (rows, cols)
    if x.dim() != 2 or x.shape[1] != k_in:
        raise ValueError(
            f"x must be [S, {k_in}] for experts ({num_experts}, {rows}, {cols}), got "
            f"{tuple(x.shape)}"
        )
    if expert_ends.shape != (num_experts,):
        raise ValueError(f"expert_ends must be [{num_experts}], got {tuple(expert_ends.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b go together")
    if lora_a is not None and (
        lora_a.shape[0] != num_experts
        or lora_a.shape[2] != k_in
        or lora_b.shape[:2] != (num_experts, n_out)
        or lora_b.shape[2] != lora_a.shape[1]
    ):
        raise ValueError(
            f"LoRA factors must be [E, r, {k_in}] and [E, {n_out}, r] for E={num_experts}, got "
            f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
        return _trainable_dense(x, expert_ends, weight, lora_a, lora_b, scale, transposed, n_out)
    return _GroupedLoraLinear.apply(
        x, expert_ends, lora_a, lora_b, weight, scale, transposed, n_out
    )
