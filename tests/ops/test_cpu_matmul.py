"""trilora.ops.cpu_matmul: oneDNN fp32 products against float64, and the torch.mm fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_dispatch import OpRecorder
from torch._subclasses.fake_tensor import FakeTensorMode

from trilora.config import override
from trilora.ops import cpu_matmul

# below and above the 2**20 multiply-adds where the products switch to oneDNN
SHAPES = [(2, 3, 5), (17, 64, 33), (300, 130, 7), (33, 300, 129), (144, 576, 192)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_products_match_float64(seed, m, k, n):
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    dy = torch.randn(m, n)
    ref_y = x.double() @ w.double().t()
    ref_dx = dy.double() @ w.double()
    for y, ref in ((cpu_matmul.linear(x, w), ref_y), (cpu_matmul.matmul(dy, w), ref_dx)):
        assert y.dtype == torch.float32 and y.shape == ref.shape
        # fp32 accumulation: a few ulps of the largest partial sums, nothing like bf16/tf32
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * k**0.5)
    out = torch.empty(m, k)
    assert cpu_matmul.matmul_into(out, dy, w) is out
    torch.testing.assert_close(out.double(), ref_dx, rtol=1e-5, atol=1e-5 * k**0.5)
    # a weight stored transposed (same values, other strides)
    wt = w.t().contiguous().t()
    torch.testing.assert_close(
        cpu_matmul.linear(x, wt).double(), ref_y, rtol=1e-5, atol=1e-5 * k**0.5
    )


def test_fallback_is_torch_mm(seed, monkeypatch):
    x, w, dy = torch.randn(9, 20), torch.randn(11, 20), torch.randn(9, 11)
    monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: False)
    assert torch.equal(cpu_matmul.linear(x, w), x @ w.t())
    assert torch.equal(cpu_matmul.matmul(dy, w), dy @ w)
    out = torch.empty(9, 20)
    assert torch.equal(cpu_matmul.matmul_into(out, dy, w), dy @ w)


def test_other_dtypes_and_fake_tensors_use_torch(seed):
    with override(cpu_half_matmul="native"):
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            x, w = torch.randn(5, 8).to(dtype), torch.randn(3, 8).to(dtype)
            assert torch.equal(cpu_matmul.linear(x, w), x @ w.t())
    with FakeTensorMode():
        y = cpu_matmul.linear(torch.empty(4, 6), torch.empty(5, 6))
        assert y.shape == (4, 5)


def test_blas_env_switch(monkeypatch):
    cpu_matmul.onednn_available.cache_clear()
    try:
        monkeypatch.setenv("TRILORA_CPU_MATMUL", "blas")
        assert cpu_matmul.onednn_available() is False
    finally:
        cpu_matmul.onednn_available.cache_clear()


def test_large_fp32_products_go_to_onednn_when_available():
    x, w = torch.randn(64, 256), torch.randn(96, 256)
    available = cpu_matmul.onednn_available()  # the probe runs outside the recorder
    with OpRecorder() as rec:
        cpu_matmul.linear(x, w)
        cpu_matmul.linear(x[:2], w[:3])
    want = "mkldnn._linear_pointwise.default" if available else "aten.mm.default"
    assert rec.ops[0] == want
    assert rec.ops[-1] == "aten.mm.default"  # 2 x 3 x 256: torch.mm


@pytest.mark.parametrize(
    "flags,bf16,fp16",
    [
        ({"avx2", "fma"}, torch.float32, torch.float32),  # AVX2 only: both widened
        ({"avx512f", "avx512_bf16"}, torch.bfloat16, torch.float32),
        ({"amx_tile", "amx_bf16", "amx_fp16"}, torch.bfloat16, torch.float16),
        ({"fp", "asimd", "asimdhp", "bf16"}, torch.bfloat16, torch.float16),  # Arm
        (set(), torch.bfloat16, torch.float16),  # unreadable: as before the switch
    ],
)
def test_product_dtype_follows_the_cpu_flags(monkeypatch, flags, bf16, fp16):
    monkeypatch.setattr(cpu_matmul, "cpu_flags", lambda: frozenset(flags))
    assert cpu_matmul.product_dtype(torch.bfloat16) == bf16
    assert cpu_matmul.product_dtype(torch.float16) == fp16
    for dtype in (torch.float32, torch.float64):
        assert cpu_matmul.product_dtype(dtype) == dtype
    for mode, want in (("native", torch.bfloat16), ("fp32", torch.float32)):
        with override(cpu_half_matmul=mode):
            assert cpu_matmul.product_dtype(torch.bfloat16) == want
    with pytest.raises(ValueError, match="cpu_half_matmul"), override(cpu_half_matmul="fast"):
        pass


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = cpu_matmul.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        assert flags == frozenset()
        return
    line = next(ln for ln in text.splitlines() if ln.startswith(("flags", "Features")))
    assert flags == frozenset(line.split(":", 1)[1].split())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES[1:])
def test_half_operands_widened_to_fp32(seed, dtype, m, k, n):
    """cpu_half_matmul="fp32": the products run on fp32 operands and come back in the
    operands' dtype (a fp32 operand makes the result fp32), within one rounding of float64."""
    x, w, dy = (torch.randn(*s).to(dtype) for s in ((m, k), (n, k), (m, n)))
    ref_y = x.double() @ w.double().t()
    ref_dx = dy.double() @ w.double()
    eps = torch.finfo(dtype).eps
    with override(cpu_half_matmul="fp32"), OpRecorder() as rec:
        y, dx = cpu_matmul.linear(x, w), cpu_matmul.matmul(dy, w)
        out = torch.empty(m, k, dtype=dtype)
        assert cpu_matmul.matmul_into(out, dy, w) is out
        wide = cpu_matmul.widen(w)
        y_wide = cpu_matmul.linear(x, wide)
    assert wide.dtype == torch.float32 and torch.equal(wide, w.float())
    assert {dt for _, dt in rec.products()} == {(torch.float32, torch.float32)}
    assert len(rec.products()) == 4
    for got, ref, want in ((y, ref_y, dtype), (dx, ref_dx, dtype), (out, ref_dx, dtype)):
        assert got.dtype == want
        # one rounding of the fp32 result (half an ulp) plus fp32 accumulation
        torch.testing.assert_close(got.double(), ref, rtol=eps, atol=1e-5 * k**0.5)
    assert y_wide.dtype == torch.float32
    torch.testing.assert_close(y_wide.double(), ref_y, rtol=1e-5, atol=1e-5 * k**0.5)
