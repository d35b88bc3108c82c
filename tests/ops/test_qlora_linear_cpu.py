"""The QLoRA linear's CPU path: the eager route and the custom ops agree bit for bit, one
dequantization per forward and per backward, and the fallbacks (no native extension, no
oneDNN) against a float64 reference."""

from __future__ import annotations

import functools
import importlib
import itertools
import math

import pytest
import torch
from helpers_dispatch import OpRecorder

import trilora
from trilora.config import override
from trilora.native import cpu_ext
from trilora.ops import cpu_matmul, qlora_linear
from trilora.ops.int8_linear import int8_lora_linear, quantize_int8

Q = importlib.import_module("trilora.ops.qlora_linear")

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _case(dtype, m=23, k=136, n=40, r=8, bias=True):
    qw = trilora.quantize((torch.randn(n, k) / math.sqrt(k)).to(dtype), "nf4", 64, True)
    x = torch.randn(2, m, k).to(dtype)
    a = torch.randn(r, k) / math.sqrt(k)
    b = torch.randn(n, r) / math.sqrt(r)
    bias_t = torch.randn(n).to(dtype) if bias else None
    return qw, x, a, b, bias_t


def _run(qw, x, a, b, bias, mask=None, p=0.0):
    xi = x.clone().requires_grad_()
    ai = None if a is None else a.clone().requires_grad_()
    bi = None if b is None else b.clone().requires_grad_()
    y = qlora_linear(xi, qw, ai, bi, 1.7, bias, dropout_p=p, training=p > 0, dropout_mask=mask)
    dy = torch.ones_like(y) if y.numel() == 0 else torch.linspace(-1, 1, y.numel()).view_as(y)
    y.backward(dy.to(y.dtype))
    grads = [xi.grad] + ([] if a is None else [ai.grad, bi.grad])
    return y.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["lora", "dropout", "no_lora", "no_bias"])
def test_eager_route_equals_custom_ops(seed, monkeypatch, dtype, variant):
    qw, x, a, b, bias = _case(dtype, bias=variant != "no_bias")
    if variant == "no_lora":
        a = b = None
    mask = (torch.rand(x.shape) > 0.25) if variant == "dropout" else None
    p = 0.25 if variant == "dropout" else 0.0
    assert Q._eager_cpu(x)
    y_eager, g_eager = _run(qw, x, a, b, bias, mask, p)
    monkeypatch.setattr(Q, "_eager_cpu", lambda t: False)
    y_op, g_op = _run(qw, x, a, b, bias, mask, p)
    assert torch.equal(y_eager, y_op)
    for ge, go in zip(g_eager, g_op):
        assert torch.equal(ge, go)


def test_tracing_modes_see_the_custom_op(seed):
    qw, x, a, b, bias = _case(torch.float32)
    with OpRecorder() as rec:
        qlora_linear(x, qw, a.requires_grad_(), b.requires_grad_(), 2.0, bias)
    assert "trilora.qlora_linear_fwd.default" in rec.ops
    assert not any(op.startswith("mkldnn") or op == "aten.mm.default" for op in rec.ops)


def test_one_dequantization_per_forward_and_backward(seed, monkeypatch):
    calls = []
    real = Q.dequantize_4bit_impl

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(Q, "dequantize_4bit_impl", counting)
    qw, x, a, b, bias = _case(torch.float32)
    y = qlora_linear(x.requires_grad_(), qw, a.requires_grad_(), b.requires_grad_(), 2.0, bias)
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2


def test_lora_less_backward_returns_distinct_outputs(seed):
    """A frozen 4-bit layer without an adapter, input requiring grad: through both routes
    (the custom op used to return one empty tensor for two outputs, which torch refuses)."""
    qw, x, _, _, _ = _case(torch.float32)
    xi = x.clone().requires_grad_()
    qlora_linear(xi, qw).sum().backward()
    w = qw.dequantize(torch.float64)
    expected = torch.ones(*x.shape[:-1], w.shape[0]).double() @ w
    torch.testing.assert_close(xi.grad.double(), expected, rtol=1e-5, atol=1e-6)
    dy = torch.randn(5, 40)
    dx, da, db = Q.qlora_linear_bwd(
        dy,
        torch.randn(5, 136),
        qw.packed,
        qw.absmax,
        qw.code,
        qw.nested_absmax,
        qw.nested_code,
        qw.offset,
        64,
        None,
        None,
        torch.empty(5, 0),
        1.0,
        None,
        1.0,
        True,
        False,
    )
    assert dx.shape == (5, 136) and da.numel() == 0 and db.numel() == 0 and da is not db


