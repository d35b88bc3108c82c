"""trilora.optim.AdamW: parity with torch and bitsandbytes, paging, state dicts, bad input.

References:

* 32-bit: ``torch.optim.AdamW(foreach=False)``. On CPU tensors our update is torch's fused
  CPU kernel, which rounds differently from the per-op loop by about one ulp per step; under
  the Triton backend (interpreter) it is our kernel, the per-op loop's operations in order.
  Either way parameters agree to fp32 rounding: a few ulps, accumulated over the steps.
* 8-bit: bitsandbytes' ``AdamW8bit`` (its CPU backend) fed our state bytes each step (the
  layouts are the same), and a float64 model of the blockwise scheme written here from its
  definition.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from trilora.config import override
from trilora.optim import (
    OPTIMIZERS,
    AdamW,
    AdamW8bit,
    OptimizerInputError,
    PagedAdamW,
    PagedAdamW8bit,
    ParameterTypeError,
    StateDictLayoutError,
    create,
    to_bitsandbytes,
)
from trilora.optim.adamw import host_kernel_is_fused
from trilora.optim.blockwise import QBLOCK, nblocks, quant_maps
from trilora.optim.paging import auto_moves, page_elems, state_nbytes

EPS32 = torch.finfo(torch.float32).eps
HP = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
PAGE = 8 << 10  # small pages, so that one parameter spans several


def _shapes(seed: int, big: int = 2) -> list[tuple[int, ...]]:
    """Awkward shapes: some above 4,096 elements (8-bit state), some below, a vector."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(big):
        rows = int(torch.randint(41, 90, (1,), generator=gen))
        out.append((rows, int(torch.randint(101, 130, (1,), generator=gen))))
    out.append((int(torch.randint(17, 60, (1,), generator=gen)), 19))
    out.append((int(torch.randint(3, 300, (1,), generator=gen)),))
    return out


class Batch:
    """Fixed initial values and a gradient stream (fresh draws per seed)."""

    def __init__(self, seed: int, steps: int, big: int = 2):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = _shapes(seed, big)
        self.init = [torch.randn(s, generator=gen) * 0.1 for s in self.shapes]
        # Gradients of changing scale, and a parameter that sometimes has none.
        self.grads = [
            [torch.randn(s, generator=gen) * (0.01 + 0.05 * (t % 3)) for s in self.shapes]
            for t in range(steps)
        ]

    def params(self, dtype=torch.float32) -> list[nn.Parameter]:
        return [nn.Parameter(t.clone().to(dtype)) for t in self.init]

    def groups(self, params):
        return [
            {"params": params[:1], "lr": 3e-3},
            {"params": params[1:3], "weight_decay": 0.0},
            {"params": params[3:]},
        ]

    def feed(self, params, step: int) -> None:
        for i, (p, g) in enumerate(zip(params, self.grads[step])):
            skip = i == len(params) - 1 and step % 4 == 3
            p.grad = None if skip else g.clone().to(p.dtype)


def _run(opt, params, batch: Batch, steps: range, backend: str = "auto", sched=None):
    traj = []
    with override(backend=backend):
        for t in steps:
            batch.feed(params, t)
            opt.step()
            if sched is not None:
                sched.step()
            traj.append([p.detach().clone() for p in params])
    return traj


