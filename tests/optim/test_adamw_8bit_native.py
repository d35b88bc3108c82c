"""The native CPU 8-bit AdamW update (``csrc/cpu/adamw_8bit.cpp``) against the torch path
(:func:`trilora.optim.blockwise.adamw_8bit_`) and a float64 model of the scheme.

The kernel computes the torch path's operations in its order with the same roundings, so
codes and absmax are equal bit for bit. One operation differs: torch's ``sqrt`` on a
contiguous fp32 tensor goes through MKL (VML_HA) in MKL builds, which is not correctly
rounded (one ulp off for ~16% of the values on the AMD EPYC these tests were written on);
the kernel takes the IEEE square root. The square root only feeds the parameter, so
parameters are compared bit for bit with the torch path computed with a correctly rounded
square root, and to one rounding of the update with the torch path as it is.
"""

from __future__ import annotations

import pytest
import torch

from trilora.optim import AdamW8bit
from trilora.optim.blockwise import (
    QBLOCK,
    StepScalars,
    adamw_8bit_,
    adamw_8bit_native_,
    nblocks,
    nearest_code_lut,
    quant_maps,
    quantize_blockwise,
)

EPS32 = torch.finfo(torch.float32).eps
# (parameter, gradient) dtypes: the gradient as the parameter, fp32 for low-precision
# parameters, and a float64 gradient (rounded to fp32 before the kernel, as the torch path).
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float64),
]
SIZES = (1, 255, 256, 257, 4097, 5 * QBLOCK + 77)


def _ext():
    from trilora.native import cpu_ext

    ext = cpu_ext.load()
    if ext is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_ext.reason()}")
    return ext


def _isas() -> list[str]:
    order = ["scalar", "avx2"]  # AVX-512 CPUs run the AVX2 loop
    return order if _ext().best_isa() != "scalar" else order[:1]


def _torch_path(p, g, s1, s2, a1, a2, maps, sc, exact_sqrt: bool):
    """:func:`adamw_8bit_` on copies, as AdamW's fallback calls it (fp32 work tensor, fp32
    gradient); ``exact_sqrt``: with torch's square root replaced by the correctly rounded one
    (float64, then fp32: rounding twice is exact for a square root)."""
    out = [t.clone() for t in (p, s1, s2, a1, a2)]
    work = out[0].float()
    sqrt = torch.Tensor.sqrt
    if exact_sqrt:
        torch.Tensor.sqrt = lambda self: sqrt(self.double()).float()  # type: ignore[method-assign]
    try:
        adamw_8bit_(work, g.float(), *out[1:], maps, sc)
    finally:
        torch.Tensor.sqrt = sqrt  # type: ignore[method-assign]
    out[0].copy_(work)
    return out


def _state(n: int, gen: torch.Generator, maps):
    """Moments spanning several decades (as real ones do), quantized; the first block all
    zero (absmax 0) when there are several."""
    scale = torch.logspace(-6, -1, n).index_select(0, torch.randperm(n, generator=gen))
    m = torch.randn(n, generator=gen) * scale
    v = torch.rand(n, generator=gen) * scale**2
    if n > QBLOCK:
        m[:QBLOCK] = 0
        v[:QBLOCK] = 0
    q1, a1 = quantize_blockwise(m, maps.bounds1)
    q2, a2 = quantize_blockwise(v, maps.bounds2)
    return q1, q2, a1, a2


def _assert_one_rounding(
    got: torch.Tensor, want: torch.Tensor, p0: torch.Tensor, sc: StepScalars
) -> None:
    """``got`` and ``want`` are the same update up to one ulp of the square root: at most
    two ulps of the update apart before the parameter's final rounding."""
    if got.dtype == torch.float32:
        update = want - p0 * (sc.decay if sc.weight_decay else 1.0)
        bound = EPS32 * (want.abs() + 2 * update.abs())
        assert ((got - want).abs() <= bound).all()
    else:  # one rounding of nearly the same fp32 value to the dtype: one ulp at most
        ulp = torch.finfo(got.dtype).eps * want.float().abs().clamp_min(1e-30)
        assert ((got.float() - want.float()).abs() <= ulp).all()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p_dtype,g_dtype", DTYPES, ids=str)
