"""Fused QLoRA linear kernels vs a float64 reference, under the Triton interpreter.

Everything that reaches tl.dot uses fp16 activations (bf16 tl.dot is wrong in the interpreter,
triton issue #11584). Tolerances allow for what the GPU does: fp16 rounding of the dequantized
weight and of the output, and tf32 where fp32 LoRA operands reach tl.dot.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import reference_format as ref
import torch

from trilora.kernels.qlora_linear import lora_weight_grads, qlora_backward_input, qlora_forward
from trilora.kernels.quantize import Weight4bit

DT = torch.float16


def make_weight(n, k, blocksize=64, quant_type="nf4", double=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    packed, st = bnbf.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double
    )
    # bitsandbytes' bytes (its quantizer is right), decoded by the format's definition (its
    # CPU dequantizer is wrong for some of these shapes on AVX-512 machines)
    w64 = ref.dequantize_bnb(packed, st)
    if double:
        kw = Weight4bit(
            packed.view(-1),
            st.absmax,
            st.code,
            st.state2.absmax,
            st.state2.code,
            st.offset.reshape(1),
            blocksize,
            n,
            k,
        )
    else:
        kw = Weight4bit(packed.view(-1), st.absmax, st.code, None, None, None, blocksize, n, k)
    return kw, w64


def make_inputs(m, n, k, r, lora_dtype, bias, dropout, seed):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(DT)
    a = b = None
    if r:
        a = (torch.randn(r, k, generator=g) / k**0.5).to(lora_dtype)
        b = (torch.randn(n, r, generator=g) * 0.5).to(lora_dtype)
    bb = torch.randn(n, generator=g).to(DT) if bias else None
    mask = (torch.rand(m, k, generator=g) > 0.3) if (dropout and r) else None
    return x, a, b, bb, mask


def assert_close(out, ref, rtol):
    ref = ref.double()
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    assert err <= rtol * scale, f"max err {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def tol(lora_dtype):
    # fp16 rounding of W and of the output (~2^-11 relative each, accumulated over K), and
    # tf32 (10-bit mantissa, same as fp16) when fp32 LoRA operands meet tl.dot on the GPU.
    return 4e-3


CASES = [
    # m, n, k, blocksize, r, double, lora dtype, bias, dropout, quant type
    (1, 40, 96, 64, 8, False, torch.float32, True, False, "nf4"),
    (3, 33, 200, 64, 16, True, DT, False, True, "nf4"),
    (17, 70, 96, 64, 1, False, DT, True, True, "fp4"),
    (40, 24, 200, 32, 33, True, torch.float32, True, True, "nf4"),
    (5, 48, 64, 128, 0, True, DT, True, False, "nf4"),
    (20, 16, 72, 64, 0, False, DT, False, False, "nf4"),
]


def reference_forward(x, w64, a, b, s, bias, mask, ds):
    x64 = x.double()
    y = x64 @ w64.T
    xa = None
    if a is not None:
        xd = x64 * mask.double() * ds if mask is not None else x64
        xa = xd @ a.double().T
        y = y + s * xa @ b.double().T
    if bias is not None:
        y = y + bias.double()
    return y, xa


@pytest.mark.parametrize("variant", ["tiled", "splitk", "auto"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}n{c[1]}k{c[2]}r{c[4]}")
def test_forward(case, variant):
    m, n, k, bs, r, double, ldt, bias, dropout, qt = case
    if variant == "splitk" and m > 16:
        pytest.skip("split-K is the M <= 16 kernel")
    w, w64 = make_weight(n, k, bs, qt, double, seed=m + n + k)
    x, a, b, bb, mask = make_inputs(m, n, k, r, ldt, bias, dropout, seed=m * k)
    s, ds = 0.7, 1 / 0.7
    y, xa = qlora_forward(x, w, a, b, s, bb, mask, ds, variant=variant)
    y_ref, xa_ref = reference_forward(x, w64, a, b, s, bb, mask, ds)
    assert y.dtype == DT and y.shape == (m, n)
    assert_close(y, y_ref, tol(ldt))
    if r:
        assert xa.dtype == torch.float32 and xa.shape == (m, r)
        assert_close(xa, xa_ref, tol(ldt))
    else:
        assert xa is None


def test_forward_strided_x():
    m, n, k = 6, 20, 96
    w, w64 = make_weight(n, k, 64)
    x_big = torch.randn(k, 2 * m).to(DT)
    x = x_big.T[::2]  # [m, k], non-unit strides in both dims
    a = (torch.randn(4, k) / 10).to(DT)
    b = torch.randn(n, 4).to(DT)
    for variant in ("tiled", "splitk"):
        y, _ = qlora_forward(x, w, a, b, 2.0, None, None, 1.0, variant=variant)
        y_ref, _ = reference_forward(x, w64, a, b, 2.0, None, None, 1.0)
        assert_close(y, y_ref, 4e-3)


def test_forward_bf16_no_lora_splitk():
    # bf16 paths that avoid tl.dot numerics in the interpreter: only check shape/dtype and the
    # bias-only epilogue with a zero input.
    w, _ = make_weight(24, 64, 64)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    bias = torch.randn(24).to(torch.bfloat16)
    y, xa = qlora_forward(x, w, None, None, 1.0, bias, None, 1.0, variant="splitk")
    assert y.dtype == torch.bfloat16 and xa is None
    assert torch.equal(y, bias.expand(2, 24))


BWD_CASES = [
    (1, 40, 96, 64, 8, False, torch.float32, True, "nf4"),
    (17, 33, 200, 64, 16, True, DT, True, "fp4"),
    (40, 70, 72, 32, 33, True, torch.float32, False, "nf4"),
    (3, 24, 64, 64, 0, False, DT, False, "nf4"),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: f"m{c[0]}n{c[1]}k{c[2]}r{c[4]}")
def test_backward(case):
    m, n, k, bs, r, double, ldt, dropout, qt = case
    w, w64 = make_weight(n, k, bs, qt, double, seed=n + k)
    x, a, b, _, mask = make_inputs(m, n, k, r, ldt, False, dropout, seed=m + 7)
    g = torch.Generator().manual_seed(m * n)
    dy = torch.randn(m, n, generator=g).to(DT)
    s, ds = 1.5, 1 / 0.7
    dx, dyb = qlora_backward_input(dy, w, a, b, s, mask, ds)
    dy64 = dy.double()
    dx_ref = dy64 @ w64
    if r:
        dyb_ref = dy64 @ b.double()
        lo = dyb_ref @ a.double()
        if mask is not None:
            lo = lo * mask.double() * ds
        dx_ref = dx_ref + s * lo
        assert dyb.dtype == torch.float32 and dyb.shape == (m, r)
        assert_close(dyb, dyb_ref, tol(ldt))
    else:
        assert dyb is None
    assert dx.dtype == DT and dx.shape == (m, k)
    assert_close(dx, dx_ref, tol(ldt))
    if not r:
        return
    xa = (x.double() * (mask.double() * ds if mask is not None else 1)) @ a.double().T
    da, db = lora_weight_grads(x, dy, xa.float(), dyb, s, mask, ds)
    xd = x.double() * mask.double() * ds if mask is not None else x.double()
    assert da.dtype == torch.float32 and da.shape == (r, k)
    assert db.dtype == torch.float32 and db.shape == (n, r)
    assert_close(da, s * dyb.double().T @ xd, 2e-3)
    assert_close(db, s * dy64.T @ xa, 2e-3)


def test_weight_grads_split_m():
    # M large enough that the launcher splits M across programs (fp32 atomics).
    m, n, k, r = 300, 8, 16, 4
    x = torch.randn(m, k).to(DT)
    dy = torch.randn(m, n).to(DT)
    xa = torch.randn(m, r)
    dyb = torch.randn(m, r)
    da, db = lora_weight_grads(x, dy, xa, dyb, 0.5, None, 1.0)
    assert_close(da, 0.5 * dyb.double().T @ x.double(), 2e-3)
    assert_close(db, 0.5 * dy.double().T @ xa.double(), 2e-3)


# ------------------------------------------------------------------ bad input


def test_bad_inputs():
    w, _ = make_weight(16, 32, 32)
    x = torch.randn(2, 32).to(DT)
    a = torch.randn(4, 32).to(DT)
    b = torch.randn(16, 4).to(DT)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        qlora_forward(x.float(), w, a, b, 1.0, None, None, 1.0)
    with pytest.raises(ValueError, match=r"K=32"):
        qlora_forward(torch.randn(2, 31).to(DT), w, a, b, 1.0, None, None, 1.0)
    with pytest.raises(ValueError, match=r"lora_b must be \[N=16, r=4\]"):
        qlora_forward(x, w, a, b.T.contiguous(), 1.0, None, None, 1.0)
    with pytest.raises(ValueError, match="lora_a must be fp32 or"):
        qlora_forward(x, w, a.to(torch.bfloat16), b, 1.0, None, None, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        qlora_forward(x, w, a, b, 1.0, torch.zeros(16), None, 1.0)
    with pytest.raises(ValueError, match="dropout_mask must be"):
        qlora_forward(x, w, a, b, 1.0, None, torch.ones(2, 31, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="variant"):
        qlora_forward(x, w, a, b, 1.0, None, None, 1.0, variant="fast")
    with pytest.raises(ValueError, match="packed must be uint8"):
        qlora_forward(x, w._replace(packed=w.packed[:-1]), a, b, 1.0, None, None, 1.0)
    with pytest.raises(ValueError, match="absmax must be fp32 or uint8"):
        qlora_forward(x, w._replace(absmax=w.absmax.half()), a, b, 1.0, None, None, 1.0)
    with pytest.raises(ValueError, match="nested_absmax"):
        qlora_forward(
            x, w._replace(absmax=w.absmax.to(torch.uint8)), None, None, 1.0, None, None, 1.0
        )
    with pytest.raises(ValueError, match=r"dy must be \[M, N=16\]"):
        qlora_backward_input(torch.randn(2, 15).to(DT), w, a, b, 1.0, None, 1.0)
    with pytest.raises(ValueError, match="xa must be fp32"):
        lora_weight_grads(
            x,
            torch.randn(2, 16).to(DT),
            torch.randn(2, 4).half(),
            torch.randn(2, 4),
            1.0,
            None,
            1.0,
        )
