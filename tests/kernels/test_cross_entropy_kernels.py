"""The in-place cross-entropy kernel under the Triton interpreter, against float64 torch."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from trilora.kernels.cross_entropy import AOT_SPECS, _cross_entropy_kernel, cross_entropy_inplace

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _reference(x: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, z_loss: float):
    xr = x.double().requires_grad_()
    valid = labels != -100
    ce = F.cross_entropy(xr, labels, reduction="none")
    lse = torch.logsumexp(xr, -1)
    loss = torch.where(valid, ce + z_loss * lse * lse, 0.0)
    (loss * scale.double().expand(x.shape[0])).sum().backward()
    return loss.detach(), torch.where(valid, lse, 0.0).detach(), xr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "v", "block_v"), [(1, 50, None), (17, 300, 128), (9, 256, 64)])
def test_matches_float64(seed, dtype, m, v, block_v):
    x = (torch.randn(m, v) * 4).to(dtype)
    labels = torch.randint(0, v, (m,))
    if m > 2:
        labels[1] = -100
    z_loss = 1e-3
    per_row = m > 2 and v == 300
    scale = torch.rand(m) + 0.5 if per_row else torch.tensor([0.25])
    loss_ref, lse_ref, grad_ref = _reference(x, labels, scale, z_loss)
    g = x.clone()
    loss, lse = cross_entropy_inplace(g, labels, scale, z_loss=z_loss, block_v=block_v)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g.double(), grad_ref, atol=tol * 0.25, rtol=tol)
    if m > 2:
        assert (g[1] == 0).all() and loss[1] == 0


def test_strided_rows_and_int32_labels(seed):
    base = torch.randn(6, 200)
    x = base[:, :150]  # row stride 200, unit column stride
    labels = torch.randint(0, 150, (6,), dtype=torch.int32)
    loss_ref, _, grad_ref = _reference(x, labels.long(), torch.ones(1), 0.0)
    g = x.clone()
    view = base.clone()[:, :150]
    view.copy_(g)
    loss, _ = cross_entropy_inplace(view, labels, torch.ones(1), block_v=64)
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view.double(), grad_ref, atol=1e-6, rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unit stride"):
        cross_entropy_inplace(
            torch.randn(8, 4).t(), torch.zeros(4, dtype=torch.long), torch.ones(1)
        )
    with pytest.raises(ValueError, match="labels must be"):
        cross_entropy_inplace(torch.randn(4, 8), torch.zeros(3, dtype=torch.long), torch.ones(1))
    with pytest.raises(ValueError, match="scale must be fp32"):
        cross_entropy_inplace(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.ones(2))


def test_aot_specs_cover_every_argument():
    params = list(inspect.signature(_cross_entropy_kernel.fn).parameters)
    assert AOT_SPECS
    for spec in AOT_SPECS:
        assert list(spec.signature) == params
        assert set(spec.constexprs) == {k for k, t in spec.signature.items() if t == "constexpr"}
