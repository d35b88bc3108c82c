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

bf16 and fp16 operands are multiplied in :func:`product_dtype`: their own dtype on a CPU
with matrix units for it, fp32 elsewhere (``trilora.config.cpu_half_matmul`` explains the
choice and its measurement). The products here widen such operands themselves and return
the result in the operands' promoted dtype, so a caller that passes bf16 gets bf16 back
either way; a caller that multiplies one operand many times (a dequantized weight, the
head's weight across chunks) widens it once with :func:`widen` and gets fp32 back.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from trilora.config import config

__all__ = [
    "cpu_flags",
    "linear",
    "matmul",
    "matmul_into",
    "onednn_available",
    "product_dtype",
    "widen",
]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Below about 2**20 multiply-adds oneDNN's per-call cost (~10 us) outweighs its faster loop
# (measured crossover on the machine above: 16 x 256 x 256); M = 1 is never above it for
# the projection sizes where it would matter.
_MIN_MACS = 1 << 20
# /proc/cpuinfo flags of hardware that multiplies the dtype (x86 "flags", Arm "Features").
# PyTorch's Arm fp16 GEMMs use the half-precision vector unit (asimdhp).
_NATIVE_HALF_FLAGS = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16", "asimdhp"}),
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in ``/proc/cpuinfo`` (x86 ``flags``, Arm
    ``Features``, e.g. ``"avx2"``, ``"amx_bf16"``); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU paths multiply operands of ``dtype`` in: ``dtype`` itself, except
    bf16/fp16 on a CPU without matrix units for it, which run in fp32
    (``trilora.config.cpu_half_matmul``)."""
    if dtype not in _NATIVE_HALF_FLAGS or config.cpu_half_matmul == "native":
        return dtype
    if config.cpu_half_matmul == "fp32":
        return torch.float32
    flags = cpu_flags()
    # Unreadable flags (not Linux): keep the dtype, as before this switch existed.
    return dtype if not flags or flags & _NATIVE_HALF_FLAGS[dtype] else torch.float32


def _widened_dtype(t: torch.Tensor) -> torch.dtype:
    # Plain CPU tensors only: fake and CUDA tensors keep their dtype.
    if type(t) not in _PLAIN or t.device.type != "cpu":
        return t.dtype
    return product_dtype(t.dtype)


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`product_dtype` of its dtype (``t`` itself when that is its dtype, or
    when it is not a plain CPU tensor: fake and CUDA tensors keep their dtype)."""
    return t.to(_widened_dtype(t))


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


def linear(x: torch.Tensor, weight: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (any strides) -> ``[M, N]``
    in the promoted dtype of the two (bf16 operands multiplied in :func:`product_dtype`).

    ``onednn=False`` keeps the product on BLAS: oneDNN compiles and caches one primitive
    per shape, which grows without bound for callers whose row counts change every call
    (MoE expert groups: 1.5 vs 0.6 ms a call and ~120 MiB of cache over a step, measured
    on the bench's MoE case)."""
    result_dtype = (
        x.dtype if x.dtype == weight.dtype else torch.promote_types(x.dtype, weight.dtype)
    )
    x, weight = widen(x), widen(weight)
    if onednn and _use_onednn(x, weight):
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    else:
        out = x @ weight.t()
    return out.to(result_dtype)


def matmul(a: torch.Tensor, b: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """``a @ b`` for ``a`` ``[M, N]`` and ``b`` ``[N, K]`` (any strides) -> ``[M, K]`` in the
    promoted dtype of the two (bf16 operands multiplied in :func:`product_dtype`;
    ``onednn`` as in :func:`linear`)."""
    return linear(a, b.t(), onednn)


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` for ``out`` ``[M, K]`` contiguous of any float dtype (the product is
    rounded to it once)."""
    if out.dtype == a.dtype == b.dtype == _widened_dtype(a) and not _use_onednn(a, b):
        return torch.mm(a, b, out=out)
    return out.copy_(matmul(a, b))
