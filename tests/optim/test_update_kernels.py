"""The fused AdamW kernels (Triton interpreter) against the torch implementation, and the
blockwise quantizer against its definition.

The 32-bit kernel computes torch's single-tensor AdamW operation by operation with IEEE
division and square root; the only rounding difference left is a multiply-add the compiler
(or NumPy under the interpreter) may fuse, so results agree to a few ulps. The 8-bit kernel
quantizes ``moment / absmax`` to the nearest code; a moment that differs by an ulp can fall on
the other side of a midpoint between two codes, so codes may differ by one, rarely.
"""

from __future__ import annotations

import math

import pytest
import torch

from trilora.kernels.optim import QBLOCK, adamw_step_8bit, adamw_step_32bit
from trilora.optim.blockwise import (
    StepScalars,
    adamw_8bit_,
    adamw_32bit_,
    block_absmax,
    dequantize_blockwise,
    nblocks,
    quant_maps,
    quantize_blockwise,
)

SIZES = (1, 255, 257, 1025, 2049)


EPS32 = torch.finfo(torch.float32).eps


def _assert_ulps(
    got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, ulps: float = 4
) -> None:
    """``|got - want| <= ulps * eps * scale`` elementwise: ``scale`` bounds the magnitudes the
    operation rounded (cancellation makes relative differences of small results meaningless)."""
    err = (got.double() - want.double()).abs()
    bound = ulps * EPS32 * scale.double().abs()
    assert (err <= bound).all(), f"max error {(err / bound).max().item():.2f} x the bound"


def _scalars(gen: torch.Generator, beta1: float | None = None, wd: float | None = None):
    step = float(torch.randint(1, 50, (1,), generator=gen))
    beta1 = beta1 if beta1 is not None else 0.5 + 0.45 * float(torch.rand(1, generator=gen))
    wd = wd if wd is not None else 0.1 * float(torch.rand(1, generator=gen))
    return StepScalars.of(1e-3, (beta1, 0.999), 1e-8, wd, step)