def test_native_matches_the_torch_path(seed, n, p_dtype, g_dtype):
    gen = torch.Generator().manual_seed(seed)
    maps = quant_maps("cpu")
    state = _state(n, gen, maps)
    p = torch.randn(n, generator=gen).to(p_dtype)
    # beta1 < 0.5 takes torch's other lerp formula; weight_decay 0 skips the decay
    for step, (beta1, wd) in enumerate([(0.9, 0.01), (0.3, 0.0), (0.95, 0.1)], start=1):
        sc = StepScalars.of(2e-3, (beta1, 0.999), 1e-8, wd, step)
        g = torch.randn(n, generator=gen) * 10 ** (-3 * float(torch.rand(1, generator=gen)))
        if n > QBLOCK:
            g[:QBLOCK] = 0  # the zero block stays zero: absmax 0
        g = g.to(g_dtype)
        exact = _torch_path(p, g, *state, maps, sc, exact_sqrt=True)
        plain = _torch_path(p, g, *state, maps, sc, exact_sqrt=False)
        for isa in _isas():
            got = [t.clone() for t in (p, *state)]
            assert adamw_8bit_native_(got[0], g, *got[1:], maps, sc, isa=isa)
            for name, a, b in zip(("p", "state1", "state2", "absmax1", "absmax2"), got, exact):
                assert torch.equal(a, b), f"{name} differs ({isa}, step {step})"
            for a, b in zip(got[1:], plain[1:]):
                assert torch.equal(a, b)  # the codes and absmax do not involve the sqrt
            _assert_one_rounding(got[0], plain[0], p, sc)
        p, state = got[0], tuple(got[1:])
    if n > QBLOCK:
        assert state[2][0] == 0 and state[3][0] == 0


def test_large_tensor_on_several_threads(seed):
    """More blocks than one task takes: the blocks split between threads, results unchanged."""
    gen = torch.Generator().manual_seed(seed)
    maps = quant_maps("cpu")
    n = 200 * QBLOCK + int(torch.randint(1, QBLOCK, (1,), generator=gen))
    state = _state(n, gen, maps)
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = torch.randn(n, generator=gen) * 1e-2
    sc = StepScalars.of(1e-3, (0.9, 0.999), 1e-8, 0.01, 7)
    want = _torch_path(p, g, *state, maps, sc, exact_sqrt=True)
    torch.set_num_threads(2)  # the autouse fixture restores the count
    for isa in _isas():
        got = [t.clone() for t in (p, *state)]
        assert adamw_8bit_native_(got[0], g, *got[1:], maps, sc, isa=isa)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), isa


def _tie_values(bounds: torch.Tensor, ulps: int = 2) -> torch.Tensor:
    """Every midpoint and its neighbours within ``ulps`` floats."""
    mids = bounds[:-1]
    out = [mids]
    up, down = mids.clone(), mids.clone()
    for _ in range(ulps):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(float("-inf")))
        out += [up, down]
    return torch.cat(out)


def _blocks_with_absmax(values: torch.Tensor, top: float) -> torch.Tensor:
    """``values`` in blocks of 255 with ``top`` first in each block (the block's absmax)."""
    chunks = values.split(QBLOCK - 1)
    return torch.cat([torch.cat([torch.tensor([top]), c]) for c in chunks])


@pytest.mark.parametrize("moment", ["first", "second"])
def test_ties_round_as_the_torch_path(seed, moment):
    """Moments that land exactly on a midpoint between two codes (and a few ulps either
    side): the code of the torch path (bucketize: the lower one at a tie) in every loop.

    From zero state the update gives the moments exactly: with beta1 = 0.5 the first moment
    is g / 2, with beta2 = 0 the second is g * g rounded once; one element per block sets the
    block's absmax to 1, so the normalized moment is the moment itself."""
    maps = quant_maps("cpu")
    gen = torch.Generator().manual_seed(seed)
    if moment == "first":
        targets = _tie_values(maps.bounds1)
        g = _blocks_with_absmax(2 * targets, 2.0)  # m = g / 2 exactly
        betas = (0.5, 0.999)
    else:
        targets = _tie_values(maps.bounds2)
        roots = targets.double().sqrt().float()
        near = [roots]
        for direction in (float("inf"), float("-inf")):
            near.append(torch.nextafter(roots, torch.tensor(direction)))
        g = _blocks_with_absmax(torch.cat(near), 1.0)  # v = g * g rounded
        betas = (0.9, 0.0)
    n = g.numel()
    sc = StepScalars.of(1e-3, betas, 1e-8, 0.0, 1)
    zero = (
        torch.zeros(n, dtype=torch.uint8),
        torch.zeros(n, dtype=torch.uint8),
        torch.zeros(nblocks(n)),
        torch.zeros(nblocks(n)),
    )
    p = torch.randn(n, generator=gen)
    want = _torch_path(p, g, *zero, maps, sc, exact_sqrt=True)
    key, amax, bounds = (1, 3, maps.bounds1) if moment == "first" else (2, 4, maps.bounds2)
    assert (want[amax] == 1).all()
    # the moments the update produced, normalized by 1: count the exact ties among them
    values = g / 2 if moment == "first" else (g.double() * g.double()).float()
    ties = torch.isin(values, bounds[:-1])
    assert int(ties.sum()) >= (200 if moment == "first" else 50), "too few exact ties"
    tied_code = torch.bucketize(values[ties], bounds[:-1])
    assert torch.equal(want[key][ties].long(), tied_code)  # the lower code at a tie
    for isa in _isas():
        got = [t.clone() for t in (p, *zero)]
        assert adamw_8bit_native_(got[0], g, *got[1:], maps, sc, isa=isa)
        for a, b in zip(got, want):
            assert torch.equal(a, b), isa


