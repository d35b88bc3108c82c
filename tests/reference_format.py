"""The 4-bit format's definition, as the reference every dequantization is checked against.

Written from the format's specification (``docs/architecture.md``, "Quantized format": the bitsandbytes NF4/FP4 layout),
not from trilora's code and not from bitsandbytes' dequantizer, which is wrong on some CPUs
(``docs/bitsandbytes-cpu.md``). bitsandbytes' *quantizer* is right, so tests compare bytes
with ``bitsandbytes.functional.quantize_4bit`` and values with :func:`dequantize`.

The format, for an ``n``-element weight flattened row-major:

* element ``i`` is the 4-bit code in byte ``i // 2`` of the packed buffer (any storage
  dtype, read as bytes), the high nibble for even ``i``;
* its value is ``quant_map[code] * scale[i // blocksize]``;
* ``scale`` is the fp32 ``absmax`` or, double-quantized, the fp32 result of
  ``nested_quant_map[absmax_u8[j]] * nested_absmax[j // 256]`` (rounded to fp32) ``+ offset``
  (rounded to fp32): bitsandbytes materializes the decoded scales as an fp32 tensor before
  using them;
* a dequantized value in fp32 is the product rounded to fp32; in fp16/bf16 it is that fp32
  value cast (the format's dequantization computes in fp32).

Everything here computes in float64. A product of two fp32 values is exact in float64, and
rounding a float64 sum of two fp32 values to fp32 gives the correctly rounded fp32 sum, so
:func:`dequantize` is exact and :func:`expected` gives the one right answer in each dtype.
"""

from __future__ import annotations

import math

import torch

NESTED_BLOCKSIZE = 256

# NF4: quantiles of N(0, 1) with an exact zero, normalized to [-1, 1] (QLoRA, Dettmers et
# al. 2023, appendix E), in bit order.
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4: sign bit 3, exponent bias 2, in bit order, divided by its largest magnitude. Code 8
# is "-0"; checkpoints store it as +0.0 (bitsandbytes' table literal is the integer 0), and
# the stored bytes are what must match.
FP4 = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)


def quant_map(quant_type: str) -> torch.Tensor:
    """The fp32 ``[16]`` table of ``quant_type`` in bit order, as checkpoints store it
    (the ``quant_map`` key)."""
    values = {"nf4": NF4, "fp4": FP4}[quant_type]
    table = torch.tensor(values, dtype=torch.float32)
    return table / table.abs().max()


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int64 ``[n]`` 4-bit codes of ``packed`` (any dtype and shape, read as bytes)."""
    raw = packed.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)
    assert codes.numel() >= n, f"{raw.numel()} packed bytes cannot hold {n} codes"
    return codes[:n]


def scales(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """float64 ``[nblocks]`` per-block scales (each an fp32 value)."""
    if nested_absmax is None:
        assert absmax.dtype == torch.float32, absmax.dtype
        return absmax.detach().double()
    assert absmax.dtype == torch.uint8, absmax.dtype
    index = torch.arange(absmax.numel()) // NESTED_BLOCKSIZE
    product = nested_code.detach().double()[absmax.long()] * nested_absmax.detach().double()[index]
    offset = float(offset)
    return (product.float().double() + offset).float().double()


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The exact float64 values of a 4-bit weight of ``shape``."""
    n = math.prod(shape)
    codes = unpack_codes(packed, n)
    block_scale = scales(absmax, nested_absmax, nested_code, offset)
    assert block_scale.numel() == -(-n // blocksize), (block_scale.numel(), n, blocksize)
    values = code.detach().double()[codes] * block_scale[torch.arange(n) // blocksize]
    return values.view(tuple(shape))


def dequantize_bnb(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """:func:`dequantize` of a bitsandbytes ``(packed, QuantState)`` pair (its fields only)."""
    nested = quant_state.nested
    return dequantize(
        packed,
        quant_state.absmax,
        quant_state.code,
        quant_state.blocksize,
        quant_state.shape,
        quant_state.state2.absmax if nested else None,
        quant_state.state2.code if nested else None,
        quant_state.offset if nested else None,
    )


def dequantize_trilora(qw) -> torch.Tensor:
    """:func:`dequantize` of a ``trilora.QuantizedWeight`` (its stored tensors only)."""
    return dequantize(
        qw.packed,
        qw.absmax,
        qw.code,
        qw.blocksize,
        qw.shape,
        qw.nested_absmax,
        qw.nested_code,
        qw.offset,
    )


def expected(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The format's dequantization in ``dtype``: the exact value rounded to fp32, then cast."""
    return values.float().to(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` calls -0.0 and 0.0 equal, and a float
    view of packed codes can hold NaN bit patterns)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().contiguous().view(-1).view(torch.uint8),
        b.detach().contiguous().view(-1).view(torch.uint8),
    )


def assert_same_state_dict(ours: dict, theirs: dict) -> None:
    """Same keys, and every tensor the same dtype, shape and bytes."""
    assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
    for key in ours:
        assert same_bytes(ours[key], theirs[key]), (key, ours[key], theirs[key])