def _moments(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Moments spanning several decades, as real ones do.
    scale = torch.logspace(-6, -1, n).index_select(0, torch.randperm(n, generator=gen))
    m = torch.randn(n, generator=gen) * scale
    v = torch.rand(n, generator=gen) * scale**2
    return m, v


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(
    "p_dtype,g_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_32bit_kernel_matches_torch(seed, n, p_dtype, g_dtype):
    gen = torch.Generator().manual_seed(seed)
    # beta1 < 0.5 takes torch's other lerp formula; wd = 0 skips the decay in torch.
    for beta1, wd in ((None, None), (0.3, 0.0)):
        sc = _scalars(gen, beta1, wd)
        p = torch.randn(n, generator=gen).to(p_dtype)
        g = torch.randn(n, generator=gen).to(g_dtype)
        m, v = _moments(n, gen)
        kp, km, kv = p.clone(), m.clone(), v.clone()
        adamw_step_32bit(kp, g, km, kv, **sc.kernel_args())
        rp, rm, rv = p.float(), m.clone(), v.clone()
        adamw_32bit_(rp, g.float(), rm, rv, sc)
        _assert_ulps(km, rm, m.abs() + g.float().abs())
        _assert_ulps(kv, rv, rv)
        update = sc.step_size * rm.abs() / (rv.sqrt() / sc.bc2_sqrt + sc.eps)
        if p_dtype == torch.float32:
            _assert_ulps(kp, rp, p.abs() + update)
        else:
            # One rounding to the parameter dtype at the end: at most one ulp apart.
            ulp = torch.finfo(p_dtype).eps * rp.abs().clamp_min(torch.finfo(p_dtype).tiny)
            assert ((kp.float() - rp).abs() <= ulp).all()


def _assert_codes_close(kernel: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (kernel.int() - ref.int()).abs()
    assert diff.max() <= 1, "a code moved by more than one step"
    assert (diff > 0).float().mean() < 0.01, "more than 1% of the codes differ"


@pytest.mark.parametrize("n", (*SIZES, 3 * QBLOCK))
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
def test_8bit_kernel_matches_torch(seed, n, p_dtype):
    gen = torch.Generator().manual_seed(seed)
    maps = quant_maps("cpu")
    sc = _scalars(gen)
    m, v = _moments(n, gen)
    q1, a1 = quantize_blockwise(m, maps.bounds1)
    q2, a2 = quantize_blockwise(v, maps.bounds2)
    if n > QBLOCK:  # an all-zero block: absmax 0 in, and zero moments with a zero gradient
        q1[:QBLOCK], a1[0] = 127, 0.0
        q2[:QBLOCK], a2[0] = 0, 0.0
    p = torch.randn(n, generator=gen).to(p_dtype)
    g = torch.randn(n, generator=gen)
    if n > QBLOCK:
        g[:QBLOCK] = 0
    k = [t.clone() for t in (p, q1, q2, a1, a2)]
    adamw_step_8bit(
        k[0], g, *k[1:], maps.qmap1, maps.qmap2, maps.bounds1, maps.bounds2, **sc.kernel_args()
    )
    r = [t.clone() for t in (p, q1, q2, a1, a2)]
    adamw_8bit_(r[0], g, *r[1:], maps, sc)
    _assert_codes_close(k[1], r[1])
    _assert_codes_close(k[2], r[2])
    # absmax: the largest |moment| of a block; the moments agree to a few ulps of their inputs
    # (as in the 32-bit test), so do the maxima.
    m_in = dequantize_blockwise(q1, a1, maps.qmap1)
    _assert_ulps(k[3], r[3], block_absmax(m_in.abs() + g.abs()))
    _assert_ulps(k[4], r[4], r[4])
    if p_dtype == torch.float32:
        m_new = m_in.lerp(g, sc.w1)
        v_new = dequantize_blockwise(q2, a2, maps.qmap2) * sc.beta2 + sc.w2 * g * g
        update = sc.step_size * m_new.abs() / (v_new.sqrt() / sc.bc2_sqrt + sc.eps)
        _assert_ulps(k[0], r[0], p.abs() + update)
    else:
        ulp = torch.finfo(p_dtype).eps * r[0].float().abs().clamp_min(1e-30)
        assert ((k[0].float() - r[0].float()).abs() <= ulp).all()
    if n > QBLOCK:
        assert k[3][0] == 0 and k[4][0] == 0
        assert (k[1][:QBLOCK] == 127).all() and (k[2][:QBLOCK] == 0).all()


def test_kernels_reject_bad_shapes():
    maps = quant_maps("cpu")
    sc = StepScalars.of(1e-3, (0.9, 0.999), 1e-8, 0.0, 1.0).kernel_args()
    p, g = torch.zeros(300), torch.zeros(300)
    with pytest.raises(ValueError, match=r"exp_avg must be torch\.float32"):
        adamw_step_32bit(p, g, torch.zeros(300, dtype=torch.float16), torch.zeros(300), **sc)
    with pytest.raises(ValueError, match="contiguous 1-D tensor of 300"):
        adamw_step_32bit(p, g, torch.zeros(299), torch.zeros(300), **sc)
    q = torch.zeros(300, dtype=torch.uint8)
    with pytest.raises(ValueError, match="absmax1 must be a contiguous 1-D tensor of 2"):
        adamw_step_8bit(
            p,
            g,
            q,
            q.clone(),
            torch.zeros(1),
            torch.zeros(2),
            maps.qmap1,
            maps.qmap2,
            maps.bounds1,
            maps.bounds2,
            **sc,
        )
    with pytest.raises(ValueError, match="p must be fp32, bf16 or fp16"):
        adamw_step_32bit(p.double(), g, torch.zeros(300), torch.zeros(300), **sc)


# ---- the quantizer against its definition -------------------------------------------------


def _nearest_f64(normed: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return (normed.double()[:, None] - qmap.double()[None, :]).abs().argmin(dim=1)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_the_definition(seed, signed):
    maps = quant_maps("cpu")
    qmap, bounds = (maps.qmap1, maps.bounds1) if signed else (maps.qmap2, maps.bounds2)
    gen = torch.Generator().manual_seed(seed)
    n = 40 * QBLOCK
    scale = torch.logspace(-8, 0, n)[torch.randperm(n, generator=gen)]
    x = torch.randn(n, generator=gen) * scale
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, bounds)
    assert torch.equal(absmax, block_absmax(x))
    normed = x.view(-1, QBLOCK) / absmax[:, None]
    expect = _nearest_f64(normed.reshape(-1), qmap)
    # Ties and values within fp32 rounding of a midpoint may go either way; nothing else.
    mid_dist = (
        (normed.reshape(-1).double()[:, None] - bounds[:-1].double()[None, :]).abs().min(1)[0]
    )
    wrong = codes.long() != expect
    assert (mid_dist[wrong] < 1e-7).all()
    # Every code's own value maps back to itself.
    own, _ = quantize_blockwise(
        torch.cat([qmap, torch.zeros(QBLOCK - 256 % QBLOCK or 0)])[:256],
        bounds,
        absmax=torch.ones(1),
    )
    assert torch.equal(own.long(), torch.arange(256))


def test_dequantize_is_code_times_absmax(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 700
    codes = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(nblocks(n), generator=gen)
    qmap = quant_maps("cpu").qmap1
    out = dequantize_blockwise(codes, absmax, qmap)
    expect = torch.tensor(
        [qmap[int(c)].item() * absmax[i // QBLOCK].item() for i, c in enumerate(codes)]
    )
    torch.testing.assert_close(out, expect, rtol=1e-7, atol=0)
    assert not math.isnan(out.sum().item())
