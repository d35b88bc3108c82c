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

Two custom ops carry it, ``trilora::grouped_lora_fwd`` (``y`` and ``xa = x @ A.T``) and
``trilora::grouped_lora_bwd`` (``dx``, ``dA``, ``dB``), with fake implementations
(FakeTensorMode, meta). The experts tensor reaches them as its stacked tensors
(:meth:`ExpertsWeight.grouped_operands`). On the CPU the per-expert products stay on BLAS
(``cpu_matmul.linear(..., onednn=False)``): the row count of every group changes each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

import trilora.ops.cpu_matmul as cpu_matmul
from trilora.config import use_triton
from trilora.ops.int8_linear import dequantize_int8
from trilora.ops.quantize import dequantize_4bit

__all__ = ["ExpertsWeight", "grouped_lora_linear", "peft_expert_factors"]


class ExpertsWeight(Protocol):
    """A quantized experts tensor (:class:`trilora.moe.QuantizedExperts`)."""

    num_experts: int
    rows: int
    cols: int

    def grouped_operands(self) -> tuple[str, list[torch.Tensor | None], int]:
        """``(kind, tensors, blocksize)``: ``"4bit"`` with ``[codes, absmax, quant_map,
        nested_absmax, nested_quant_map, offset]`` (each ``[E, ...]``, the nested ones None
        without double quantization), or ``"int8"`` with ``[codes, SCB]``."""
        ...


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


@dataclass(frozen=True)
class _Operands:
    """An experts tensor as the custom ops take it: ``kind`` ("dense", "4bit", "int8"),
    its stacked tensors, the 4-bit blocksize and each expert's stored ``[rows, cols]``."""

    kind: str
    tensors: list
    blocksize: int
    rows: int
    cols: int


def _operands(weight) -> _Operands:
    if isinstance(weight, torch.Tensor):
        return _Operands("dense", [weight], 0, weight.shape[1], weight.shape[2])
    kind, tensors, blocksize = weight.grouped_operands()
    if kind not in ("4bit", "int8"):
        raise ValueError(f"grouped_lora_linear has no path for {kind!r} experts")
    return _Operands(kind, list(tensors), blocksize, weight.rows, weight.cols)


def _bounds(expert_ends: torch.Tensor) -> list[tuple[int, int, int]]:
    # One host read of E integers: the groups' row ranges (empty experts skipped).
    ends = expert_ends.tolist()
    out, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            out.append((e, start, end))
        start = end
    return out


