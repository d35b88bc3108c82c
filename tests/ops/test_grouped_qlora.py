"""The grouped QLoRA linear of MoE experts (torch path) against float64, on awkward
shapes: empty experts, unequal groups, transposed storage, 4-bit and int8 experts."""

from __future__ import annotations

import random

import pytest
import torch

from trilora.formats import QuantConfig
from trilora.moe import QuantizedExperts
from trilora.ops.grouped_qlora import grouped_lora_linear, peft_expert_factors


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_grads_match_float64(seed, transposed, quant_type, dtype):
    rng = random.Random(seed)
    experts, k, n, r = rng.randint(3, 6), rng.choice([40, 72]), rng.choice([24, 36]), 3
    counts = [rng.randint(0, 5) for _ in range(experts)]
    counts[rng.randrange(experts)] = 0  # an expert no token chose
    rows = sum(counts) or 1
    counts[-1] += rows - sum(counts)
    stored = (experts, k, n) if transposed else (experts, n, k)
    weight = QuantizedExperts.quantize(torch.randn(stored), QuantConfig(quant_type, 64, True, None))
    x = torch.randn(rows, k, dtype=dtype, requires_grad=True)
    lora_a = torch.randn(r * experts, k, requires_grad=True)
    lora_b = torch.randn(n, r * experts, requires_grad=True)
    ends = torch.tensor(counts).cumsum(0)
    scale = rng.uniform(0.5, 2.0)
    a, b = peft_expert_factors(lora_a, lora_b, experts)
    y = grouped_lora_linear(x, ends, weight, a, b, scale, transposed)
    dy = torch.randn_like(y)
    y.backward(dy)

    w64 = weight.dequantize(torch.float64)
    w64 = w64.transpose(1, 2) if transposed else w64
    x64 = x.detach().double().requires_grad_()
    a64 = lora_a.detach().double().requires_grad_()
    b64 = lora_b.detach().double().requires_grad_()
    fa, fb = peft_expert_factors(a64, b64, experts)
    owner = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))
    want = torch.einsum("sk,snk->sn", x64, w64[owner]) + scale * torch.einsum(
        "sr,snr->sn", torch.einsum("sk,srk->sr", x64, fa[owner]), fb[owner]
    )
    want.backward(dy.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, exp in [
        (y, want),
        (x.grad, x64.grad),
        (lora_a.grad, a64.grad),
        (lora_b.grad, b64.grad),
    ]:
        err = (got.double() - exp).abs().max().item()
        assert err <= tol * exp.abs().max().item() + 1e-6


def test_dense_trainable_experts_get_gradients(seed):
    experts, k, n = 4, 24, 16
    weight = torch.randn(experts, n, k, requires_grad=True)
    ends = torch.tensor([3, 3, 7, 9])
    x = torch.randn(9, k)
    y = grouped_lora_linear(x, ends, weight)
    y.sum().backward()
    owner = torch.repeat_interleave(
        torch.arange(experts), torch.diff(ends, prepend=torch.tensor([0]))
    )
    want = torch.zeros_like(weight)
    want.index_add_(0, owner, torch.ones(9, n).unsqueeze(2) * x.unsqueeze(1))
    assert torch.allclose(weight.grad, want, atol=1e-5)


def test_bad_shapes_are_named():
    weight = torch.randn(3, 8, 6)
    with pytest.raises(ValueError, match=r"x must be \[S, 6\]"):
        grouped_lora_linear(torch.randn(4, 5), torch.tensor([1, 2, 4]), weight)
    with pytest.raises(ValueError, match="expert_ends must be"):
        grouped_lora_linear(torch.randn(4, 6), torch.tensor([4]), weight)


@pytest.mark.parametrize("transposed", [False, True])
def test_triton_path_through_the_op(seed, transposed):
    """The op's Triton path (the grouped kernels, under the interpreter on the CPU) with its
    autograd, against the torch path on the same inputs."""
    from trilora.config import override

    rng = random.Random(seed)
    experts, k, n, r = rng.randint(3, 6), rng.choice([40, 72]), rng.choice([24, 40]), 4
    counts = [rng.choice([0, rng.randint(1, 6)]) for _ in range(experts)]
    counts[0] += 1
    stored = (experts, k, n) if transposed else (experts, n, k)
    weight = QuantizedExperts.quantize(torch.randn(stored), QuantConfig("nf4", 64, True, None))
    ends = torch.tensor(counts).cumsum(0)
    x0 = torch.randn(sum(counts), k).half()
    a0, b0 = torch.randn(experts, r, k), torch.randn(experts, n, r)
    dy = torch.randn(sum(counts), n).half()
    results = []
    for backend in ("torch", "triton"):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        with override(backend=backend):
            y = grouped_lora_linear(x, ends, weight, a, b, 0.5, transposed)
            y.backward(dy)
        results.append([y, x.grad, a.grad, b.grad])
    for got, want in zip(*reversed(results)):
        err = (got.double() - want.double()).abs().max().item()
        assert err <= 4e-3 * want.double().abs().max().item()


@pytest.mark.parametrize("where", ["fake", "meta"])
def test_runs_on_fake_tensors_and_meta(where):
    """Qwen3-30B-A3B's gate_up shapes (128 experts of [1536, 2048], 4096 token copies) cost
    nothing here: the fake implementations give every shape and gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    experts, n, k, r, rows = 128, 1536, 2048, 16, 4096
    ctx = FakeTensorMode() if where == "fake" else torch.device("meta")
    with ctx:
        device = "meta" if where == "meta" else "cpu"
        weight = QuantizedExperts.shell(
            experts, n, k, QuantConfig("nf4", 64, True, None), device=device
        )
        x = torch.empty(rows, k, dtype=torch.bfloat16, device=device, requires_grad=True)
        ends = torch.empty(experts, dtype=torch.int64, device=device)
        a = torch.empty(experts, r, k, device=device, requires_grad=True)
        b = torch.empty(experts, n, r, device=device, requires_grad=True)
        y = grouped_lora_linear(x, ends, weight, a, b, 2.0)
        y.sum().backward()
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    assert x.grad.shape == x.shape and a.grad.shape == a.shape and b.grad.shape == b.shape
