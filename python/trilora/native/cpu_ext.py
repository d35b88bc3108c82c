"""trilora's CPU extension (``csrc/cpu/``): 4-bit and int8 dequantization, the int8 small-M
product, the RMSNorm backward and the 8-bit AdamW update, each in one native pass.

:func:`load` returns the compiled module (built with ninja the first time this version of
the sources is needed on the machine, which it says on stderr, and loaded silently from
``trilora.native.build_directory(NAME)`` afterwards) or ``None`` when it cannot be built here (no
compiler, no ninja, ``TRILORA_NO_NATIVE=1``, a failed build); one
:class:`~trilora.native.NativeExtensionWarning` says why, once per process, and the callers
keep their torch path, which gives the same values, only slower. Its functions:

* ``dequantize_4bit_out(packed, absmax, code, nested_absmax, nested_code, offset,
  nested_blocksize, blocksize, out, isa="auto")``: see :func:`dequantize_4bit_into`;
* ``dequantize_int8_out(codes, scb, out, isa="auto")`` and ``int8_small_m_linear(x, codes,
  scb, isa="auto")``: see :func:`dequantize_int8_into` and :func:`int8_small_m_linear`;
* ``small_m_linear_4bit(x, packed, absmax, code, nested_absmax, nested_code, offset,
  nested_blocksize, blocksize, n_out, isa="auto")`` and ``small_m_max_rows()``: see
  :func:`small_m_linear_4bit`;
* ``rms_norm_backward(dy, x, weight, rstd, need_weight_grad, isa="auto")``: see
  :mod:`trilora.ops.rms_norm`;
* ``adamw_8bit_step(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, bounds1, bounds2,
  lut1, lut2, decay, w1, beta2, w2, step_size, bc2_sqrt, eps, apply_decay, isa="auto")``
  and ``adamw_8bit_lut_bytes()``: see :func:`trilora.optim.blockwise.adamw_8bit_native_`;
* ``best_isa() -> str``: ``"avx512"``, ``"avx2"`` or ``"scalar"``, the loop this CPU runs.

The build takes no ``-march`` flag (the ISA is picked at run time, so a cached build runs on
any x86-64 CPU), turns off floating-point contraction, so that the double-quantized scale
``nested_code[q] * nested_absmax + offset`` is rounded twice, as the format defines it, and
compiles with OpenMP on Linux so that the kernels use torch's intra-op threads.
"""

from __future__ import annotations

import sys
import threading
import warnings
from types import ModuleType

import torch

from trilora.native import NativeExtensionWarning, load_extension, unavailable_reason

NAME = "trilora_cpu"
SOURCES = (
    "cpu/ext.cpp",
    "cpu/dequantize_4bit.cpp",
    "cpu/int8_linear.cpp",
    "cpu/rms_norm.cpp",
    "cpu/adamw_8bit.cpp",
)
CUDA = False
LABEL = "trilora's CPU extension"
USUAL = "usually 20-60 s on 2 cores"


def _cflags() -> tuple[str, ...]:
    # -fopenmp: at::parallel_for is a header template that runs serially unless the including
    # file is compiled with OpenMP (ATen's own OpenMP backend); the kernels then share torch's
    # thread pool (the libgomp torch already loaded; nothing extra is linked). Linux/GCC only:
    # elsewhere the kernels run on one thread, and `omp simd` still vectorizes their loops.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ("-ffp-contract=off", "-fopenmp")
    return ("-ffp-contract=off", "-fopenmp-simd")


CFLAGS = _cflags()
FALLBACK_NOTE = (
    "On CPU that is trilora's torch path for 4-bit and int8 dequantization, the RMSNorm "
    "backward and the 8-bit AdamW update: the same results, several times slower."
)

_UNSET = object()
_module: object = _UNSET
_lock = threading.Lock()


def load() -> ModuleType | None:
    """The compiled extension, or ``None`` when it cannot be built here (one warning)."""
    global _module
    if _module is _UNSET:
        with _lock:
            if _module is _UNSET:
                # The shared loader's warning names what is missing; add what it costs here.
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    module = load_extension(
                        NAME, SOURCES, cuda=CUDA, extra_cflags=CFLAGS, label=LABEL, usual=USUAL
                    )
                for w in caught:
                    if issubclass(w.category, NativeExtensionWarning):
                        warnings.warn(f"{w.message} {FALLBACK_NOTE}", w.category, stacklevel=2)
                    else:
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                _module = module
    return _module  # type: ignore[return-value]


