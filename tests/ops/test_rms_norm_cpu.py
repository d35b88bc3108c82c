"""The CPU RMSNorm backward of the native extension against the torch path and float64."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from trilora.native import cpu_ext
from trilora.ops.rms_norm import rms_norm

rms_module = importlib.import_module("trilora.ops.rms_norm")

TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _ext():
    ext = cpu_ext.load()
    if ext is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_ext.reason()}")
    return ext


def _isas(ext):
    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(ext.best_isa()) + 1]


def _reference(x, w, rstd, dy):
    """float64 dx and dweight of y = w * (x * rstd), with rstd the forward's fp32 value."""
    xd, wd, gd = x.double(), w.double(), dy.double()
    n = xd * rstd.double()[:, None]
    dn = gd * wd
    dx = rstd.double()[:, None] * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (gd * n).sum(0)
    return dx, dw


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (17, 37), (64, 576), (5, 1000), (300, 130)])
def test_native_backward_matches_float64_and_torch_path(seed, dtype, shape):
    ext = _ext()
    m, h = shape
    x = (torch.randn(m, h) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(h)).to(dtype)
    dy = torch.randn(m, h).to(dtype)
    _, rstd = torch.ops.trilora.rms_norm_fwd(x, w, 1e-5)
    dx_ref, dw_ref = _reference(x, w, rstd, dy)
    # the chunked torch path (the fallback)
    dx_t = torch.empty_like(x)
    dw_t = torch.zeros(h)
    for s in range(m):
        n = x[s].float() * rstd[s]
        dn = dy[s].float() * w.float()
        dx_t[s] = rstd[s] * (dn - n * (dn * n).mean())
        dw_t += dy[s].float() * n.to(dtype).float()
    for isa in _isas(ext):
        for need_w in (True, False):
            dx, dw = ext.rms_norm_backward(dy, x, w.float(), rstd, need_w, isa)
            assert dx.dtype == dtype and dx.shape == x.shape
            assert _rel(dx, dx_ref) <= TOL[dtype], isa
            if need_w:
                assert dw.dtype == torch.float32
                assert _rel(dw, dw_ref) <= TOL[dtype], isa
                # dweight sums dy * n rounded to the dtype, as the torch path does
                torch.testing.assert_close(dw, dw_t, rtol=1e-5, atol=1e-5 * h)
            else:
                assert dw.numel() == 0
        # one rounding of the fp32 result: the torch path's own formula, to the dtype's ulp
        torch.testing.assert_close(dx.float(), dx_t.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_strided_rows_and_module_parity(seed):
    """Rows that are not adjacent in memory (the left half of a wider tensor), through the
    op's autograd, against LlamaRMSNorm's gradients."""
    _ext()
    h = 96
    norm = LlamaRMSNorm(h, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(h))
    wide = torch.randn(6, 2 * h)
    ours = wide.clone().requires_grad_()
    eager = wide.clone().requires_grad_()
    view = ours[:, :h]
    assert view.stride() == (2 * h, 1)
    y = rms_norm(view, norm.weight)
    y_e = norm(eager[:, :h])
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (ours, norm.weight), dy)
    dx_e, dw_e = torch.autograd.grad(y_e, (eager, norm.weight), dy)
    torch.testing.assert_close(y, y_e, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, dw_e, rtol=1e-5, atol=1e-5)
    assert (dx[:, h:] == 0).all()


def test_without_the_extension_the_torch_path_serves(seed, monkeypatch):
    x = torch.randn(9, 50, requires_grad=True)
    w = (1 + torch.randn(50) * 0.1).requires_grad_()
    dy = torch.randn(9, 50)
    dx_native, dw_native = torch.autograd.grad(rms_norm(x, w), (x, w), dy)
    monkeypatch.setattr(cpu_ext, "load", lambda: None)
    assert rms_module._native_backward(dy, x.detach(), w.detach(), torch.ones(9), True) is None
    dx_torch, dw_torch = torch.autograd.grad(rms_norm(x, w), (x, w), dy)
    torch.testing.assert_close(dx_native, dx_torch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw_native, dw_torch, rtol=1e-5, atol=1e-5)


def test_no_grad_forward_equals_the_op(seed):
    x = torch.randn(4, 7, 33)
    w = torch.randn(33)
    with torch.no_grad():
        y = rms_norm(x, w, 1e-5)
    y_op, _ = torch.ops.trilora.rms_norm_fwd(x.reshape(-1, 33), w, 1e-5)
    assert torch.equal(y, y_op.reshape(x.shape))
