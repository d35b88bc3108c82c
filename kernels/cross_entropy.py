"""Cross-entropy over a chunk of logits, with the logits' gradient written in place.

One program per row (token). Pass 1 runs an online logsumexp over vocabulary blocks
(running max ``m`` and rescaled sum ``d``, so one read of the row suffices and nothing of
size ``V`` is kept in registers). Pass 2 reads the row again and overwrites it with
``d loss_row / d logits = scale * (softmax * (1 + 2 z lse) - onehot(label))``. The
logits buffer is thus reused as its own gradient: the fused linear cross-entropy never
holds a logits tensor and a gradient tensor of the same chunk at once.

Per row: ``loss = lse - logit[label] + z_loss * lse**2`` (fp32), and ``lse`` is returned
too. Rows whose label equals ``ignore_index`` get loss 0 and an all-zero gradient row.
``scale`` is read from memory (one fp32 value, or one per row) so the caller can pass
``1 / n_valid`` without a host synchronization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .common import cast_rne

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    scale_ptr,
    loss_ptr,
    lse_ptr,
    n_cols,
    ignore_index,
    z_loss,
    SCALE_PER_ROW: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    out_ty = logits_ptr.dtype.element_ty
    if label == ignore_index:
        # Ignored token: contributes nothing to the loss and nothing to the gradient.
        for off in range(0, n_cols, BLOCK_V):
            c = off + cols
            tl.store(row_ptr + c, tl.zeros([BLOCK_V], dtype=out_ty), mask=c < n_cols)
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        # Pass 1: online logsumexp in fp32.
        m = -float("inf")
        d = 0.0
        for off in range(0, n_cols, BLOCK_V):
            c = off + cols
            x = tl.load(row_ptr + c, mask=c < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        # Read the target logit before pass 2 overwrites the row.
        x_label = tl.load(row_ptr + label).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_label + z_loss * lse * lse)
        tl.store(lse_ptr + row, lse)
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + row)
        else:
            scale = tl.load(scale_ptr)
        # d/dx of z * lse^2 is 2 z lse * softmax: fold it into the softmax factor.
        zf = 1.0 + 2.0 * z_loss * lse
        # Pass 2: gradient in place.
        for off in range(0, n_cols, BLOCK_V):
            c = off + cols
            x = tl.load(row_ptr + c, mask=c < n_cols, other=-float("inf")).to(tl.float32)
            g = tl.exp(x - lse) * zf
            g = tl.where(c == label, g - 1.0, g) * scale
            tl.store(row_ptr + c, cast_rne(g, out_ty), mask=c < n_cols)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

# Memory-bound: each row is read twice and written once. 4096 columns per block at 8 warps is
# 16 values per thread (no spills, 16-byte loads for bf16); smaller vocabularies use the next
# power of two so tiny test shapes do not pay for masked lanes.
_BLOCK_V = 4096
_NUM_WARPS = 8


def _block_v(n_cols: int) -> int:
    return min(_BLOCK_V, triton.next_power_of_2(n_cols))


def cross_entropy_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise cross-entropy of ``logits``; overwrites ``logits`` with its gradient.

    Args:
        logits: ``[M, V]`` fp32/fp16/bf16, unit stride along V (rows may be strided).
        labels: ``[M]`` integer class indices in ``[0, V)`` or ``ignore_index``.
        scale: fp32, one element (applied to every row) or ``[M]`` (one per row): the
            gradient of each row is multiplied by it (e.g. ``1 / n_valid`` for a mean).
        ignore_index: label value that marks a row as ignored.
        z_loss: coefficient of the ``lse**2`` auxiliary loss.
        block_v: vocabulary block (power of two); default from the launcher's table.

    Returns:
        ``(loss [M] fp32, lse [M] fp32)``; ignored rows have 0 in both.
    """
    if logits.dim() != 2 or logits.dtype not in _TL_DTYPE:
        raise ValueError(
            f"logits must be 2-D fp32/fp16/bf16, got {logits.dtype} {tuple(logits.shape)}"
        )
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary dimension")
    m, v = logits.shape
    if labels.shape != (m,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be int32/int64 [{m}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if scale.dtype != torch.float32 or scale.numel() not in (1, m):
        raise ValueError(
            f"scale must be fp32 with 1 or {m} elements, got {scale.dtype} {scale.numel()}"
        )
    loss = torch.empty(m, dtype=torch.float32, device=logits.device)
    lse = torch.empty(m, dtype=torch.float32, device=logits.device)
    if m == 0:
        return loss, lse
    block = block_v if block_v is not None else _block_v(v)
    _cross_entropy_kernel[(m,)](
        logits,
        logits.stride(0),
        labels.to(torch.int64).contiguous(),
        scale.contiguous(),
        loss,
        lse,
        v,
        ignore_index,
        float(z_loss),
        SCALE_PER_ROW=scale.numel() != 1,
        BLOCK_V=block,
        num_warps=_NUM_WARPS,
    )
    return loss, lse


# --------------------------------------------------------------------------------------------
# Ahead-of-time specs
# --------------------------------------------------------------------------------------------


def _aot_specs() -> list[AotSpec]:
    specs = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for per_row in (False, True):
            specs.append(
                AotSpec(
                    name=f"_cross_entropy_kernel[{_TL_DTYPE[dt]},{'row' if per_row else 'scalar'}]",
                    fn=_cross_entropy_kernel,
                    signature={
                        "logits_ptr": f"*{_TL_DTYPE[dt]}",
                        "stride_row": "i32",
                        "labels_ptr": "*i64",
                        "scale_ptr": "*fp32",
                        "loss_ptr": "*fp32",
                        "lse_ptr": "*fp32",
                        "n_cols": "i32",
                        "ignore_index": "i32",
                        "z_loss": "fp32",
                        "SCALE_PER_ROW": "constexpr",
                        "BLOCK_V": "constexpr",
                    },
                    constexprs={"SCALE_PER_ROW": per_row, "BLOCK_V": _BLOCK_V},
                    options={"num_warps": _NUM_WARPS},
                )
            )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()

__all__ = ["AOT_SPECS", "cross_entropy_inplace"]
