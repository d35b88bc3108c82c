"""Kernel micro-benchmarks for pytest-benchmark: ``pytest bench/ --benchmark-only``.

Small CPU shapes by default (a 1/8-scale Llama-3.1-8B projection, fp32); on CUDA the real
q_proj and down_proj shapes in bf16. ``TRILORA_BENCH_SCALE`` overrides the scale divisor
(1 = real shapes). A provider whose packages do not import is skipped, not failed.
"""

from __future__ import annotations

import os

import pytest
import torch

from trilora.bench.harness import default_device, provider_status, synchronize
from trilora.bench.kernels import LAYER_PROVIDERS, build_layer, projection_shapes

DEVICE = default_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SCALE = int(os.environ.get("TRILORA_BENCH_SCALE", "1" if DEVICE.type == "cuda" else "8"))
SHAPES = projection_shapes("llama-3.1-8b", SCALE, ("q_proj", "down_proj"))
TOKENS = (16, 4096) if DEVICE.type == "cuda" else (16, 128)


def _available(provider: str) -> None:
    ok, why = provider_status(provider)
    if not ok:
        pytest.skip(why)


def _synced(fn):
    def run():
        fn()
        synchronize(DEVICE)

    return run


@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.layer)
@pytest.mark.parametrize("metric", ["fwd", "fwd_bwd"])
def test_qlora_linear(benchmark, provider, m, shape, metric):
    _available(provider)
    layer = build_layer(provider, shape, 16, DTYPE, DEVICE)
    x = torch.randn(m, shape.k_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(m, shape.n_out, device=DEVICE, dtype=DTYPE)
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd():
        layer(x)

    def fwd_bwd():
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(dy)

    benchmark.group = f"{shape.layer} {shape.n_out}x{shape.k_in} M={m} {metric}"
    benchmark(_synced(fwd if metric == "fwd" else fwd_bwd))
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("provider", ["trilora", "bnb"])
@pytest.mark.parametrize("op", ["quantize", "dequantize"])
def test_quantize_4bit(benchmark, provider, op):
    shape = SHAPES[-1]
    w = torch.randn(shape.n_out, shape.k_in, device=DEVICE, dtype=DTYPE) * 0.02
    if provider == "trilora":
        from trilora.quant import quantize

        qw = quantize(w)

        def fn():
            return quantize(w) if op == "quantize" else qw.dequantize(DTYPE)
    else:
        bf = pytest.importorskip("bitsandbytes.functional")
        packed, state = bf.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )

        def fn():
            if op == "quantize":
                return bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            return bf.dequantize_4bit(packed, state)

    benchmark.group = f"{op} {shape.n_out}x{shape.k_in}"
    benchmark(_synced(fn))