def _assert_ulps(ours, ref, ulps: float, where: str, moved: float = 1e-3) -> None:
    """``|ours - ref| <= ulps * eps * (|ref| + moved)``: rounding differences scale with the
    parameter and with the distance the updates have moved it (``moved``)."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        bound = ulps * EPS32 * (b.abs() + moved)
        err = (a - b).abs()
        assert (err <= bound).all(), f"{where} param {i}: error {(err / bound).max():.2f} x bound"


# ---- 32-bit parity with torch ---------------------------------------------------------------


@pytest.mark.parametrize("backend,steps", [("auto", 100), ("triton", 12)])
def test_32bit_matches_torch_adamw(seed, backend, steps):
    batch = Batch(seed, steps, big=1 if backend == "triton" else 2)
    ours, ref = batch.params(), batch.params()
    opt = AdamW(batch.groups(ours), **HP)
    ref_opt = torch.optim.AdamW(batch.groups(ref), **HP, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.05 * s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1 / (1 + 0.05 * s))
    got = _run(opt, ours, batch, range(steps), backend, sched)
    want = _run(ref_opt, ref, batch, range(steps), "auto", ref_sched)
    lr = max(g["lr"] for g in opt.param_groups)
    for t in range(steps):
        # Rounding differences of a few ulps per step, random-walking over the steps.
        _assert_ulps(got[t], want[t], 8 * (t + 1) ** 0.5 + 8, f"step {t}", lr * (t + 1))
    moved = max((a - b).abs().max() for a, b in zip(got[-1], batch.init))
    assert moved > 100 * EPS32  # the parameters really moved
    if backend == "auto" and host_kernel_is_fused():
        # The CPU update is torch's fused kernel on our state: bit for bit the same as it.
        fused = batch.params()
        fused_opt = torch.optim.AdamW(batch.groups(fused), **HP, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(fused_opt, lambda s: 1 / (1 + 0.05 * s))
        for a, b in zip(got, _run(fused_opt, fused, batch, range(steps), "auto", sched)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_transformers_scheduler_and_clipping(seed):
    from transformers import get_linear_schedule_with_warmup

    batch = Batch(seed, 8)
    ours, ref = batch.params(), batch.params()
    opt = AdamW(ours, **HP)
    ref_opt = torch.optim.AdamW(ref, **HP, foreach=False)
    scheds = [get_linear_schedule_with_warmup(o, 3, 8) for o in (opt, ref_opt)]
    for t in range(8):
        for params, o, s in ((ours, opt, scheds[0]), (ref, ref_opt, scheds[1])):
            batch.feed(params, t)
            torch.nn.utils.clip_grad_norm_(params, 0.05)
            o.step()
            s.step()
            o.zero_grad()
            assert all(p.grad is None for p in params)
        _assert_ulps(ours, ref, 16, f"step {t}")
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_closure_and_steps_without_gradients(seed):
    batch = Batch(seed, 2)
    params = batch.params()
    opt = AdamW(params, **HP)
    assert opt.step() is None and not opt.state  # no gradients: nothing happens
    batch.feed(params, 0)
    assert opt.step(lambda: torch.tensor(3.0)) == 3.0
    assert len(opt.state) == len(params)
    assert all(float(s["step"]) == 1 for s in opt.state.values())


# ---- 8-bit parity -----------------------------------------------------------------------------


class Float64Blockwise:
    """The 8-bit AdamW scheme computed in float64 from its definition: dequantize
    ``qmap[code] * absmax``, torch's AdamW update, fresh absmax per 256 elements, nearest code
    (argmin of the distance to the 256 map values)."""

    def __init__(self):
        maps = quant_maps("cpu")
        self.q1, self.q2 = maps.qmap1.double(), maps.qmap2.double()

    def _quant(self, x, qmap):
        n = x.numel()
        blocks = torch.nn.functional.pad(x, (0, nblocks(n) * QBLOCK - n)).view(-1, QBLOCK)
        absmax = blocks.abs().amax(1)
        normed = (blocks / torch.where(absmax > 0, absmax, 1)[:, None]).reshape(-1)[:n]
        dist = (normed[:, None] - qmap[None, :]).abs()
        return dist.argmin(1), absmax, normed

    def step(self, p, g, st, lr, betas, eps, wd, step):
        n = p.numel()
        idx = torch.arange(n) // QBLOCK
        m = self.q1[st["state1"].reshape(-1).long()] * st["absmax1"].double()[idx]
        v = self.q2[st["state2"].reshape(-1).long()] * st["absmax2"].double()[idx]
        g = g.reshape(-1).double()
        p = p.reshape(-1).double() * (1 - lr * wd)
        m = m + (1 - betas[0]) * (g - m)
        v = betas[1] * v + (1 - betas[1]) * g * g
        bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
        p = p - lr / bc1 * m / (v.sqrt() / bc2**0.5 + eps)
        c1, a1, n1 = self._quant(m, self.q1)
        c2, a2, n2 = self._quant(v, self.q2)
        return p, (c1, a1, n1), (c2, a2, n2)


def _near_midpoint(normed: torch.Tensor, qmap: torch.Tensor, tol: float) -> torch.Tensor:
    mids = (qmap[:-1] + qmap[1:]) / 2
    return (normed[:, None] - mids[None, :]).abs().min(1)[0] < tol


# Every step is checked from the exact state before it, so the steps are independent draws,
# not accumulated error: 30 (the suite ran 100 until it was cut down) check thousands of
# elements across the moments' growth from zero.
@pytest.mark.parametrize("backend,steps", [("auto", 30), ("triton", 6)])
def test_8bit_matches_a_float64_model_step_by_step(seed, backend, steps):
    batch = Batch(seed, steps, big=1 if backend == "triton" else 2)
    params = batch.params()
    opt = AdamW8bit(params, **HP)
    model = Float64Blockwise()
    eight = [i for i, p in enumerate(params) if p.numel() >= 4096]
    assert eight
    with override(backend=backend):
        for t in range(steps):
            batch.feed(params, t)
            before = {
                i: (params[i].detach().clone(), copy.deepcopy(opt.state[params[i]]))
                for i in eight
                if params[i].grad is not None and params[i] in opt.state
            }
            opt.step()
            for i, (p0, st) in before.items():
                st = {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                p64, (c1, a1, n1), (c2, a2, n2) = model.step(
                    p0,
                    params[i].grad,
                    st,
                    HP["lr"],
                    HP["betas"],
                    HP["eps"],
                    HP["weight_decay"],
                    t + 1,
                )
                new = opt.state[params[i]]
                # The parameter: fp32 rounding of the float64 value (a few ulps).
                err = (params[i].detach().reshape(-1).double() - p64).abs()
                assert (err <= 8 * EPS32 * p64.abs().clamp_min(1e-3)).all(), f"step {t}"
                torch.testing.assert_close(new["absmax1"].double(), a1, rtol=4 * EPS32, atol=0)
                torch.testing.assert_close(new["absmax2"].double(), a2, rtol=4 * EPS32, atol=0)
                # Codes: the nearest ones, except within fp32 rounding of a midpoint.
                for ours, want, normed, qmap in (
                    (new["state1"], c1, n1, model.q1),
                    (new["state2"], c2, n2, model.q2),
                ):
                    wrong = ours.reshape(-1).long() != want
                    assert _near_midpoint(normed[wrong], qmap, 1e-6).all(), f"step {t}"


def test_8bit_matches_bitsandbytes_from_the_same_state(seed):
    """bitsandbytes' AdamW8bit and ours, fed the same state bytes, gradient and parameter at
    each of 100 steps: the parameters agree to fp32 rounding (both update from the fresh
    moments before requantizing) and the codes agree except next to a midpoint, where
    bitsandbytes' CPU quantizer (a 65,536-entry lookup table over [-1, 1], resolution
    3.1e-5) may round to the farther code."""
    bnb = pytest.importorskip("bitsandbytes")
    batch = Batch(seed, 100)
    theirs, ours = batch.params(), batch.params()
    bnb_opt = bnb.optim.AdamW8bit(theirs, **HP)
    opt = AdamW8bit(ours, **HP)
    maps = quant_maps("cpu")
    mismatched = total = 0
    for t in range(100):
        if t:
            opt.load_state_dict(copy.deepcopy(bnb_opt.state_dict()))
            with torch.no_grad():
                for a, b in zip(ours, theirs):
                    a.copy_(b)
        batch.feed(theirs, t)
        batch.feed(ours, t)
        bnb_opt.step()
        opt.step()
        _assert_ulps(ours, theirs, 4, f"step {t}")
        for a, b in zip(ours, theirs):
            if a not in opt.state or "state1" not in opt.state[a]:
                continue
            mine, their = opt.state[a], bnb_opt.state[b]
            for key, amax, qmap in (
                ("state1", "absmax1", maps.qmap1),
                ("state2", "absmax2", maps.qmap2),
            ):
                torch.testing.assert_close(mine[amax], their[amax], rtol=4 * EPS32, atol=0)
                c_ours, c_bnb = mine[key].reshape(-1).long(), their[key].reshape(-1).long()
                # bitsandbytes' code is the nearest one to the value rounded to its table's
                # grid (step 2/65535): in normalized units it lies within the gap next to
                # our (nearest) code plus one grid step of ours.
                gap = torch.cat([qmap[1:] - qmap[:-1], torch.zeros(1)])
                spacing = torch.maximum(gap[c_ours], gap[(c_ours - 1).clamp_min(0)])
                off = (qmap[c_ours] - qmap[c_bnb]).abs()
                assert (off <= spacing + 2 / 65535).all(), f"step {t} {key}"
                mismatched += int((c_ours != c_bnb).sum())
                total += c_ours.numel()
    print(f"codes that differ from bitsandbytes': {mismatched / total:.3%}")
    assert mismatched / total < 0.02


def test_8bit_state_moves_to_bitsandbytes_and_back(seed):
    bnb = pytest.importorskip("bitsandbytes")
    batch = Batch(seed, 6)
    ours, theirs = batch.params(), batch.params()
    opt = AdamW8bit(ours, **HP)
    _run(opt, ours, batch, range(3))
    saved = to_bitsandbytes(opt.state_dict())
    bnb_opt = bnb.optim.AdamW8bit(theirs, **HP)
    with torch.no_grad():
        for a, b in zip(theirs, ours):
            a.copy_(b)
    bnb_opt.load_state_dict(copy.deepcopy(saved))
    renamed = {"exp_avg": "state1", "exp_avg_sq": "state2"}  # 32-bit state of small tensors
    for a, b in zip(ours, theirs):
        for key, value in opt.state[a].items():
            other = bnb_opt.state[b][renamed.get(key, key)]
            if key == "step":
                assert other == int(value)
            else:
                assert torch.equal(value.reshape(other.shape), other), key
    # ... and bitsandbytes' state dict (FSDP-wrapped, int steps) loads back byte for byte.
    fresh = AdamW8bit(batch.params(), **HP)
    fresh.load_state_dict(bnb_opt.state_dict())
    for a, b in zip(fresh.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ---- paging -----------------------------------------------------------------------------


def _paged_pair(seed, bits, steps, **paging):
    batch = Batch(seed, steps, big=1)
    a, b = batch.params(), batch.params()
    ref = AdamW(a, **HP, state_bits=bits, min_8bit_size=QBLOCK)
    opt = AdamW(b, **HP, state_bits=bits, min_8bit_size=QBLOCK, page_bytes=PAGE, **paging)
    return batch, (ref, a), (opt, b)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("resident", [False, True])
def test_host_paging_streams_the_same_numbers(seed, bits, resident):
    steps = 3
    # A budget of the two page buffers plus the first (largest) state: it stays resident.
    first = Batch(seed, 1, big=1).init[0].numel()
    budget = 2 * PAGE + state_nbytes(bits, first) if resident else 0
    batch, (ref, a), (opt, b) = _paged_pair(seed, bits, steps, paging="host", device_budget=budget)
    assert page_elems(bits, PAGE) < a[0].numel()  # its state spans several pages
    want = _run(ref, a, batch, range(steps), "triton")
    got = _run(opt, b, batch, range(steps), "triton")
    for t in range(steps):
        for x, y in zip(got[t], want[t]):
            assert torch.equal(x, y), f"step {t}"
    homes = [s.state.home for s in opt._slots]
    dev = opt.device_memory()
    assert dev["state"] + dev["page_buffers"] <= max(budget, 2 * PAGE)
    if resident:
        assert homes[0] == "device" and set(homes[1:]) == {"host"}
    else:
        assert set(homes) == {"host"} and dev["state"] == 0
    for x, y in zip(ref.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_state_uses_less_device_memory_and_does_not_grow(seed, bits):
    """bitsandbytes #801: its paged 8-bit AdamW held more GPU memory than the unpaged one,
    and the unpaged one grew at step 2. Ours: host-paged state keeps two page buffers on the
    device, the resident one exactly its state, both the same at every step."""
    batch = Batch(seed, 3, big=1)
    # State several times larger than the two page buffers (8-bit: 48 KB against 16 KB).
    batch.init[0] = torch.randn(24_000) * 0.1
    batch.grads = [[torch.randn(24_000) * 0.01, *g[1:]] for g in batch.grads]
    sizes = {}
    for paging in ("off", "host"):
        params = batch.params()
        opt = AdamW(
            params, **HP, state_bits=bits, min_8bit_size=QBLOCK, paging=paging, page_bytes=PAGE
        )
        seen = []
        with override(backend="triton"):
            for t in range(3):
                batch.feed(params, t)
                opt.step()
                seen.append((opt.device_bytes, opt.host_memory()["state"]))
        assert len(set(seen)) == 1, f"paging={paging}: memory changed across steps: {seen}"
        sizes[paging] = seen[0]
    # Exactly the state: 8 bytes per element at 32 bits; at 8 bits 2 per element plus two fp32
    # scales per 256 (tensors under min_8bit_size stay 32-bit).
    expect = sum(
        8 * t.numel()
        if bits == 32 or t.numel() < QBLOCK
        else 2 * t.numel() + 8 * nblocks(t.numel())
        for t in batch.init
    )
    assert sizes["off"] == (expect, 0)
    assert sizes["host"][0] <= 2 * PAGE < sizes["off"][0]
    assert sizes["host"][1] == expect + 4 * len(batch.init)  # and the step counters


def test_auto_moves_policy():
    slots = [(100, True), (50, True), (80, False), (30, False)]
    assert auto_moves(slots, slack=0, headroom=10) == ([], [])
    assert auto_moves(slots, slack=5, headroom=10) == ([], [])  # inside the dead band
    demote, promote = auto_moves(slots, slack=-40, headroom=10)
    assert demote == [1] and promote == []  # the most recent resident state first
    demote, promote = auto_moves(slots, slack=-120, headroom=10)
    assert demote == [1, 0]
    demote, promote = auto_moves(slots, slack=100, headroom=10)
    assert demote == [] and promote == [2]  # 80 fits in 90, then 30 does not
    demote, promote = auto_moves(slots, slack=200, headroom=10)
    assert promote == [2, 3]


def test_auto_and_uvm_on_cpu_keep_state_with_the_parameter(seed):
    batch = Batch(seed, 2, big=1)
    params = batch.params()
    opt = PagedAdamW8bit(params, **HP)
    _run(opt, params, batch, range(2))
    assert {s.state.home for s in opt._slots if s.state is not None} == {"device"}
    assert opt.paging == "auto" and opt.state_bits == 8


# ---- state dicts ----------------------------------------------------------------------------


def _resume(seed, make, backend, steps=6, cut=3):
    batch = Batch(seed, steps, big=1)
    full = batch.params()
    opt = make(full)
    _run(opt, full, batch, range(steps), backend)

    first = batch.params()
    opt = make(first)
    _run(opt, first, batch, range(cut), backend)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    snapshot = copy.deepcopy(saved["opt"])
    resumed = [nn.Parameter(p.clone()) for p in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    _run(opt2, resumed, batch, range(cut, steps), backend)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    # Loading copied: training on did not write into the loaded dict.
    for index, entry in snapshot["state"].items():
        for key, value in entry.items():
            assert torch.equal(
                torch.as_tensor(saved["opt"]["state"][index][key]), torch.as_tensor(value)
            )
    return opt2


@pytest.mark.parametrize(
    "kind,backend",
    [
        ("32", "auto"),
        ("8", "auto"),
        ("32-host", "triton"),
        ("8-host", "triton"),
        ("8-budget", "triton"),
    ],
)
def test_state_dict_round_trip_continues_exactly(seed, kind, backend):
    settings = {
        "32": {},
        "8": {"state_bits": 8},
        "32-host": {"paging": "host", "page_bytes": PAGE},
        "8-host": {"state_bits": 8, "paging": "host", "page_bytes": PAGE},
        "8-budget": {
            "state_bits": 8,
            "paging": "host",
            "page_bytes": PAGE,
            "device_budget": 2 * PAGE + 20_000,
        },
    }[kind]
    opt = _resume(seed, lambda ps: AdamW(ps, **HP, min_8bit_size=QBLOCK, **settings), backend)
    sd = opt.state_dict()
    keys = {"step", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}
    if "8" in kind:
        assert set(sd["state"][0]) == keys
    assert all(torch.is_tensor(e["step"]) for e in sd["state"].values())  # bitsandbytes #1381


def test_paged_and_resident_state_dicts_are_interchangeable(seed):
    batch = Batch(seed, 4, big=1)
    a, b = batch.params(), batch.params()
    paged = AdamW(a, **HP, state_bits=8, min_8bit_size=QBLOCK, paging="host", page_bytes=PAGE)
    _run(paged, a, batch, range(2), "triton")
    resident = AdamW(b, **HP, state_bits=8, min_8bit_size=QBLOCK)
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    resident.load_state_dict(paged.state_dict())
    _run(paged, a, batch, range(2, 4), "triton")
    _run(resident, b, batch, range(2, 4), "triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_loads_a_torch_adamw_state_dict(seed):
    batch = Batch(seed, 6)
    ref, ours = batch.params(), batch.params()
    ref_opt = torch.optim.AdamW(ref, **HP, foreach=False)
    _run(ref_opt, ref, batch, range(3))
    with torch.no_grad():
        for a, b in zip(ours, ref):
            a.copy_(b)
    opt = AdamW(ours, **HP)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    got = _run(opt, ours, batch, range(3, 6))
    want = _run(ref_opt, ref, batch, range(3, 6))
    for t in range(3):
        _assert_ulps(got[t], want[t], 16, f"step {t}")


# ---- bad input ----------------------------------------------------------------------------


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ParameterTypeError, match="sparse gradients"):
        opt.step()
    offload = AdamW(emb.parameters(), paging="host", offload_gradients=True)
    with pytest.raises(ParameterTypeError, match="sparse gradients"):
        emb(torch.tensor([3])).sum().backward()
    assert isinstance(offload, AdamW)


def test_bad_arguments():
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ParameterTypeError, match="complex"):
        AdamW([nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(OptimizerInputError, match="state_bits must be 32 or 8, got 4"):
        AdamW([w], state_bits=4)
    with pytest.raises(OptimizerInputError, match="state_bits"):
        AdamW([w], state_bits=True)
    with pytest.raises(OptimizerInputError, match="paging must be one of"):
        AdamW([w], paging="disk")
    with pytest.raises(OptimizerInputError, match="below two pages"):
        AdamW([w], paging="host", device_budget=PAGE, page_bytes=PAGE)
    with pytest.raises(OptimizerInputError, match="device_budget applies to"):
        AdamW([w], device_budget=0)
    with pytest.raises(
        OptimizerInputError, match="offload_gradients=True runs the update on the host"
    ):
        AdamW([w], offload_gradients=True)
    with pytest.raises(OptimizerInputError, match="page_bytes"):
        AdamW([w], page_bytes=1000)
    with pytest.raises(TypeError, match="unsupported argument"):
        AdamW([w], momentum=0.9)
    with pytest.raises(OptimizerInputError, match="amsgrad"):
        AdamW([{"params": [w], "amsgrad": True}])
    assert issubclass(OptimizerInputError, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_uvm_without_cuda_is_refused():
    with pytest.raises(OptimizerInputError, match="paging='uvm' needs CUDA"):
        AdamW([nn.Parameter(torch.randn(3))], paging="uvm")


def test_state_dict_from_another_layout_is_refused(seed):
    batch = Batch(seed, 2, big=1)
    params8 = batch.params()
    opt8 = AdamW8bit(params8, **HP)
    _run(opt8, params8, batch, range(1))
    opt32 = AdamW(batch.params(), **HP)
    with pytest.raises(
        StateDictLayoutError, match="8-bit in the state dict but this AdamW keeps 32-bit"
    ):
        opt32.load_state_dict(opt8.state_dict())
    sgd_params = batch.params()
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=0.9)
    batch.feed(sgd_params, 0)
    sgd.step()
    with pytest.raises(StateDictLayoutError, match="expected AdamW state"):
        opt32.load_state_dict(sgd.state_dict())
    sd = opt8.state_dict()
    sd["state"][0] = dict(sd["state"][0], absmax1=sd["state"][0]["absmax1"][:-1])
    with pytest.raises(StateDictLayoutError, match="absmax1 of"):
        AdamW8bit(batch.params(), **HP).load_state_dict(sd)
    with pytest.raises(StateDictLayoutError, match="parameter groups"):
        opt32.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(StateDictLayoutError, match="expects a dict with 'state'"):
        opt32.load_state_dict([1, 2])
    # Nothing was half-loaded by the refused dicts.
    assert not opt32.state


# ---- names ------------------------------------------------------------------------------


def test_named_settings():
    w = [nn.Parameter(torch.randn(3))]
    assert (AdamW8bit(w).state_bits, AdamW8bit(w).paging) == (8, "off")
    assert (PagedAdamW(w).state_bits, PagedAdamW(w).paging) == (32, "auto")
    assert (PagedAdamW8bit(w).state_bits, PagedAdamW8bit(w).paging) == (8, "auto")
    for name, settings in OPTIMIZERS.items():
        if settings.get("paging") == "uvm" and not torch.cuda.is_available():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = create(name, [nn.Parameter(torch.randn(3))], lr=0.5)
        assert opt.param_groups[0]["lr"] == 0.5
        for key, value in settings.items():
            assert getattr(opt, key) == value, (name, key)
    with pytest.raises(OptimizerInputError, match="unknown optimizer"):
        create("sgd", w)
    import trilora

    assert trilora.PagedAdamW8bit is PagedAdamW8bit and trilora.optim.AdamW is AdamW


# ---- CUDA (never run here: no GPU) -----------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "torch"])  # kernels / torch ops on CUDA tensors
def test_cuda_kernels_match_the_cpu_update(seed, bits, dtype, backend):
    batch = Batch(seed, 5)
    cpu, dev = batch.params(dtype), [nn.Parameter(t.clone().to(dtype).cuda()) for t in batch.init]
    a = AdamW(cpu, **HP, state_bits=bits)
    b = AdamW(dev, **HP, state_bits=bits)
    for t in range(5):
        batch.feed(cpu, t)
        for p, q in zip(dev, cpu):
            p.grad = None if q.grad is None else q.grad.cuda()
        a.step()
        with override(backend=backend):
            b.step()
    for p, q in zip(dev, cpu):
        tol = 1e-5 if dtype == torch.float32 and bits == 32 else 2e-2
        torch.testing.assert_close(p.cpu().float(), q.float(), rtol=tol, atol=tol * 1e-2)


@cuda
@pytest.mark.parametrize("paging", ["host", "uvm", "auto"])
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_paging_matches_resident(seed, paging, bits):
    batch = Batch(seed, 4)
    a = [nn.Parameter(t.clone().cuda()) for t in batch.init]
    b = [nn.Parameter(t.clone().cuda()) for t in batch.init]
    ref = AdamW(a, **HP, state_bits=bits)
    opt = AdamW(b, **HP, state_bits=bits, paging=paging, page_bytes=PAGE)
    for t in range(4):
        for params, o in ((a, ref), (b, opt)):
            batch.feed(params, t)
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad.cuda()
            o.step()
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if paging in ("host", "uvm"):
        assert opt.device_memory()["state"] == 0


@cuda
def test_cuda_paged_8bit_holds_less_device_memory_than_unpaged(seed):
    """bitsandbytes #801 on a GPU: memory allocated by the optimizer after steps 1 and 2."""
    n = 32 * 1024 * 1024  # 32M elements: 64 MiB of 8-bit state, 128 MiB of fp32 parameters
    held = {}
    for paging in ("off", "host", "uvm"):
        p = nn.Parameter(torch.randn(n, device="cuda") * 0.01)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        opt = AdamW8bit([p], paging=paging) if paging != "off" else AdamW8bit([p])
        after = []
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
            p.grad = None
            torch.cuda.synchronize()
            after.append(torch.cuda.memory_allocated() - base)
        assert after[0] == after[1], (paging, after)
        held[paging] = after[1]
        del opt, p
    assert held["host"] <= 2 * (32 << 20) < held["off"]
    assert held["uvm"] == 0  # managed memory is not the caching allocator's


@pytest.mark.filterwarnings("ignore::trilora.optim.errors.UnclippedGradientsWarning")
@pytest.mark.parametrize("bits", [32, 8])
def test_cpu_offload_mode_is_the_same_update(seed, bits):
    """The host-update mode steps fp32 masters with the same kernels: on fp32 CPU parameters
    it must match the resident optimizer bit for bit, at 32 and 8 bits."""
    from trilora.optim import CPUOffloadAdamW

    batch = Batch(seed, 5, big=1)
    a, b = batch.params(), batch.params()
    ref = AdamW(a, **HP, state_bits=bits)
    opt = CPUOffloadAdamW(b, **HP, state_bits=bits)
    for x, y in zip(_run(ref, a, batch, range(5)), _run(opt, b, batch, range(5))):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert opt.device_bytes == 0 and opt.host_memory()["state"] > 0
