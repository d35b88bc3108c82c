"""The shared fused QLoRA kernels with int8 weights (WEIGHT_FORMAT=1) vs float64, under the
Triton interpreter: forward (tiled and the small-M split-K decode path) and the input
gradient, with LoRA, bias and dropout. fp16 activations (bf16 tl.dot is wrong in the
interpreter, triton issue #11584)."""

from __future__ import annotations

import pytest
import torch

from trilora.formats.int8 import quantize
from trilora.kernels.int8 import Weight8bit
from trilora.kernels.qlora_linear import qlora_backward_input, qlora_forward

DT = torch.float16


def _case(m, n, k, r):
    qw = quantize(torch.randn(n, k) * torch.rand(n, 1))
    w64 = qw.codes.double() * qw.scb.double()[:, None] / 127
    x = torch.randn(m, k).to(DT)
    a = (torch.randn(r, k) / k**0.5).to(DT)
    b = (torch.randn(n, r) * 0.5).to(DT)
    bias = torch.randn(n).to(DT)
    mask = torch.rand(m, k) > 0.25
    return Weight8bit(qw.codes, qw.scb, n, k), w64, x, a, b, bias, mask


def _close(got, want, rtol=2e-2):
    scale = want.abs().max().item() + 1e-6
    assert (got.double() - want).abs().max().item() <= rtol * scale


@pytest.mark.parametrize(("m", "variant"), [(3, "splitk"), (37, "tiled")])
def test_forward_matches_float64(m, variant):
    n, k, r, s, ds = 70, 45, 6, 0.8, 1 / 0.75
    w, w64, x, a, b, bias, mask = _case(m, n, k, r)
    y, xa = qlora_forward(x, w, a, b, s, bias, mask, ds, variant=variant)
    x64 = x.double()
    xd = x64 * mask * ds
    xa64 = xd @ a.double().T
    y64 = x64 @ w64.T + s * xa64 @ b.double().T + bias.double()
    _close(y, y64)
    _close(xa, xa64, 1e-3)


def test_input_grad_matches_float64():
    m, n, k, r, s, ds = 21, 50, 67, 5, 0.6, 1 / 0.75
    w, w64, _, a, b, _, mask = _case(m, n, k, r)
    dy = torch.randn(m, n).to(DT)
    dx, dyb = qlora_backward_input(dy, w, a, b, s, mask, ds)
    dyb64 = dy.double() @ b.double()
    dx64 = dy.double() @ w64 + s * (dyb64 @ a.double()) * mask * ds
    _close(dx, dx64)
    _close(dyb, dyb64, 1e-3)


def test_op_runs_the_fused_int8_kernels_under_the_interpreter(monkeypatch):
    from trilora.config import config
    from trilora.ops.int8_linear import int8_lora_linear

    monkeypatch.setattr(config, "backend", "triton")
    n, k, r = 40, 36, 4
    qw = quantize(torch.randn(n, k))
    x = torch.randn(5, k).to(DT).requires_grad_()
    a = (torch.randn(r, k) / 6).to(DT).requires_grad_()
    b = torch.randn(n, r).to(DT).requires_grad_()
    y = int8_lora_linear(x, qw.codes, qw.scb, a, b, 0.5)
    y.float().sum().backward()
    w64 = qw.codes.double() * qw.scb.double()[:, None] / 127
    y64 = x.double() @ w64.T + 0.5 * (x.double() @ a.double().T) @ b.double().T
    _close(y, y64)
    _close(
        x.grad,
        torch.ones(5, n).double() @ w64
        + 0.5 * (torch.ones(5, n).double() @ b.double()) @ a.double(),
    )