def _expert_matrix(w: _Operands, e: int, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """Expert ``e``'s weight as ``[N, K]`` (a transposed view when stored ``[K, N]``)."""
    t = w.tensors
    if w.kind == "dense":
        m = t[0][e].to(dtype)
    elif w.kind == "4bit":
        pick = [None if v is None else v[e] for v in t]
        m = dequantize_4bit(*pick, w.blocksize, [w.rows, w.cols], dtype)
    else:
        m = dequantize_int8(t[0][e], t[1][e], dtype)
    return m.t() if transposed else m


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
        out = cpu_matmul.linear(xe, _expert_matrix(weight, e, pdt, transposed), onednn=False)
        if lora_a is not None:
            xa_e = cpu_matmul.linear(xe, a[e], onednn=False).float()
            xa[lo:hi] = xa_e
            out.add_(cpu_matmul.linear(xa_e.to(pdt), b[e], onednn=False), alpha=scale)
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
            dyb = cpu_matmul.matmul(dye, b[e], onednn=False).float()
        if dx is not None:
            w = _expert_matrix(weight, e, pdt, transposed)
            dxe = cpu_matmul.matmul(dye, w, onednn=False)
            if lora_a is not None:
                dxe.add_(cpu_matmul.matmul(dyb.to(pdt), a[e], onednn=False), alpha=scale)
            dx[lo:hi] = dxe
        if da is not None:
            da[e] = scale * cpu_matmul.matmul(dyb.t(), x[lo:hi].float(), onednn=False)
        if db is not None:
            db[e] = scale * cpu_matmul.matmul(dye.float().t(), xa[lo:hi], onednn=False)
    return (
        dx,
        None if da is None else da.to(lora_a.dtype),
        None if db is None else db.to(lora_b.dtype),
    )


def _triton_ok(x: torch.Tensor, w: _Operands) -> bool:
    return use_triton(x) and w.kind == "4bit"


def _kernel_weight(w: _Operands):
    from trilora.kernels.grouped_qlora import Experts4bit

    packed, absmax, code, nested_absmax, nested_code, offset = w.tensors
    experts = packed.shape[0]
    return Experts4bit(
        packed=packed.reshape(experts, -1).view(torch.uint8),
        absmax=absmax,
        code=code[0],
        nested_absmax=nested_absmax,
        nested_code=None if nested_code is None else nested_code[0],
        offset=offset,
        blocksize=w.blocksize,
        rows=w.rows,
        cols=w.cols,
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


def _forward(
    x: torch.Tensor,
    expert_ends: torch.Tensor,
    weight: list[torch.Tensor | None],
    kind: str,
    blocksize: int,
    rows: int,
    cols: int,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    w = _Operands(kind, weight, blocksize, rows, cols)
    n_out = cols if transposed else rows
    if _triton_ok(x, w):
        from trilora.kernels import grouped_qlora as kernels

        y, xa = kernels.grouped_qlora_forward(
            x, expert_ends, _kernel_weight(w), lora_a, lora_b, scale, transposed
        )
    else:
        y, xa = _forward_torch(x, _bounds(expert_ends), w, lora_a, lora_b, scale, transposed, n_out)
    # custom ops return tensors: no LoRA gives an empty [S, 0] xa
    return y, x.new_empty(x.shape[0], 0, dtype=torch.float32) if xa is None else xa


grouped_lora_fwd = torch.library.custom_op("trilora::grouped_lora_fwd", _forward, mutates_args=())


@grouped_lora_fwd.register_fake
def _(x, expert_ends, weight, kind, blocksize, rows, cols, lora_a, lora_b, scale, transposed):
    r = 0 if lora_a is None else lora_a.shape[1]
    y = x.new_empty(x.shape[0], cols if transposed else rows)
    return y, x.new_empty(x.shape[0], r, dtype=torch.float32)


def _backward_compute(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    expert_ends: torch.Tensor,
    weight: list[torch.Tensor | None],
    kind: str,
    blocksize: int,
    rows: int,
    cols: int,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    transposed: bool,
    needs_dx: bool,
    needs_lora: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = _Operands(kind, weight, blocksize, rows, cols)
    dy = dy.contiguous()
    has_lora = lora_a is not None
    if _triton_ok(dy, w):
        from trilora.kernels import grouped_qlora as kernels

        kw = _kernel_weight(w)
        dx = da = db = None
        if needs_dx:
            dx = kernels.grouped_qlora_backward_input(
                dy, expert_ends, kw, lora_a, lora_b, scale, transposed
            )
        if has_lora and needs_lora:
            da, db = kernels.grouped_lora_grads(x, dy, xa, expert_ends, lora_a, lora_b, scale)
    else:
        needs = (needs_dx, has_lora and needs_lora, has_lora and needs_lora)
        dx, da, db = _backward_torch(
            dy, x, xa, _bounds(expert_ends), w, lora_a, lora_b, scale, transposed, needs
        )
    empty = x.new_empty(0)
    return (
        empty if dx is None else dx,
        empty if da is None else da,
        empty if db is None else db,
    )


grouped_lora_bwd = torch.library.custom_op(
    "trilora::grouped_lora_bwd", _backward_compute, mutates_args=()
)


@grouped_lora_bwd.register_fake
def _(
    dy,
    x,
    xa,
    expert_ends,
    weight,
    kind,
    blocksize,
    rows,
    cols,
    lora_a,
    lora_b,
    scale,
    transposed,
    needs_dx,
    needs_lora,
):
    empty = x.new_empty(0)
    lora = lora_a is not None and needs_lora
    return (
        torch.empty_like(x) if needs_dx else empty,
        torch.empty_like(lora_a) if lora else empty,
        torch.empty_like(lora_b) if lora else empty,
    )


def _setup_context(ctx, inputs, output):
    x, expert_ends, weight, kind, blocksize, rows, cols, lora_a, lora_b, scale, transposed = inputs
    ctx.meta = (kind, blocksize, rows, cols, scale, transposed)
    ctx.present = [t is not None for t in weight]
    ctx.has_lora = lora_a is not None
    ctx.save_for_backward(
        x, expert_ends, output[1], lora_a, lora_b, *(t for t in weight if t is not None)
    )


def _autograd_backward(ctx, dy, _dxa):
    x, expert_ends, xa, lora_a, lora_b, *present = ctx.saved_tensors
    it = iter(present)
    weight = [next(it) if p else None for p in ctx.present]
    kind, blocksize, rows, cols, scale, transposed = ctx.meta
    needs_dx = ctx.needs_input_grad[0]
    needs_lora = ctx.has_lora and (ctx.needs_input_grad[7] or ctx.needs_input_grad[8])
    dx, da, db = grouped_lora_bwd(
        dy,
        x,
        xa,
        expert_ends,
        weight,
        kind,
        blocksize,
        rows,
        cols,
        lora_a,
        lora_b,
        scale,
        transposed,
        needs_dx,
        needs_lora,
    )
    return (
        dx if needs_dx else None,
        None,
        [None] * len(ctx.present),
        None,
        None,
        None,
        None,
        da.to(lora_a.dtype) if needs_lora else None,
        db.to(lora_b.dtype) if needs_lora else None,
        None,
        None,
    )


grouped_lora_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


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
    w = _operands(weight)
    y, _ = grouped_lora_fwd(
        x,
        expert_ends,
        w.tensors,
        w.kind,
        w.blocksize,
        w.rows,
        w.cols,
        lora_a,
        lora_b,
        float(scale),
        bool(transposed),
    )
    return y