def test_nan_and_inf_gradients_follow_the_torch_path(seed):
    """A NaN gradient makes its block's absmax NaN: the torch path then divides by 1 and
    bucketize sends NaN to code 255; an infinite one gives an infinite absmax. The kernel
    does the same, and the other blocks are untouched by it."""
    gen = torch.Generator().manual_seed(seed)
    maps = quant_maps("cpu")
    n = 4 * QBLOCK + 9
    state = _state(n, gen, maps)
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * 1e-2
    g[int(torch.randint(QBLOCK, 2 * QBLOCK, (1,), generator=gen))] = float("nan")
    g[int(torch.randint(2 * QBLOCK, 3 * QBLOCK, (1,), generator=gen))] = float("inf")
    g[-1] = float("nan")  # in the ragged last block
    # with a NaN absmax the moments are quantized unscaled: some beyond [-1, 1]
    g[-9:-1] *= 1e4
    sc = StepScalars.of(1e-3, (0.9, 0.999), 1e-8, 0.01, 3)
    want = _torch_path(p, g, *state, maps, sc, exact_sqrt=True)
    assert want[3][1].isnan() and want[3][2].isinf() and want[3][-1].isnan()
    for isa in _isas():
        got = [t.clone() for t in (p, *state)]
        assert adamw_8bit_native_(got[0], g, *got[1:], maps, sc, isa=isa)
        for a, b in zip(got, want):
            if a.is_floating_point():
                assert torch.equal(a.isnan(), b.isnan()), isa
                a, b = a[~a.isnan()], b[~b.isnan()]
            assert torch.equal(a, b), isa
    assert (want[1][-9:-1] == 0).any() or (want[1][-9:-1] == 255).any()


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_native_matches_a_float64_model(seed, p_dtype):
    """Each step against the scheme's definition in float64 from the state before it:
    dequantize, torch's AdamW update, a fresh absmax per block, the nearest code."""
    _ext()
    gen = torch.Generator().manual_seed(seed)
    maps = quant_maps("cpu")
    q1, q2 = maps.qmap1.double(), maps.qmap2.double()
    n = 3 * QBLOCK + int(torch.randint(1, QBLOCK, (1,), generator=gen))
    lr, betas, eps, wd = 2e-3, (0.9, 0.999), 1e-8, 0.01
    state = _state(n, gen, maps)
    p = (torch.randn(n, generator=gen) * 0.1).to(p_dtype)
    idx = torch.arange(n) // QBLOCK
    for step in range(1, 6):
        g = torch.randn(n, generator=gen) * 0.01 * step
        s1, s2, a1, a2 = (t.clone() for t in state)
        got = [t.clone() for t in (p, *state)]
        assert adamw_8bit_native_(
            got[0], g, *got[1:], maps, StepScalars.of(lr, betas, eps, wd, step)
        )
        m = q1[s1.long()] * a1.double()[idx]
        v = q2[s2.long()] * a2.double()[idx]
        g64 = g.double()
        m = m + (1 - betas[0]) * (g64 - m)
        v = betas[1] * v + (1 - betas[1]) * g64 * g64
        p64 = p.double() * (1 - lr * wd) - lr / (1 - betas[0] ** step) * m / (
            v.sqrt() / (1 - betas[1] ** step) ** 0.5 + eps
        )
        tol = 8 * EPS32 if p_dtype == torch.float32 else torch.finfo(p_dtype).eps
        assert ((got[0].double() - p64).abs() <= tol * p64.abs().clamp_min(1e-3)).all()
        for codes, absmax, moment, qmap in ((got[1], got[3], m, q1), (got[2], got[4], v, q2)):
            padded = torch.nn.functional.pad(moment.abs(), (0, nblocks(n) * QBLOCK - n))
            want_absmax = padded.view(-1, QBLOCK).amax(1)
            torch.testing.assert_close(absmax.double(), want_absmax, rtol=4 * EPS32, atol=0)
            normed = moment / torch.where(want_absmax > 0, want_absmax, 1)[idx]
            nearest = (normed[:, None] - qmap[None, :]).abs().argmin(1)
            wrong = codes.long() != nearest
            mids = (qmap[:-1] + qmap[1:]) / 2
            near_mid = (normed[wrong][:, None] - mids[None, :]).abs().min(1)[0] < 1e-6
            assert near_mid.all(), f"step {step}: a code that is not the nearest"
        p, state = got[0], tuple(got[1:])


