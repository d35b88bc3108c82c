"""Fused linear cross-entropy against F.cross_entropy on full float64 logits."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from trilora.config import override
from trilora.ops.linear_cross_entropy import default_chunk_size, linear_cross_entropy

# bf16: the chunk GEMMs round logits and gradients to 8 bits of mantissa.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


def _reference(h, w, labels, reduction, z_loss, grad_out):
    """F.cross_entropy on the full shifted logits in float64; returns (loss, dh, dw)."""
    hr = h.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    logits = hr @ wr.t()
    shifted = F.pad(labels[..., 1:], (0, 1), value=-100)
    flat = logits.reshape(-1, logits.shape[-1])
    lab = shifted.reshape(-1)
    per = F.cross_entropy(flat, lab, reduction="none")
    if z_loss:
        per = per + torch.where(lab != -100, z_loss * torch.logsumexp(flat, -1) ** 2, 0.0)
    if reduction == "mean":
        # F.cross_entropy's own mean (nan when every label is ignored)
        loss = F.cross_entropy(flat, lab) if not z_loss else per.sum() / (lab != -100).sum()
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.reshape(shifted.shape)
    loss.backward(grad_out.double())
    return loss.detach(), hr.grad, wr.grad


# bf16 twice: multiplied in bf16 and widened to fp32 (trilora.config.cpu_half_matmul)
DTYPES = [(torch.float32, "auto"), (torch.bfloat16, "native"), (torch.bfloat16, "fp32")]


@pytest.mark.parametrize("dtype,half_matmul", DTYPES, ids=["fp32", "bf16", "bf16-in-fp32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_parity(seed, dtype, half_matmul, reduction):
    b, t, hdim, v = 2, 13, 24, 101  # vocab not a multiple of any block
    h = torch.randn(b, t, hdim).to(dtype).requires_grad_()
    w = (torch.randn(v, hdim) / hdim**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[0, :4] = -100
    z = 1e-3 if reduction == "mean" else 0.0
    with override(cpu_half_matmul=half_matmul):
        loss = linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=7, z_loss=z)
        grad_out = torch.randn(loss.shape) if reduction == "none" else torch.tensor(1.3)
        loss.backward(grad_out)
    assert h.grad.dtype == w.grad.dtype == dtype
    ref, dh, dw = _reference(h, w, labels, reduction, z, grad_out)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref, atol=atol * 10, rtol=rtol)
    torch.testing.assert_close(h.grad.double(), dh, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), dw, atol=atol, rtol=rtol)


def test_triton_backend_under_interpreter(seed):
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    labels[5] = -100
    with override(backend="triton"):
        loss = linear_cross_entropy(h, w, labels, shift_labels=False, chunk_size=16)
    loss.backward()
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), labels)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-5, rtol=1e-4)


def test_all_ignored_matches_cross_entropy_mean(seed):
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = linear_cross_entropy(h, w, labels)
    loss.backward()
    ref, dh, dw = _reference(h, w, labels, "mean", 0.0, torch.tensor(1.0))
    assert torch.isnan(loss) and torch.isnan(ref)
    assert (h.grad == 0).all() and (w.grad == 0).all()
    assert (dh == 0).all() and (dw == 0).all()
    summed = linear_cross_entropy(h, w, labels, reduction="sum")
    assert summed.item() == 0.0


def test_frozen_head_and_unshifted_2d(seed):
    h = torch.randn(30, 12, dtype=torch.float64, requires_grad=True).float()
    h.retain_grad()
    w = torch.randn(50, 12)  # frozen lm_head: no weight gradient buffer
    labels = torch.randint(0, 50, (30,))
    loss = linear_cross_entropy(h, w, labels, shift_labels=False)
    loss.backward()
    hr = h.detach().double().requires_grad_()
    ref = F.cross_entropy(hr @ w.double().t(), labels)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=1e-6, rtol=1e-4)
    assert w.grad is None


def test_never_materializes_full_logits():
    # Under FakeTensorMode every allocation is a fake tensor: record the largest one.
    n, hdim, v, chunk = 4096, 64, 32000, 256
    biggest = 0

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, tuple | list) else (out,):
                if isinstance(o, torch.Tensor):
                    biggest = max(biggest, o.numel())
            return out

    with FakeTensorMode():
        h = torch.empty(n, hdim, requires_grad=True)
        w = torch.empty(v, hdim)
        labels = torch.zeros(n, dtype=torch.long)
        with Spy():
            linear_cross_entropy(h, w, labels, chunk_size=chunk).backward()
    assert biggest <= chunk * v < n * v


def test_default_chunk():
    assert default_chunk_size(100_000, 128_256) == 512
    assert default_chunk_size(10, 128_256) == 10


def test_bad_inputs():
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        linear_cross_entropy(h, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(h, w.double(), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, torch.zeros(2, 3, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, 4\]"):
        linear_cross_entropy(h, torch.randn(7, 5), torch.zeros(2, 3, dtype=torch.long))


def test_autocast_does_not_change_the_result(seed):
    """Trainers run forward under bf16 autocast; the fused loss keeps its own dtypes."""
    hidden = torch.randn(3, 9, 32, requires_grad=True)
    weight = torch.randn(77, 32, requires_grad=True)
    labels = torch.randint(0, 77, (3, 9))
    ref = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
