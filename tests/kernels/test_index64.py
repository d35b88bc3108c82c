"""64-bit row offsets: the QLoRA linear kernels index token-major tensors of 2^31 elements and
more (an [M, 14336] MLP activation from 150K tokens on) without wrapping.

Nothing here allocates such a tensor: the launch decision is checked on meta tensors (shapes
and strides only), and the kernels' row arithmetic (``tile_rows``) runs under the interpreter
at row indices past the limit, where int32 wraps exactly as it does on the GPU.
"""

from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

import trilora.kernels.qlora_linear as ql
from trilora.kernels.common import INT32_OFFSET_LIMIT, needs_int64, tile_rows
from trilora.kernels.quantize import Weight4bit


@triton.jit
def _row_offsets_kernel(out_ptr, start, stride, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    # The kernels' pattern: a tile's rows, times the row stride.
    rows = tile_rows(start, BLOCK, INDEX64)
    tl.store(out_ptr + tl.arange(0, BLOCK), rows * stride)


def _row_offsets(start: int, stride: int, index64: bool, block: int = 16) -> list[int]:
    out = torch.zeros(block, dtype=torch.int64)
    _row_offsets_kernel[(1,)](out, start, stride, BLOCK=block, INDEX64=index64)
    return out.tolist()


def test_row_offsets_past_the_limit_are_exact_with_index64_and_wrap_without():
    rng = random.Random()
    stride = rng.choice([4096, 5120, 14336, 128256])
    block = 16
    # A tile that straddles the limit: its first rows fit in int32, its last ones do not.
    # (Start 1 to block - 2 rows below the last row that fits: block - 1 rows below, the
    # tile would end on that row and fit whole, for a stride that does not divide 2^31.)
    start = INT32_OFFSET_LIMIT // stride - rng.randrange(1, block - 1)
    rows = start + block
    assert needs_int64(torch.empty((rows, stride), device="meta", dtype=torch.bfloat16))
    exact = [(start + i) * stride for i in range(block)]
    assert max(exact) >= INT32_OFFSET_LIMIT > min(exact)
    assert _row_offsets(start, stride, index64=True, block=block) == exact
    wrapped = _row_offsets(start, stride, index64=False, block=block)
    assert wrapped != exact and min(wrapped) < 0  # what the 32-bit kernels computed


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "row-slice"])
def test_needs_int64_is_exact_at_the_boundary(layout):
    cols = random.choice([4096, 14336, 128256, 3000])
    # The last element's offset is (rows-1)*stride + cols-1: 2^31 - 1 fits, 2^31 does not.
    if layout == "contiguous":
        rows = INT32_OFFSET_LIMIT // cols
        fits = torch.empty((rows, cols), device="meta")
        extra = INT32_OFFSET_LIMIT - rows * cols + 1  # elements to the first offset past
        over = torch.empty((rows * cols + extra,), device="meta")
        assert rows * cols - 1 < INT32_OFFSET_LIMIT and not needs_int64(fits)
        assert needs_int64(over)
    elif layout == "transposed":
        rows = INT32_OFFSET_LIMIT // cols + 1
        t = torch.empty((cols, rows), device="meta").t()  # [rows, cols], column-major
        assert needs_int64(t) == ((rows - 1) + (cols - 1) * rows >= INT32_OFFSET_LIMIT)
    else:
        # Two rows of a wide buffer: few elements, but the second row starts far out.
        wide = torch.empty((2, INT32_OFFSET_LIMIT), device="meta")
        assert needs_int64(wide[:, :8])
        assert not needs_int64(wide[:1, :8])
    assert not needs_int64(None, torch.empty((0, 8), device="meta"))


class _Launch:
    """Stands in for a kernel: records the constexprs of the launch it is given."""

    def __init__(self):
        self.index64 = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.index64.append(kwargs["INDEX64"])

        return launch


def _meta_weight(n: int, k: int) -> Weight4bit:
    meta = {"device": "meta"}
    return Weight4bit(
        torch.empty(n * k // 2, dtype=torch.uint8, **meta),
        torch.empty(n * k // 64, **meta),
        torch.empty(16, **meta),
        None,
        None,
        None,
        64,
        n,
        k,
    )


@pytest.mark.parametrize("past", [False, True])
def test_launchers_switch_to_64_bit_offsets_from_the_size_that_needs_them(monkeypatch, past):
    n, k, r = random.choice([(14336, 4096, 16), (4096, 14336, 8)])
    # Past: every [M, N] and [M, K] tensor crosses the limit; else none reaches it.
    m = INT32_OFFSET_LIMIT // min(n, k) + 1 if past else INT32_OFFSET_LIMIT // max(n, k)
    for name in ("_qlora_fwd_tiled_kernel", "_qlora_bwd_input_kernel", "_lora_tn_grad_kernel"):
        monkeypatch.setattr(ql, name, _Launch())
    meta = {"device": "meta", "dtype": torch.bfloat16}
    w = _meta_weight(n, k)
    a, b = torch.empty((r, k), **meta), torch.empty((n, r), **meta)
    x, dy = torch.empty((m, k), **meta), torch.empty((m, n), **meta)
    _, xa = ql.qlora_forward(x, w, a, b, 2.0, None, None, 1.0, variant="tiled")
    _, dyb = ql.qlora_backward_input(dy, w, a, b, 2.0, None, 1.0)
    ql.lora_weight_grads(x, dy, xa, dyb, 2.0, None, 1.0)
    assert ql._qlora_fwd_tiled_kernel.index64 == [past]
    assert ql._qlora_bwd_input_kernel.index64 == [past]
    assert ql._lora_tn_grad_kernel.index64 == [past, past]  # dA, dB


def test_every_index64_kernel_ships_both_variants():
    for kernel in ("_qlora_fwd_tiled_kernel", "_qlora_bwd_input_kernel", "_lora_tn_grad_kernel"):
        ours = [s for s in ql.AOT_SPECS if s.name.startswith(kernel + "[")]
        assert ours and all("INDEX64" in s.constexprs for s in ours)
        on = [s for s in ours if s.constexprs["INDEX64"]]
        off = [s for s in ours if not s.constexprs["INDEX64"]]
        # One INDEX64 config per 32-bit one (the input backward's are smaller tiles).
        assert len(on) == len(off) and all(s.name.endswith(",i64]") for s in on), kernel


def test_the_input_backward_has_an_index64_row_for_every_rank_class():
    assert [row[:2] for row in ql._BWD_TABLE_INDEX64] == [row[:2] for row in ql._BWD_TABLE]