def available() -> bool:
    """Whether :func:`load` returns the extension (builds it on the first call)."""
    return load() is not None


def reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` if it has not failed)."""
    return unavailable_reason(NAME)


def dequantize_4bit_into(
    out: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    isa: str = "auto",
) -> bool:
    """Dequantize into ``out`` with the extension; ``False`` (nothing written) when it is
    unavailable.

    Args:
        out: contiguous CPU tensor of ``n`` elements, fp32/fp16/bf16 (any shape).
        packed: contiguous uint8 ``[>= (n+1)//2]``.
        absmax: fp32 ``[nblocks]``, or uint8 ``[nblocks]`` with the nested state.
        code: fp32 ``[16]``.
        nested_absmax, nested_code, offset: fp32 ``[groups]``, ``[256]`` and a one-element
            tensor, or ``None`` without double quantization.
        blocksize, nested_blocksize: elements per block; blocks per nested block.
        isa: ``"auto"``, or ``"scalar"``/``"avx2"``/``"avx512"`` to force a loop (tests).
    """
    ext = load()
    if ext is None:
        return False
    off = 0.0 if offset is None else float(offset.reshape(()).item())
    ext.dequantize_4bit_out(
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        off,
        nested_blocksize,
        blocksize,
        out,
        isa,
    )
    return True


def dequantize_int8_into(
    out: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, isa: str = "auto"
) -> bool:
    """``out = (codes * scb[:, None]) * (1/127)`` with the extension, the bits of
    :func:`trilora.ops.int8_linear.dequantize_int8_impl`'s torch path; ``False`` (nothing
    written) when it is unavailable.

    Args:
        out: contiguous CPU tensor of ``N * K`` elements, fp32/fp16/bf16 (any shape).
        codes: contiguous int8 ``[N, K]``.
        scb: contiguous fp32 ``[N]``.
        isa: ``"auto"``, or ``"scalar"``/``"avx2"`` to force a loop (tests).
    """
    ext = load()
    if ext is None:
        return False
    ext.dequantize_int8_out(codes, scb, out, isa)
    return True


def small_m_max_rows() -> int:
    """The most rows :func:`int8_small_m_linear` and :func:`small_m_linear_4bit` take (0
    without the extension)."""
    ext = load()
    return 0 if ext is None else int(ext.small_m_max_rows())


def int8_small_m_linear(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, isa: str = "auto"
) -> torch.Tensor | None:
    """``x @ W.T`` for a few rows, read straight from the int8 codes (``W = codes * scb / 127``);
    ``None`` when the extension is unavailable.

    Args:
        x: contiguous fp32 ``[M, K]``, ``M <= small_m_max_rows()``.
        codes: contiguous int8 ``[N, K]``; scb: contiguous fp32 ``[N]``.

    Returns:
        fp32 ``[M, N]``.
    """
    ext = load()
    if ext is None:
        return None
    return ext.int8_small_m_linear(x, codes, scb, isa)


def small_m_linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    n_out: int,
    isa: str = "auto",
) -> torch.Tensor | None:
    """``x @ W.T`` for a few rows, read straight from the packed 4-bit codes of the
    ``[n_out, K]`` weight (state as in :func:`dequantize_4bit_into`; ``blocksize`` a multiple
    of 16); ``None`` when the extension is unavailable.

    Args:
        x: contiguous fp32 ``[M, K]``, ``M <= small_m_max_rows()``.

    Returns:
        fp32 ``[M, n_out]``.
    """
    ext = load()
    if ext is None:
        return None
    off = 0.0 if offset is None else float(offset.reshape(()).item())
    return ext.small_m_linear_4bit(
        x,
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        off,
        nested_blocksize,
        blocksize,
        n_out,
        isa,
    )


__all__ = [
    "NAME",
    "SOURCES",
    "available",
    "dequantize_4bit_into",
    "dequantize_int8_into",
    "int8_small_m_linear",
    "load",
    "reason",
    "small_m_linear_4bit",
    "small_m_max_rows",
]
