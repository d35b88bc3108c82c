"""trilora.ops.rms_norm against transformers' LlamaRMSNorm and a float64 reference."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from trilora.config import override
from trilora.ops.rms_norm import rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max error relative to the largest float64 value: a few units of the dtype's last place.
TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _reference(x, w, eps, dy):
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    y = wd * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps))
    dx, dw = torch.autograd.grad(y, (xd, wd), dy.double())
    return y.detach(), dx, dw


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _case(shape, dtype, eps):
    h = shape[-1]
    norm = LlamaRMSNorm(h, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(h))
    x = (torch.randn(shape) * torch.rand(()) * 5).to(dtype)
    return norm, x


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 520), (1, 5, 1000), (4, 1, 3)])
def test_matches_llama_rms_norm(seed, backend, dtype, shape):
    eps = float(torch.empty(()).uniform_(1e-6, 1e-4))
    norm, x = _case(shape, dtype, eps)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y_eager = norm(x1)
    with override(backend=backend):
        y = rms_norm(x2, norm.weight, eps)
        assert y.dtype == y_eager.dtype and y.shape == y_eager.shape
        dy = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x2, norm.weight), dy)
    dx_eager, dw_eager = torch.autograd.grad(y_eager, (x1, norm.weight), dy)
    y_ref, dx_ref, dw_ref = _reference(x, norm.weight, eps, dy)
    if backend == "torch":
        # Same ops as the eager module in the same order: identical bits.
        torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    else:
        assert _rel(y, y_ref) <= TOL[dtype]
    # At least as accurate as eager (one rounding instead of two), within the dtype's tolerance.
    for ours, eager, ref in ((dx, dx_eager, dx_ref), (dw, dw_eager, dw_ref)):
        assert _rel(ours, ref) <= max(TOL[dtype], 1.5 * _rel(eager, ref))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_weight_and_strided_input(seed, backend):
    h = 96
    norm, x = _case((5, 2 * h), torch.bfloat16, 1e-5)
    norm = LlamaRMSNorm(h, eps=1e-5).to(torch.bfloat16)
    norm.weight.requires_grad_(False)
    xs = x[:, ::2].clone().requires_grad_()  # [5, h], contiguous leaf
    view = xs.t().contiguous().t()  # same values, column stride != 1
    with override(backend=backend):
        y = rms_norm(view, norm.weight, 1e-5)
        (dx,) = torch.autograd.grad(y, xs, torch.ones_like(y))
    y_ref, dx_ref, _ = _reference(xs, norm.weight, 1e-5, torch.ones_like(y))
    assert _rel(y, y_ref) <= TOL[torch.bfloat16]
    assert _rel(dx, dx_ref) <= TOL[torch.bfloat16]


def test_mixed_dtypes_follow_promotion(seed):
    norm, x = _case((4, 33), torch.float32, 1e-6)
    xb = x.to(torch.bfloat16)
    y = rms_norm(xb, norm.weight, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm(xb), rtol=0, atol=0)


def test_saves_no_fp32_copy(seed):
    """Autograd keeps x (the caller's own storage), the weight and one fp32 value per row."""
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, dtype=torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rms_norm(x, w)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in big)
    assert sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32) == 64 * 4


def test_fake_tensor_and_opcheck(seed):
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    w = torch.randn(40, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.trilora.rms_norm_fwd.default, (x, w, 1e-5))
    y, rstd = torch.ops.trilora.rms_norm_fwd(x, w, 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.trilora.rms_norm_bwd.default, (dy, x, w, rstd, True))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x).requires_grad_()
        out = rms_norm(fx, mode.from_tensor(w))
        out.sum().backward()
        assert out.shape == x.shape and fx.grad.shape == x.shape


def test_compile_fullgraph(seed):
    x = torch.randn(3, 4, 48)
    w = torch.randn(48)
    fn = torch.compile(rms_norm, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w, 1e-5), rms_norm(x, w, 1e-5))


def test_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        rms_norm(x.long(), torch.ones(8))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        rms_norm([1.0], torch.ones(1))
