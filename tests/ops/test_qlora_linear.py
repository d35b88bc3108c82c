"""The fused QLoRA linear op: outputs and gradients against a float64 reference.

Runs the torch path, and (``backend="triton"``) the whole op with its autograd through the
Triton kernels under the interpreter. bf16 ``tl.dot`` is wrong under the interpreter
(triton#11584), so the Triton path is checked with fp16 activations.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import trilora
from trilora.config import override
from trilora.ops import qlora_linear

# relative (to the reference's max magnitude) tolerance per activation dtype: a few ulps of
# the dtype, since W and x are rounded to it and the LoRA term is added in it
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (M, K, N, r): M = 1 (decode), sizes that are not multiples of any block, and K not a
# multiple of the quantization blocksize
SHAPES = [(1, 64, 48, 4), (3, 96, 40, 8), (17, 200, 33, 1), (40, 136, 72, 16)]


def _case(shape, dtype, lora_dtype, quant_type="nf4", double_quant=True, blocksize=64, bias=True):
    m, k, n, r = shape
    w = torch.randn(n, k) / math.sqrt(k)
    qw = trilora.quantize(w.to(dtype), quant_type, blocksize, double_quant)
    x = torch.randn(2, m, k).to(dtype)
    a = (torch.randn(r, k) / math.sqrt(k)).to(lora_dtype)
    b = (torch.randn(n, r) / math.sqrt(r)).to(lora_dtype)
    bias_t = torch.randn(n).to(dtype) if bias else None
    return qw, x, a, b, bias_t


def _reference(qw, x, a, b, bias, scale, mask, p):
    """float64 autograd reference on the same (dtype-rounded) weight and inputs."""
    w = qw.dequantize(x.dtype).double()
    xd = x.detach().double().requires_grad_()
    ad = a.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_()
    dropped = xd if mask is None else xd * mask / (1 - p)
    y = xd @ w.t() + scale * (dropped @ ad.t()) @ bd.t()
    if bias is not None:
        y = y + bias.double()
    return y, xd, ad, bd


def _assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((actual.double() - expected).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _run(shape, dtype, lora_dtype, backend, dropout, **kw):
    qw, x, a, b, bias = _case(shape, dtype, lora_dtype, **kw)
    scale = 2.0 / math.sqrt(shape[3])  # rsLoRA-style scale; any float is allowed
    p = 0.3 if dropout else 0.0
    mask = (torch.rand(x.shape) > p) if dropout else None
    xi = x.clone().requires_grad_()
    ai, bi = a.clone().requires_grad_(), b.clone().requires_grad_()
    with override(backend=backend):
        y = qlora_linear(
            xi, qw, ai, bi, scale, bias, dropout_p=p, training=dropout, dropout_mask=mask
        )
        dy = torch.randn_like(y)
        y.backward(dy)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], shape[2])
    assert xi.grad.dtype == dtype and ai.grad.dtype == lora_dtype and bi.grad.dtype == lora_dtype
    yr, xd, ad, bd = _reference(qw, x, a, b, bias, scale, mask, p)
    yr.backward(dy.double())
    _assert_close(y, yr, dtype, "y")
    _assert_close(xi.grad, xd.grad, dtype, "dx")
    # LoRA grads are accumulated in fp32; their inputs carry the activation dtype's rounding
    _assert_close(ai.grad, ad.grad, dtype, "dA")
    _assert_close(bi.grad, bd.grad, dtype, "dB")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lora_fp32", [True, False], ids=["lora_fp32", "lora_act"])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
def test_torch_path_matches_float64(seed, shape, dtype, lora_fp32, dropout):
    _run(shape, dtype, torch.float32 if lora_fp32 else dtype, "torch", dropout)


@pytest.mark.parametrize(
    "kw",
    [
        {"quant_type": "fp4"},
        {"double_quant": False},
        {"blocksize": 32, "bias": False},
        {"blocksize": 256},
    ],
    ids=str,
)
def test_torch_path_quant_variants(seed, kw):
    _run((5, 136, 24, 8), torch.float32, torch.float32, "torch", True, **kw)


@pytest.mark.parametrize("shape", [(1, 64, 48, 4), (17, 200, 33, 16), (20, 96, 40, 33)], ids=str)
@pytest.mark.parametrize("lora_fp32", [True, False], ids=["lora_fp32", "lora_act"])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
def test_triton_path_matches_float64(seed, shape, lora_fp32, dropout):
    pytest.importorskip("trilora.kernels.qlora_linear")
    dtype = torch.float16
    _run(shape, dtype, torch.float32 if lora_fp32 else dtype, "triton", dropout)


def test_triton_path_without_lora_and_large_m_scratch(seed):
    """M above fused_max_tokens takes the dequantize-to-scratch path; no-LoRA calls too."""
    pytest.importorskip("trilora.kernels.qlora_linear")
    qw, x, a, b, bias = _case((24, 96, 40, 8), torch.float16, torch.float32)
    with override(backend="triton", fused_max_tokens=8):
        xi = x.clone().requires_grad_()
        ai, bi = a.clone().requires_grad_(), b.clone().requires_grad_()
        y = qlora_linear(xi, qw, ai, bi, 0.5, bias)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_base = qlora_linear(x, qw, bias=bias)
    yr, xd, ad, bd = _reference(qw, x, a, b, bias, 0.5, None, 0.0)
    yr.backward(dy.double())
    for actual, expected, what in (
        (y, yr, "y"),
        (xi.grad, xd.grad, "dx"),
        (ai.grad, ad.grad, "dA"),
        (bi.grad, bd.grad, "dB"),
    ):
        _assert_close(actual, expected, torch.float16, what)
    base_ref = x.double() @ qw.dequantize(torch.float16).double().t() + bias.double()
    _assert_close(y_base, base_ref, torch.float16, "y without LoRA")


def test_non_contiguous_input_is_handled(seed):
    qw, _, a, b, bias = _case((6, 64, 24, 4), torch.float32, torch.float32)
    wide = torch.randn(2, 6, 128)
    x_nc = wide[..., ::2]
    assert not x_nc.is_contiguous()
    y = qlora_linear(x_nc, qw, a, b, 1.0, bias)
    torch.testing.assert_close(y, qlora_linear(x_nc.contiguous(), qw, a, b, 1.0, bias))


def test_dropout_is_applied_only_in_training(seed):
    qw, x, a, b, bias = _case((8, 64, 24, 4), torch.float32, torch.float32)
    eval_y = qlora_linear(x, qw, a, b, 1.0, bias, dropout_p=0.5, training=False)
    torch.testing.assert_close(eval_y, qlora_linear(x, qw, a, b, 1.0, bias))
    train_y = qlora_linear(x, qw, a, b, 1.0, bias, dropout_p=0.5, training=True)
    assert not torch.allclose(train_y, eval_y)


def test_frozen_inputs_get_no_gradient(seed):
    qw, x, a, b, bias = _case((4, 64, 24, 4), torch.float32, torch.float32)
    ai = a.clone().requires_grad_()
    y = qlora_linear(x, qw, ai, b, 1.0, bias)
    y.sum().backward()
    assert ai.grad is not None and b.grad is None and x.grad is None


# --- fake tensors, meta, torch.compile -----------------------------------------------


def _fake_weight(n, k, device):
    nblocks = n * k // 64
    return trilora.QuantizedWeight(
        packed=torch.empty(n * k // 2, 1, dtype=torch.uint8, device=device),
        absmax=torch.empty(nblocks, dtype=torch.uint8, device=device),
        code=torch.empty(16, device=device),
        quant_type="nf4",
        blocksize=64,
        shape=torch.Size([n, k]),
        dtype=torch.bfloat16,
        nested_absmax=torch.empty(-(-nblocks // 256), device=device),
        nested_code=torch.empty(256, device=device),
        offset=torch.empty((), device=device),
    )


@pytest.mark.parametrize("where", ["fake", "meta"])
def test_runs_on_fake_tensors_and_meta(where):
    n, k, r = 4096, 4096, 16  # a real projection size costs nothing here
    ctx = FakeTensorMode() if where == "fake" else torch.device("meta")
    with ctx:
        device = "meta" if where == "meta" else "cpu"
        qw = _fake_weight(n, k, device)
        x = torch.empty(2, 512, k, dtype=torch.bfloat16, device=device, requires_grad=True)
        a = torch.empty(r, k, device=device, requires_grad=True)
        b = torch.empty(n, r, device=device, requires_grad=True)
        y = qlora_linear(x, qw, a, b, 2.0, dropout_p=0.1, training=True)
        y.sum().backward()
    assert y.shape == (2, 512, n) and y.dtype == torch.bfloat16
    assert a.grad.shape == (r, k) and b.grad.shape == (n, r) and x.grad.shape == x.shape


def test_torch_compile_fullgraph(seed):
    layer = trilora.QLoraLinear.from_linear(
        torch.nn.Linear(64, 32), r=4, lora_alpha=8, compute_dtype=None
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    grad_a = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    y_eager = layer(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad_a, layer.lora_A.grad)


def test_opcheck(seed):
    qw, x, a, b, bias = _case((3, 64, 16, 4), torch.float32, torch.float32)
    args = (
        x.reshape(-1, 64),
        qw.packed,
        qw.absmax,
        qw.code,
        qw.nested_absmax,
        qw.nested_code,
        qw.offset,
        qw.blocksize,
        16,
        a.requires_grad_(),
        b.requires_grad_(),
        0.5,
        bias,
        None,
        1.0,
    )
    torch.library.opcheck(torch.ops.trilora.qlora_linear_fwd.default, args)


# --- bad input ------------------------------------------------------------------------


def test_rejects_bad_inputs():
    qw, x, a, b, bias = _case((3, 64, 16, 4), torch.float32, torch.float32)
    cases = [
        (TypeError, "float16, bfloat16 or float32", dict(x=x.to(torch.int32))),
        (ValueError, "x has 32 features", dict(x=x[..., :32])),
        (ValueError, r"lora_a must be \[r, 64\]", dict(a=a[:, :8])),
        (ValueError, r"lora_b must be \[16, 4\]", dict(b=b[:, :3])),
        (ValueError, "given together", dict(b=None)),
        (TypeError, "share a float dtype", dict(b=b.double())),
        (ValueError, r"bias must be \[16\]", dict(bias=bias[:3])),
        (ValueError, "dropout_p must be in", dict(p=1.0)),
        (ValueError, "x is on meta but the 4-bit weight is on cpu", dict(x=x.to("meta"))),
        (ValueError, "lora_a is on meta but x is on cpu", dict(a=a.to("meta"), b=b.to("meta"))),
    ]
    for exc, msg, change in cases:
        args = dict(x=x, qw=qw, a=a, b=b, bias=bias, p=0.0) | change
        with pytest.raises(exc, match=msg):
            qlora_linear(
                args["x"], args["qw"], args["a"], args["b"], 1.0, args["bias"], dropout_p=args["p"]
            )
