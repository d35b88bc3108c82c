"""bitsandbytes 8-bit (LLM.int8) weights for the fused kernels: the ``Weight8bit`` tuple,
its validation and the in-register decode (:func:`int8_gather`).

The fused int8 QLoRA matmuls are the shared kernels of ``qlora_linear.py`` compiled with
``WEIGHT_FORMAT=1``: each W tile is read as int8 codes plus one fp32 scale per row and
decoded right before ``tl.dot`` (1 byte per element of HBM traffic, no 16-bit copy of W).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import AotSpec

WEIGHT_FORMAT_INT8 = 1
"""The ``WEIGHT_FORMAT`` constexpr of the shared QLoRA kernels for this format."""
INV_127 = 7.874015718698502e-3  # bitsandbytes' 1/127


class Weight8bit(NamedTuple):
    """An int8 weight ``W`` ``[n_rows, n_cols]``: ``W = (codes * scb[row]) * (1/127)``."""

    codes: torch.Tensor  # int8 [N, K], contiguous row-major
    scb: torch.Tensor  # fp32 [N], row absmax
    n_rows: int  # N
    n_cols: int  # K


def check_weight8(w: Weight8bit, device: torch.device | None = None) -> None:
    """Validate ``w`` (ValueError naming what is wrong)."""
    n, k = w.n_rows, w.n_cols
    if n <= 0 or k <= 0 or n * k >= 2**31:
        raise ValueError(
            f"int8 weight shape must be positive with < 2**31 elements, got [{n}, {k}]"
        )
    if w.codes.dtype != torch.int8 or tuple(w.codes.shape) != (n, k):
        raise ValueError(
            f"codes must be int8 [{n}, {k}], got {w.codes.dtype} {list(w.codes.shape)}"
        )
    if not w.codes.is_contiguous():
        raise ValueError("codes must be contiguous")
    if w.scb.dtype != torch.float32 or w.scb.numel() != n or not w.scb.is_contiguous():
        raise ValueError(
            f"scb must be contiguous fp32 [{n}], got {w.scb.dtype} {list(w.scb.shape)}"
        )
    device = device if device is not None else w.codes.device
    for t in (w.codes, w.scb):
        if t.device != device:
            raise ValueError(f"weight tensors must be on {device}, got one on {t.device}")


def weight8_args(w: Weight8bit) -> tuple[torch.Tensor, ...]:
    """The six weight pointer arguments of the shared kernels: codes, scb, placeholders."""
    return (w.codes, w.scb, w.scb, w.scb, w.scb, w.scb)


@triton.jit
def int8_gather(codes_ptr, scb_ptr, idx, mask, rows, row_mask):
    """fp32 values of the int8 elements at flat indices ``idx`` (``rows``: their row
    indices, broadcastable to ``idx``): ``(code * scb[row]) * (1/127)``, as bitsandbytes'
    ``int8_vectorwise_dequant`` computes it."""
    q = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.float32)
    s = tl.load(scb_ptr + rows, mask=row_mask, other=0.0)
    return q * s * 7.874015718698502e-3


AOT_SPECS: list[AotSpec] = []
"""The int8 gather is inlined into the shared kernels (their specs live in qlora_linear)."""

__all__ = [
    "AOT_SPECS",
    "INV_127",
    "WEIGHT_FORMAT_INT8",
    "Weight8bit",
    "check_weight8",
    "int8_gather",
    "weight8_args",
]
