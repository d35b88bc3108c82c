"""Runtime switches for trilora's dispatch.

Every switch has an environment variable so that a benchmark or a test can flip it for a
whole process, and :func:`override` for a scoped change.

``backend``
    ``"auto"`` (default) runs Triton kernels on CUDA tensors and the torch reference on
    everything else. ``"triton"`` forces the kernels, which on CPU tensors only works under
    the Triton interpreter (``TRITON_INTERPRET=1``); the tests use it to run whole ops and
    their autograd through the kernels. ``"torch"`` forces the reference everywhere.
    Environment: ``TRILORA_BACKEND``.

``fused_max_tokens``
    The fused dequantize-in-the-K-loop kernels serve calls with at most this many tokens
    (rows of ``x``); larger calls dequantize the weight into a scratch buffer and call the
    library matmul (cuBLAS). The crossover comes from a bytes/FLOPs model at H100 rates
    (3.0 TB/s, 790 bf16 TFLOP/s) for a 4096 x 4096 projection:

    * scratch path: the dequantize pass moves 8 MB packed + 32 MB bf16 written + 32 MB read
      back by the GEMM, about 24 us, plus a cuBLAS GEMM at ~85 % of peak;
    * fused path: no extra traffic, but the dequantized tile is produced in registers and
      must round-trip through shared memory before ``tl.dot``, which forgoes the TMA/wgmma
      pipeline; we budget it at ~60 % of peak.

    At M = 512 the GEMM is 17 GFLOP (22 us at peak): fused ~36 us against scratch ~50 us.
    At M = 4096 it is 137 GFLOP: fused ~290 us against scratch ~228 us. The two cross near
    M = 1500-2000, hence 2048. This is an analytical choice that still awaits a GPU
    measurement (``trilora bench --level kernels`` reports both paths).
    Environment: ``TRILORA_FUSED_MAX_TOKENS``.

``decode_gemv_max_tokens``
    Forward calls of the 4-bit linear on CUDA with at most this many tokens (0 to 4; 0 turns
    it off) run the CUDA extension's decode GEMV (``csrc/cuda/gemv_4bit.cu``) instead of the
    Triton split-K kernel, when the extension builds. Bytes and operations for a 4096 x 4096
    NF4 projection (blocksize 64, double-quantized) at H100 rates:

    * both read the packed weight, 8.4 MB + 0.26 MB of scales: ~2.9 us at 3.0 TB/s;
    * Triton split-K: tl.dot needs 16-row tiles, so M <= 4 runs at a quarter of a tile; it
      writes fp32 partials and reduces them in a second launch: two launches (~2-3 us each
      on an idle stream) and tiles of 64 x 32 weights, ~6-8 us in all;
    * GEMV: one launch, one warp per output row, 16-byte weight loads, the LoRA up-projection
      and bias in the epilogue (plus one small matmul for ``x @ A.T``). Its decode costs
      ~4 operations per weight and each token 2 more: (4 + 2M) x 16.8M / ~60 TFLOP/s of fp32
      CUDA cores, 1.7 us at M = 1 and 3.4 us at M = 4, so it stays at the memory floor up to
      M = 4 (~3-4 us) and loses to tensor cores beyond.

    Hence 4. An analytical choice that awaits a GPU measurement
    (``trilora bench --level kernels``). Environment: ``TRILORA_DECODE_GEMV_MAX_TOKENS``.

``cpu_half_matmul``
    How the CPU paths multiply bf16 and fp16 operands (the 4- and 8-bit linear's base
    product, the fused head's chunks). ``"native"`` multiplies in that dtype, through
    oneDNN's bf16 kernels; that is fast only on a CPU with bf16 matrix units (AVX512-BF16,
    AMX, Arm's BF16 extension; for fp16 AVX512-FP16 or AMX-FP16). Elsewhere PyTorch
    falls back to a generic loop: measured on an AVX2-only AMD EPYC, one thread, a
    4-layer hidden-512 Llama's QLoRA step spent 45 of its 47 s in bf16 products against
    ~2 s for the same step in fp32. ``"fp32"`` widens the operands to fp32 (the
    dequantized weight is produced in fp32 directly), multiplies in fp32 and rounds the
    result to the operands' dtype once, after the bias and the LoRA term are added: the
    values are those of the native path up to accumulation order (both accumulate in
    fp32), so within bf16's rounding of the output. ``"auto"`` (default) is ``"native"``
    where the CPU reports those units (Linux ``/proc/cpuinfo``) or they cannot be read,
    and ``"fp32"`` elsewhere. Environment: ``TRILORA_CPU_HALF_MATMUL``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

_BACKENDS = ("auto", "torch", "triton")
_CPU_HALF_MATMUL = ("auto", "native", "fp32")


@dataclass
class Config:
    backend: str = "auto"
    fused_max_tokens: int = 2048
    decode_gemv_max_tokens: int = 4
    cpu_half_matmul: str = "auto"

    def validate(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"trilora backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.fused_max_tokens < 0:
            raise ValueError(f"fused_max_tokens must be >= 0, got {self.fused_max_tokens}")
        if not 0 <= self.decode_gemv_max_tokens <= 4:
            raise ValueError(
                f"decode_gemv_max_tokens must be in 0..4, got {self.decode_gemv_max_tokens}"
            )
        if self.cpu_half_matmul not in _CPU_HALF_MATMUL:
            raise ValueError(
                f"cpu_half_matmul must be one of {_CPU_HALF_MATMUL}, got {self.cpu_half_matmul!r}"
            )


def _from_env() -> Config:
    cfg = Config(
        backend=os.environ.get("TRILORA_BACKEND", "auto"),
        fused_max_tokens=int(os.environ.get("TRILORA_FUSED_MAX_TOKENS", "2048")),
        decode_gemv_max_tokens=int(os.environ.get("TRILORA_DECODE_GEMV_MAX_TOKENS", "4")),
        cpu_half_matmul=os.environ.get("TRILORA_CPU_HALF_MATMUL", "auto"),
    )
    cfg.validate()
    return cfg


config = _from_env()


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Config]:
    """Temporarily change fields of the global :data:`config`.

    >>> with override(backend="torch"):
    ...     ...
    """
    names = {f.name for f in fields(Config)}
    unknown = set(changes) - names
    if unknown:
        raise ValueError(
            f"unknown trilora config field(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    saved = {k: getattr(config, k) for k in changes}
    try:
        for k, v in changes.items():
            setattr(config, k, v)
        config.validate()
        yield config
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` should run the Triton kernels rather than the torch reference."""
    if config.backend == "triton":
        return True
    if config.backend == "torch":
        return False
    return t.is_cuda