def _reference(qw, x, a, b, bias, scale=1.7):
    return _reference_dense(qw.dequantize(torch.float64), x, a, b, bias, scale)


def _reference_dense(w, x, a, b, bias, scale=1.7):
    xd = x.double().requires_grad_()
    ad = a.double().requires_grad_()
    bd = b.double().requires_grad_()
    y = xd @ w.t() + scale * (xd @ ad.t()) @ bd.t() + bias.double()
    dy = torch.linspace(-1, 1, y.numel()).view_as(y).double()
    y.backward(dy)
    return y.detach(), [xd.grad, ad.grad, bd.grad]


@pytest.mark.parametrize("native", [True, False], ids=["native", "no_native"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_fallback_matches_float64(seed, monkeypatch, native, onednn, dtype):
    if not native:
        monkeypatch.setattr(cpu_ext, "load", lambda: None)
    if not onednn:
        monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: False)
    qw, x, a, b, bias = _case(dtype)
    y, grads = _run(qw, x, a, b, bias)
    y_ref, grads_ref = _reference(qw, x, a, b, bias)
    for got, ref, what in zip([y, *grads], [y_ref, *grads_ref], ["y", "dx", "dA", "dB"]):
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= TOL[dtype], f"{what}: {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stacked_layers_share_the_scratch_buffer_safely(seed, dtype):
    """Each dequantized weight lives in one reused per-thread buffer: layers of different
    sizes in a chain, forward then backward, against float64."""
    sizes = [96, 200, 64, 130]
    weights = [
        trilora.quantize((torch.randn(n, k) / math.sqrt(k)).to(dtype), "nf4", 64, True)
        for k, n in itertools.pairwise(sizes)
    ]
    loras = [
        (torch.randn(4, k) * 0.1, torch.randn(n, 4) * 0.1) for k, n in itertools.pairwise(sizes)
    ]
    x = torch.randn(37, sizes[0]).to(dtype).requires_grad_()
    params = [t.clone().requires_grad_() for pair in loras for t in pair]
    h = x
    for i, w in enumerate(weights):
        h = qlora_linear(h, w, params[2 * i], params[2 * i + 1], 1.5)
    dy = torch.randn(h.shape)
    h.backward(dy.to(h.dtype))
    xd = x.detach().double().requires_grad_()
    pd = [p.detach().double().requires_grad_() for p in params]
    hd = xd
    for i, w in enumerate(weights):
        wd = w.dequantize(torch.float64)
        hd = hd.to(dtype).double() if dtype != torch.float32 else hd
        hd = hd @ wd.t() + 1.5 * (hd @ pd[2 * i].t()) @ pd[2 * i + 1].t()
    hd.backward(dy.double())
    for got, ref in [(h, hd), (x.grad, xd.grad)] + [(p.grad, q.grad) for p, q in zip(params, pd)]:
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= 4 * TOL[dtype], err


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("mode", ["native", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_activations_multiply_in_the_product_dtype(seed, monkeypatch, quant, mode, dtype):
    """trilora.config.cpu_half_matmul: "native" multiplies the base weight in the activations'
    dtype, "fp32" dequantizes it to fp32 and rounds once at the end; both match float64, and
    the outputs and input gradient come back in the activations' dtype."""
    m, k, n = 19, 72, 44
    weight = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    x = torch.randn(m, k).to(dtype)
    a, b = torch.randn(4, k) / math.sqrt(k), torch.randn(n, 4) / 2
    bias = torch.randn(n).to(dtype)
    if quant == "nf4":
        qw = trilora.quantize(weight, "nf4", 64, True)
        w64 = qw.dequantize(torch.float64)
        run = functools.partial(qlora_linear, weight=qw)
    else:
        codes, scb = quantize_int8(weight)
        w64 = codes.double() * scb.double()[:, None] / 127
        run = functools.partial(int8_lora_linear, codes=codes, scb=scb)
    seen = []
    real_linear = cpu_matmul.linear

    def spy(lhs, rhs, *args, **kwargs):
        seen.append((lhs.dtype, rhs.dtype))
        return real_linear(lhs, rhs, *args, **kwargs)

    monkeypatch.setattr(cpu_matmul, "linear", spy)
    xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
    with override(cpu_half_matmul=mode):
        y = run(xi, lora_a=ai, lora_b=bi, scale=1.7, bias=bias)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(dtype))
    grads = [xi.grad, ai.grad, bi.grad]
    # the two base-weight products (forward, input gradient), the weight dequantized into
    # the activations' dtype or into fp32
    assert seen == [(dtype, dtype if mode == "native" else torch.float32)] * 2
    y_ref, grads_ref = _reference_dense(w64, x, a, b, bias)
    assert y.dtype == dtype and grads[0].dtype == dtype
    for got, ref, what in zip([y, *grads], [y_ref, *grads_ref], ["y", "dx", "dA", "dB"]):
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= TOL[dtype], f"{what}: {err:.2e}"


@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "n,k,blocksize,double_quant",
    # rows that start and end inside a block (k odd, k < blocksize), one row, k = 1
    [
        (37, 129, 64, True),
        (5, 7, 32, False),
        (33, 40, 128, True),
        (130, 67, 256, False),
        (1, 1, 64, True),
    ],
)
def test_small_m_product_4bit_matches_float64_every_isa(seed, m, n, k, blocksize, double_quant):
    ext = cpu_ext.load()
    if ext is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_ext.reason()}")
    qw = trilora.quantize(torch.randn(n, k), "nf4", blocksize, double_quant)
    x = torch.randn(m, k)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    scale = ref.abs().max().item() + 1e-30
    best = ext.best_isa()
    isas = ["scalar"] + (["avx2"] if best in ("avx2", "avx512") else [])
    packed = qw.packed.reshape(-1).view(torch.uint8)
    for isa in isas:
        y = cpu_ext.small_m_linear_4bit(
            x,
            packed,
            qw.absmax,
            qw.code,
            qw.nested_absmax,
            qw.nested_code,
            qw.offset,
            blocksize,
            256,
            n,
            isa,
        )
        assert y.dtype == torch.float32 and y.shape == (m, n)
        err = (y.double() - ref).abs().max().item() / scale
        assert err <= 4e-7 * math.sqrt(k) + 1e-7, f"isa={isa}: {err:.2e}"
    with pytest.raises(RuntimeError, match="at most"):
        cpu_ext.small_m_linear_4bit(
            torch.randn(ext.small_m_max_rows() + 1, k),
            packed,
            qw.absmax,
            qw.code,
            qw.nested_absmax,
            qw.nested_code,
            qw.offset,
            blocksize,
            256,
            n,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 8, 9])
def test_forward_of_few_rows_reads_the_packed_codes(seed, monkeypatch, dtype, m):
    """Up to 8 rows the 4-bit LoRA linear's forward multiplies straight from the packed codes
    (bias and LoRA term as before); from 9 rows it dequantizes. Both match float64, and the
    backward (which always dequantizes) is unchanged."""
    if cpu_ext.load() is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_ext.reason()}")
    calls = []
    real = cpu_ext.small_m_linear_4bit

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cpu_ext, "small_m_linear_4bit", spy)
    qw, x, a, b, bias = _case(dtype, m=m)
    x = x[0]
    y, grads = _run(qw, x, a, b, bias)
    assert calls == ([m] if m <= 8 else [])
    y_ref, grads_ref = _reference(qw, x, a, b, bias)
    assert y.dtype == dtype
    for got, ref, what in zip([y, *grads], [y_ref, *grads_ref], ["y", "dx", "dA", "dB"]):
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= TOL[dtype], f"{what}: {err:.2e}"
