"""The AdamW update on torch tensors: 32-bit state, and bitsandbytes' 8-bit blockwise state.

This is the CPU implementation of the fused kernels in :mod:`trilora.kernels.optim`, with
the same semantics, and the reference the kernel tests compare with.

8-bit state, byte for byte bitsandbytes' ``AdamW8bit`` layout (0.50.2):

* ``state1`` / ``state2``: uint8 codes with the parameter's shape, indices into the signed
  (first moment) / unsigned (second moment) 256-entry dynamic maps ``qmap1`` / ``qmap2``
  (:func:`trilora.ops.quantize.dynamic_map`);
* ``absmax1`` / ``absmax2``: fp32, one per 256 elements of the flattened tensor;
* a moment's value is ``qmap[code] * absmax[i // 256]``.

Each step dequantizes, applies the 32-bit update to the moments (the parameter update uses
these fresh moments), takes a new absmax per block and stores the nearest code of
``moment / absmax`` (midpoint rule). bitsandbytes' CUDA kernel searches the same nearest
code; its CPU backend rounds through a 65,536-entry table, which can pick the farther of
two codes within ~1.5e-5 of a midpoint.

The update itself is torch's single-tensor AdamW (``torch.optim.AdamW(foreach=False)``),
operation by operation, with decoupled weight decay applied first. (bitsandbytes' CPU
backend applies it first too; its CUDA kernel applies it after the Adam step, a difference
of ``lr * weight_decay`` times the update.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from trilora.ops.quantize import dynamic_map

QBLOCK = 256
"""Elements per absmax block of the 8-bit state."""

MIN_8BIT_SIZE = 4096
"""Tensors with fewer elements keep 32-bit state (bitsandbytes' ``min_8bit_size``)."""

_CHUNK = 1 << 16  # elements per pass of the CPU 8-bit update: temporaries stay in cache


@dataclass(frozen=True)
class StepScalars:
    """The scalars of one AdamW step of one parameter, as torch computes them (float64)."""

    decay: float  # 1 - lr * weight_decay
    w1: float  # 1 - beta1
    beta2: float
    w2: float  # 1 - beta2
    step_size: float  # lr / (1 - beta1 ** step)
    bc2_sqrt: float  # (1 - beta2 ** step) ** 0.5
    eps: float
    weight_decay: float

    @classmethod
    def of(
        cls, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: float
    ) -> StepScalars:
        beta1, beta2 = float(betas[0]), float(betas[1])
        lr, weight_decay = float(lr), float(weight_decay)
        return cls(
            decay=1 - lr * weight_decay,
            w1=1 - beta1,
            beta2=beta2,
            w2=1 - beta2,
            step_size=lr / (1 - beta1**step),
            bc2_sqrt=(1 - beta2**step) ** 0.5,
            eps=float(eps),
            weight_decay=weight_decay,
        )

    def kernel_args(self) -> dict[str, float]:
        """Keyword arguments of :func:`trilora.kernels.optim.adamw_step_32bit` / ``_8bit``."""
        return {
            "decay": self.decay,
            "w1": self.w1,
            "beta2": self.beta2,
            "w2": self.w2,
            "step_size": self.step_size,
            "bc2_sqrt": self.bc2_sqrt,
            "eps": self.eps,
        }


@dataclass(frozen=True)
class QuantMaps:
    """The two dynamic maps and their nearest-code midpoints on one device.

    ``qmap1`` (signed) and ``qmap2`` (unsigned): fp32 ``[256]``, sorted. ``bounds1`` /
    ``bounds2``: fp32 ``[256]``, ``(qmap[i] + qmap[i + 1]) / 2`` and a final ``+inf``.
    ``lut1`` / ``lut2`` (CPU maps only, else ``None``): :func:`nearest_code_lut` of the
    bounds, the native CPU update's requantizing tables.
    """

    qmap1: torch.Tensor
    qmap2: torch.Tensor
    bounds1: torch.Tensor
    bounds2: torch.Tensor
    lut1: torch.Tensor | None = None
    lut2: torch.Tensor | None = None


def _bounds(qmap: torch.Tensor) -> torch.Tensor:
    mid = (qmap[:-1] + qmap[1:]) / 2
    return torch.cat([mid, torch.full((1,), math.inf, dtype=torch.float32)])


# The native update's requantizing table (csrc/cpu/adamw_8bit.cpp, the same constants): one
# entry per value of (bits of |x|) >> 15 (sign, exponent, top 8 mantissa bits) from 2^-23
# (every smaller |x| shares the first) to 1.0, per sign.
_LUT_SHIFT = 15
_LUT_HIGH = 0x3F800000 >> _LUT_SHIFT  # the key of 1.0
_LUT_LOW = 104 << 8  # the key of 2^-23
_LUT_KEYS = _LUT_HIGH - _LUT_LOW + 1


def nearest_code_lut(bounds: torch.Tensor) -> torch.Tensor:
    """The native CPU update's table of candidate codes under a map given by its ``bounds``.

    uint8 ``[2 * 5889 + 4]``: for the floats ``x`` with ``|x| <= 1`` that share a key
    (:data:`_LUT_SHIFT`), first the positive ones, then the negative ones, the code ``c`` of
    the smallest such ``x``; ``torch.bucketize(x, bounds[:-1])`` is then ``c`` or ``c + 1``
    for every one of them (one midpoint at most lies among them: checked here), and
    ``bounds[c] >= x`` tells which. Four zero bytes at the end let the kernel read each entry
    as 32 bits.

    Raises:
        ValueError: two midpoints fall between floats that share a key (a map finer than
            the dynamic maps).
    """
    keys = torch.arange(_LUT_LOW, _LUT_HIGH + 1, dtype=torch.int64)
    lo_bits = keys << _LUT_SHIFT
    lo_bits[0] = 0  # the first key holds every |x| below 2^-23, 0 included
    hi_bits = ((keys + 1) << _LUT_SHIFT) - 1
    hi_bits[-1] = 0x3F800000  # 1.0 itself
    lo = lo_bits.to(torch.int32).view(torch.float32)
    hi = hi_bits.to(torch.int32).view(torch.float32)
    mids = bounds.detach().to("cpu", torch.float32)[:-1].contiguous()
    parts = []
    for smallest, largest in ((lo, hi), (-hi, -lo)):
        first = torch.bucketize(smallest, mids)
        last = torch.bucketize(largest, mids)
        if (last - first).max() > 1:
            raise ValueError("a map with two midpoints between floats of one table key")
        parts.append(first)
    parts.append(torch.zeros(4, dtype=torch.int64))
    return torch.cat(parts).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _maps(device: str) -> QuantMaps:
    q1, q2 = dynamic_map(True).clone(), dynamic_map(False).clone()
    b1, b2 = _bounds(q1), _bounds(q2)
    luts = (nearest_code_lut(b1), nearest_code_lut(b2)) if device == "cpu" else (None, None)
    return QuantMaps(
        *(t.to(device) for t in (q1, q2, b1, b2)),  # type: ignore[arg-type]
        *luts,
    )


def quant_maps(device: torch.device | str = "cpu") -> QuantMaps:
    """The cached :class:`QuantMaps` on ``device`` (never modify them)."""
    return _maps(str(torch.device(device)))


def nblocks(n: int) -> int:
    """Number of 256-element absmax blocks of an ``n``-element tensor."""
    return -(-n // QBLOCK)


# ---------------------------------------------------------------------------------------
# blockwise quantization
# ---------------------------------------------------------------------------------------


def _scale_blocks_(values: torch.Tensor, scale: torch.Tensor, op: str) -> None:
    # ``values`` starts on a block boundary; multiply (or divide) each block by its scale.
    full = values.numel() // QBLOCK
    head = values[: full * QBLOCK].view(full, QBLOCK)
    fn = torch.Tensor.mul_ if op == "mul" else torch.Tensor.div_
    fn(head, scale[:full, None])
    if full * QBLOCK < values.numel():
        fn(values[full * QBLOCK :], scale[full])


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor
) -> torch.Tensor:
    """fp32 ``[n]`` values ``qmap[codes] * absmax[i // 256]`` of flat uint8 ``codes``."""
    values = qmap[codes.reshape(-1).long()]
    _scale_blocks_(values, absmax, "mul")
    return values


def block_absmax(values: torch.Tensor) -> torch.Tensor:
    """fp32 ``[ceil(n / 256)]``: the largest ``|value|`` of each 256-element block."""
    n = values.numel()
    full = n // QBLOCK
    out = values[: full * QBLOCK].view(full, QBLOCK).abs().amax(dim=1)
    if full * QBLOCK < n:
        out = torch.cat([out, values[full * QBLOCK :].abs().amax().reshape(1)])
    return out


def quantize_blockwise(
    values: torch.Tensor, bounds: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes of flat fp32 ``values`` under a map given by its ``bounds``.

    Returns ``(codes uint8 [n], absmax fp32 [ceil(n / 256)])``; an all-zero block gets
    absmax 0 and the code of 0.
    """
    values = values.reshape(-1)
    if absmax is None:
        absmax = block_absmax(values)
    normed = values.clone()
    _scale_blocks_(normed, torch.where(absmax > 0, absmax, torch.ones_like(absmax)), "div")
    codes = torch.bucketize(normed, bounds[:-1], out_int32=True).to(torch.uint8)
    return codes, absmax


# ---------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------


def adamw_32bit_(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    sc: StepScalars,
) -> None:
    """torch's single-tensor AdamW step on fp32 ``p`` (any shape; all four alike), in place."""
    if sc.weight_decay != 0:
        p.mul_(sc.decay)
    exp_avg.lerp_(g, sc.w1)
    exp_avg_sq.mul_(sc.beta2).addcmul_(g, g, value=sc.w2)
    denom = (exp_avg_sq.sqrt() / sc.bc2_sqrt).add_(sc.eps)
    p.addcdiv_(exp_avg, denom, value=-sc.step_size)


def adamw_8bit_(
    p: torch.Tensor,
    g: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    maps: QuantMaps,
    sc: StepScalars,
) -> None:
    """One AdamW step with 8-bit blockwise state, in place (see the module docstring).

    Args:
        p: ``[n]`` fp32/bf16/fp16 (contiguous); updated in place, computed in fp32.
        g: ``[n]`` gradient, any float dtype.
        state1, state2: uint8 ``[n]``; absmax1, absmax2: fp32 ``[ceil(n / 256)]``.
        maps: :func:`quant_maps` on the tensors' device.
    """
    n = p.numel()
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        b0, b1 = start // QBLOCK, nblocks(stop)
        m = dequantize_blockwise(state1[start:stop], absmax1[b0:b1], maps.qmap1)
        v = dequantize_blockwise(state2[start:stop], absmax2[b0:b1], maps.qmap2)
        part = p[start:stop]
        p32 = part if part.dtype == torch.float32 else part.float()
        adamw_32bit_(p32, g[start:stop].float(), m, v, sc)
        if p32 is not part:
            part.copy_(p32)
        for values, codes, absmax, bounds in (
            (m, state1, absmax1, maps.bounds1),
            (v, state2, absmax2, maps.bounds2),
        ):
            q, a = quantize_blockwise(values, bounds)
            codes[start:stop].copy_(q)
            absmax[b0:b1].copy_(a)


_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adamw_8bit_native_(
    p: torch.Tensor,
    g: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    maps: QuantMaps,
    sc: StepScalars,
    isa: str = "auto",
) -> bool:
    """:func:`adamw_8bit_` in one native pass over each 256-element block (the CPU
    extension, ``csrc/cpu/adamw_8bit.cpp``): the same parameters, codes and absmax, bit for
    bit, several times faster.

    Args:
        p: ``[n]`` contiguous fp32/bf16/fp16 CPU tensor, updated in place (computed in fp32,
            rounded once to its dtype, as :func:`adamw_8bit_` with ``p.float()`` does).
        g: ``[n]`` gradient, any float dtype (other than fp32/bf16/fp16 it is rounded to fp32
            first, as :func:`adamw_8bit_` does).
        state1, state2, absmax1, absmax2, maps, sc: as :func:`adamw_8bit_`; ``maps`` the CPU
            maps (:func:`quant_maps`).
        isa: ``"auto"``, or ``"scalar"`` / ``"avx2"`` to force a loop (tests).

    Returns:
        ``False``, with nothing changed, when the native path does not apply: the extension
        is unavailable (:func:`trilora.native.cpu_ext.load`), a tensor is not on the CPU or
        not contiguous, or ``p`` is of another dtype; the caller then runs :func:`adamw_8bit_`.
    """
    from trilora.native import cpu_ext

    tensors = (p, g, state1, state2, absmax1, absmax2)
    if maps.lut1 is None or maps.lut2 is None or any(t.device.type != "cpu" for t in tensors):
        return False
    if p.dtype not in _NATIVE_DTYPES or not p.is_contiguous():
        return False
    if not all(t.is_contiguous() for t in (state1, state2, absmax1, absmax2)):
        return False
    ext = cpu_ext.load()
    if ext is None:
        return False
    if g.dtype not in _NATIVE_DTYPES:
        g = g.float()
    ext.adamw_8bit_step(
        p,
        g.contiguous(),
        state1,
        state2,
        absmax1,
        absmax2,
        maps.qmap1,
        maps.qmap2,
        maps.bounds1,
        maps.bounds2,
        maps.lut1,
        maps.lut2,
        sc.decay,
        sc.w1,
        sc.beta2,
        sc.w2,
        sc.step_size,
        sc.bc2_sqrt,
        sc.eps,
        sc.weight_decay != 0,
        isa,
    )
    return True


__all__ = [
    "MIN_8BIT_SIZE",
    "QBLOCK",
    "QuantMaps",
    "StepScalars",
    "adamw_8bit_",
    "adamw_8bit_native_",
    "adamw_32bit_",
    "block_absmax",
    "dequantize_blockwise",
    "nblocks",
    "nearest_code_lut",
    "quant_maps",
    "quantize_blockwise",
]
