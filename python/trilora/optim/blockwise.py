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
    """

    qmap1: torch.Tensor
    qmap2: torch.Tensor
    bounds1: torch.Tensor
    bounds2: torch.Tensor


def _bounds(qmap: torch.Tensor) -> torch.Tensor:
    mid = (qmap[:-1] + qmap[1:]) / 2
    return torch.cat([mid, torch.full((1,), math.inf, dtype=torch.float32)])


@functools.lru_cache(maxsize=8)
def _maps(device: str) -> QuantMaps:
    q1, q2 = dynamic_map(True).clone(), dynamic_map(False).clone()
    return QuantMaps(
        *(t.to(device) for t in (q1, q2, _bounds(q1), _bounds(q2)))  # type: ignore[arg-type]
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


__all__ = [
    "MIN_8BIT_SIZE",
    "QBLOCK",
    "QuantMaps",
    "StepScalars",
    "adamw_8bit_",
    "adamw_32bit_",
    "block_absmax",
    "dequantize_blockwise",
    "nblocks",
    "quant_maps",
    "quantize_blockwise",
]
