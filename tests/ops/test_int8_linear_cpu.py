"""The int8 weights' CPU paths (``csrc/cpu/int8_linear.cpp`` and the torch fallback) against
the format's definition.

The definition (bitsandbytes' ``int8_vectorwise_dequant``, docs/int8.md): the weight is
``(codes * SCB[n]) * (1/127)``, two fp32 products, then one cast. In float64 the product of an
int8 and an fp32 number is exact, so rounding it to fp32 and multiplying by the fp32 ``1/127``
in float64 before the final rounding gives the fp32 value bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_quantize_cpu import _ext, _isas

from trilora.native import cpu_ext
from trilora.ops import int8_linear
from trilora.ops.int8_linear import (
    dequantize_int8_impl,
    int8_lora_linear,
    quantize_int8,
    small_m_product,
)

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INV_127 = torch.tensor(7.874015718698502e-3, dtype=torch.float32).double()
# N x K: one row, one column, K below and above the 16-wide vector step, a ragged tail
SHAPES = [(1, 1), (3, 40), (17, 15), (33, 129), (130, 67)]


def _definition(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    product = (codes.double() * scb.double()[:, None]).float().double()
    return (product * INV_127).float().to(dtype)


def _codes(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # every int8 value, -128 included (bitsandbytes never writes it; a file may hold it)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scb = torch.rand(n) * 10 ** torch.empty(n).uniform_(-3, 2)
    return codes, scb


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("n,k", SHAPES)
def test_native_dequantization_is_the_definition_every_isa(seed, dtype, n, k):
    _ext()
    codes, scb = _codes(n, k)
    expected = _definition(codes, scb, dtype)
    for isa in _isas():
        out = torch.full((n, k), float("nan"), dtype=dtype)
        assert cpu_ext.dequantize_int8_into(out, codes, scb, isa)
        assert torch.equal(out, expected), f"isa={isa}"
    # the op's own path (native here), and the torch fallback, give the same bits
    assert torch.equal(dequantize_int8_impl(codes, scb, dtype), expected)
    assert torch.equal(dequantize_int8_impl(codes, scb, dtype, scratch=True), expected)


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_torch_fallback_is_the_definition(seed, monkeypatch, dtype):
    monkeypatch.setattr(cpu_ext, "load", lambda: None)
    codes, scb = _codes(37, 70)
    expected = _definition(codes, scb, dtype)
    assert torch.equal(dequantize_int8_impl(codes, scb, dtype), expected)
    assert torch.equal(dequantize_int8_impl(codes, scb, dtype, scratch=True), expected)
    assert small_m_product(torch.randn(2, 70), codes, scb) is None


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_small_m_product_matches_float64_every_isa(seed, m, n, k):
    _ext()
    codes, scb = _codes(n, k)
    x = torch.randn(m, k)
    ref = x.double() @ (codes.double() * scb.double()[:, None] / 127).t()
    scale = ref.abs().max().item() + 1e-30
    for isa in _isas():
        y = cpu_ext.int8_small_m_linear(x, codes, scb, isa)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        # fp32 accumulation over k terms: a few ulps of the largest partial sums
        err = (y.double() - ref).abs().max().item() / scale
        assert err <= 4e-7 * math.sqrt(k) + 1e-7, f"isa={isa}: {err:.2e}"


def test_small_m_refuses_what_it_does_not_serve():
    _ext()
    codes, scb = _codes(6, 10)
    rows = cpu_ext.small_m_max_rows()
    with pytest.raises(RuntimeError, match="at most"):
        cpu_ext.int8_small_m_linear(torch.randn(rows + 1, 10), codes, scb)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_ext.int8_small_m_linear(torch.randn(2, 11), codes, scb)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_ext.int8_small_m_linear(torch.randn(2, 10).bfloat16(), codes, scb)
    with pytest.raises(RuntimeError, match="SCB"):
        cpu_ext.dequantize_int8_into(torch.empty(6, 10), codes, scb[:5])
    # the op's gate: more rows than the kernel takes go to dequantize + GEMM
    assert small_m_product(torch.randn(rows + 1, 10), codes, scb) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 8, 9])
def test_lora_linear_forward_of_few_rows_reads_the_codes(seed, monkeypatch, dtype, m):
    """Up to 8 rows the int8 LoRA linear's forward multiplies straight from the codes, with
    the bias and the LoRA term as before; from 9 rows it dequantizes. Both match float64."""
    _ext()
    calls = []
    real = cpu_ext.int8_small_m_linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_ext, "int8_small_m_linear", spy)
    k, n = 72, 40
    codes, scb = quantize_int8(torch.randn(n, k) / math.sqrt(k))
    x = torch.randn(m, k).to(dtype)
    a, b = torch.randn(4, k) / math.sqrt(k), torch.randn(n, 4) / 2
    bias = torch.randn(n).to(dtype)
    with torch.no_grad():
        y = int8_lora_linear(x, codes, scb, a, b, 1.5, bias)
    assert calls == ([m] if m <= 8 else [])
    w = codes.double() * scb.double()[:, None] / 127
    xd = x.double()
    ref = xd @ w.t() + 1.5 * (xd @ a.double().t()) @ b.double().t() + bias.double()
    assert y.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= tol


def test_module_keeps_one_scratch_buffer_per_dtype(seed):
    """The int8 and 4-bit CPU paths share the per-thread scratch buffers (one per dtype)."""
    _ext()
    codes, scb = _codes(64, 48)
    first = dequantize_int8_impl(codes, scb, torch.float32, scratch=True)
    again = dequantize_int8_impl(codes[:32].contiguous(), scb[:32], torch.float32, scratch=True)
    assert again.data_ptr() == first.data_ptr()
    assert int8_linear.scratch_buffer(10, torch.float32).data_ptr() == first.data_ptr()
