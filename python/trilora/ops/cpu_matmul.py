"""fp32 matrix products for trilora's CPU paths, through oneDNN where it is faster.

PyTorch runs an fp32 ``torch.mm`` on the CPU through its BLAS (MKL in the x86 wheels). MKL
picks its kernels by CPU vendor: on AMD processors it runs its AVX2 code even where the CPU
has AVX-512, while oneDNN (also inside every x86 PyTorch wheel, and what PyTorch already
uses for bf16 matmuls) JIT-compiles AVX-512 kernels for any CPU that has them. Measured on
this project's 2-core AMD EPYC (AVX-512), one thread, the QLoRA projection shapes of
SmolLM2-135M and a 4-layer hidden-512 Llama (M = 144 and 1024 tokens): oneDNN's fp32 inner
product runs at 210-235 GFLOP/s against MKL's 90-110, for ``x @ W.T`` and for ``dy @ W``
(a transposed weight view, no copy). Both accumulate in fp32: the results differ from
MKL's by rounding only (relative error ~1e-6 against float64 for either).

The oneDNN entry point is ``torch.ops.mkldnn._linear_pointwise``, the op TorchInductor's CPU
backend emits; it has no public Python name. It is therefore used behind a guard: once per
process a small probe checks that it exists and agrees with ``torch.mm``; if it is missing,
raises, or disagrees, every product here falls back to ``torch.mm``, which gives the same
values (and is what ran before). ``TRILORA_CPU_MATMUL=blas`` forces the fallback.

Only real, 2-D, fp32 CPU tensors take the oneDNN path, and only products of at least
2**20 multiply-adds (below that its fixed cost per call wins over its faster loop). Other dtypes already reach oneDNN
through ``torch.mm`` (bf16) or are not supported by it on most CPUs (fp16).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["linear", "matmul", "matmul_into", "onednn_available"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Below about 2**20 multiply-adds oneDNN's per-call cost (~10 us) outweighs its faster loop
# (measured crossover on the machine above: 16 x 256 x 256); M = 1 is never above it for
# the projection sizes where it would matter.
_MIN_MACS = 1 << 20


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether the oneDNN fp32 inner product is usable here (probed once per process)."""
    if os.environ.get("TRILORA_CPU_MATMUL", "auto").lower() == "blas":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, 19, generator=gen)
        w = torch.randn(11, 19, generator=gen)
        ok = torch.allclose(op(x, w, None, "none", [], ""), x @ w.t(), rtol=1e-5, atol=1e-5)
        return ok and torch.allclose(
            op(x.t().contiguous().t(), w.t().contiguous().t(), None, "none", [], ""),
            x @ w.t(),
            rtol=1e-5,
            atol=1e-5,
        )
    except Exception:  # a renamed or broken private op: use torch.mm
        return False


def _use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        # Plain tensors only: FakeTensorMode (trilora mem) and other subclasses trace torch.mm.
        type(a) in _PLAIN
        and type(b) in _PLAIN
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.dim() == 2
        and b.dim() == 2
        # a is [M, X] and b holds X * Y values: M * X * Y multiply-adds
        and a.shape[0] * b.numel() >= _MIN_MACS
        and onednn_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (any strides) -> ``[M, N]``."""
    if _use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return x @ weight.t()


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a`` ``[M, N]`` and ``b`` ``[N, K]`` (any strides) -> ``[M, K]``."""
    if _use_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` (``torch.mm(a, b, out=out)``), ``out`` ``[M, K]`` contiguous."""
    if _use_onednn(a, b):
        return out.copy_(torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], ""))
    return torch.mm(a, b, out=out)