def test_lut_candidates_are_bucketize(seed):
    """The requantizing table's rule (candidate c, plus one where bounds[c] < x) against
    torch.bucketize on every midpoint and its neighbours, the edges of the table's keys and
    random values in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    maps = quant_maps("cpu")
    for bounds, lut in ((maps.bounds1, maps.lut1), (maps.bounds2, maps.lut2)):
        assert torch.equal(lut, nearest_code_lut(bounds))
        edges = torch.arange(104 << 8, (0x3F800000 >> 15) + 1, dtype=torch.int64) << 15
        edges = torch.cat([edges, edges - 1]).clamp_min(0).to(torch.int32).view(torch.float32)
        x = torch.cat(
            [
                _tie_values(bounds, ulps=3),
                edges,
                torch.rand(20000, generator=gen) * 2 - 1,
                torch.rand(2000, generator=gen) * 1e-6,
                torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]),
            ]
        )
        x = torch.cat([x, -x]).clamp(-1, 1)
        bits = x.view(torch.int32).long()
        key = ((bits & 0x7FFFFFFF) >> 15).clamp(104 << 8, 0x3F800000 >> 15) - (104 << 8)
        cand = lut[key + (bits < 0).long() * ((lut.numel() - 4) // 2)].long()
        codes = cand + (~(bounds[cand] >= x)).long()
        assert torch.equal(codes, torch.bucketize(x, bounds[:-1]))


def test_native_declines_what_it_does_not_serve():
    """Not-contiguous or float64 parameters and non-CPU maps: ``False`` and nothing changed,
    so the caller runs the torch path."""
    _ext()
    maps = quant_maps("cpu")
    n = 2 * QBLOCK
    state = (
        torch.zeros(n, dtype=torch.uint8),
        torch.zeros(n, dtype=torch.uint8),
        torch.zeros(2),
        torch.zeros(2),
    )
    sc = StepScalars.of(1e-3, (0.9, 0.999), 1e-8, 0.0, 1)
    g = torch.ones(n)
    strided = torch.zeros(n, 2)[:, 0]
    assert not adamw_8bit_native_(strided, g, *state, maps, sc)
    assert not adamw_8bit_native_(torch.zeros(n, dtype=torch.float64), g, *state, maps, sc)
    no_tables = type(maps)(maps.qmap1, maps.qmap2, maps.bounds1, maps.bounds2)
    assert not adamw_8bit_native_(torch.zeros(n), g, *state, no_tables, sc)
    assert (strided == 0).all() and all((t == 0).all() for t in state)
    with pytest.raises(RuntimeError, match="absmax1/absmax2 must be contiguous fp32 with 2"):
        adamw_8bit_native_(torch.zeros(n), g, *state[:2], torch.zeros(3), state[3], maps, sc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adamw8bit_takes_the_native_path_and_falls_back(seed, monkeypatch, dtype):
    """AdamW8bit on CPU parameters steps through the kernel; without the extension (as when
    it cannot be built) through the torch path, with the same state."""
    _ext()
    from trilora.native import cpu_ext

    gen = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(40, 90, (1,), generator=gen)), 131), (4099,), (7, 5)]
    init = [torch.randn(s, generator=gen).to(dtype) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) * 0.01 for s in shapes] for _ in range(4)]
    calls = []
    real = cpu_ext.load()

    class Counting:
        def __getattr__(self, name):
            if name == "adamw_8bit_step":
                calls.append(name)
            return getattr(real, name)

    runs = []
    for native in (True, False):
        monkeypatch.setattr(cpu_ext, "load", (lambda: Counting()) if native else (lambda: None))
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = AdamW8bit(params, lr=2e-3, weight_decay=0.01)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    assert len(calls) == 2 * len(grads)  # the two tensors with 8-bit state, every step
    (ours, opt), (ref, ref_opt) = runs
    for a, b in zip(ours, ref):
        assert a.dtype == dtype
        assert (
            (a.float() - b.float()).abs() <= 4 * torch.finfo(dtype).eps * b.float().abs() + 1e-6
        ).all()
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in opt.state[a]:
                assert torch.equal(opt.state[a][key], ref_opt.state[b][key]), key
