"""The 4-bit quantized weight (NF4/FP4), byte-compatible with bitsandbytes.

A :class:`QuantizedWeight` holds the packed NF4/FP4 codes of one tensor and the state
needed to decode them. Every field and every serialized key is what
``bitsandbytes.functional.quantize_4bit`` produces and what transformers checkpoints store,
so weights move between trilora and bitsandbytes without re-quantization:

* ``packed``: ``quant_storage`` tensor of shape ``((n+1)//2 // itemsize, 1)``. Element
  ``i`` of the row-major flattened weight sits in byte ``i // 2``, high nibble first; an
  odd count is padded with a zero nibble.
* ``absmax``: one scale per ``blocksize`` elements, fp32, or (double quantization) uint8
  codes of ``absmax - offset`` under the 256-entry signed dynamic map, with one fp32
  ``nested_absmax`` per 256 scales.
* ``code``: the 16-entry table (``quant_map``) in bit order.

Serialized keys (prefix ``weight``): ``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map`` and
``weight.quant_state.bitsandbytes__{nf4,fp4}`` (a uint8 tensor holding JSON with
``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``,
``nested_dtype`` and ``nested_offset``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from trilora.formats.config import BLOCKSIZES, STORAGE_DTYPES, check_choice
from trilora.ops.quantize import (
    NESTED_BLOCKSIZE,
    dequantize_4bit,
    dequantize_absmax,
    dynamic_map,
    kernel_weight,
    quantize_4bit,
    quantize_blockwise_8bit,
)

QUANT_TYPES = ("nf4", "fp4")
"""The 4-bit code tables (``QuantConfig.quant_type`` also allows ``"int8"``)."""
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_NF4 = [
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
]
# FP4 with sign bit 3 and exponent bias 2, listed in bit order. Code 8 is "-0", but
# bitsandbytes stores it as +0.0 (its table literal is the integer 0); so do we, so that a
# checkpoint's quant_map bytes are identical. Both zeros decode to the same value.
_FP4 = [
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
]


def code_table(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The fp32 ``[16]`` code table of ``quant_type`` in bit order, normalized to [-1, 1]
    with the same fp32 division bitsandbytes uses."""
    check_choice("quant_type", quant_type, QUANT_TYPES)
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return data.div_(data.abs().max()).to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str, field: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant_state field {field!r} must name a torch dtype, got {name!r}")
    return dtype


@dataclass(frozen=True)
class QuantizedWeight:
    """One tensor in bitsandbytes' 4-bit format (see the module docstring).

    Attributes:
        packed: ``quant_storage`` ``((n+1)//2 // itemsize, 1)``; the packed codes.
        absmax: fp32 ``[nblocks]``, or uint8 ``[nblocks]`` when double-quantized.
        code: fp32 ``[16]``; the NF4/FP4 table in bit order.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: elements per absmax block.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (the default dequantization dtype).
        nested_absmax: fp32 ``[ceil(nblocks/256)]``, double quantization only.
        nested_code: fp32 ``[256]`` dynamic map, double quantization only.
        offset: fp32 0-d tensor, double quantization only.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    format_name = "4bit"
    """The :mod:`trilora.formats` registry key of this layout."""

    def __post_init__(self) -> None:
        check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_choice("blocksize", self.blocksize, BLOCKSIZES)
        check_choice("dtype", self.dtype, FLOAT_DTYPES)
        n = self.numel
        nbytes = self.packed.numel() * self.packed.element_size()
        # A packed buffer in a wide storage dtype rounds the byte count up to whole elements.
        if not (n + 1) // 2 <= nbytes < (n + 1) // 2 + self.packed.element_size():
            raise ValueError(
                f"packed weight holds {nbytes} bytes but shape {tuple(self.shape)} needs "
                f"{(n + 1) // 2}"
            )
        nblocks = -(-n // self.blocksize)
        if self.absmax.numel() != nblocks:
            raise ValueError(
                f"absmax has {self.absmax.numel()} entries but shape {tuple(self.shape)} with "
                f"blocksize {self.blocksize} needs {nblocks}"
            )
        if self.code.numel() != 16:
            raise ValueError(f"quant_map must have 16 entries, got {self.code.numel()}")
        nested = (self.nested_absmax, self.nested_code, self.offset)
        if any(t is not None for t in nested) and any(t is None for t in nested):
            raise ValueError(
                "double-quantized state needs nested_absmax, nested_code and offset together"
            )
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
            if self.nested_absmax.numel() != -(-nblocks // NESTED_BLOCKSIZE):
                raise ValueError(
                    f"nested_absmax has {self.nested_absmax.numel()} entries, expected "
                    f"{-(-nblocks // NESTED_BLOCKSIZE)}"
                )
            if self.nested_code.numel() != 256:
                raise ValueError(
                    f"nested_quant_map must have 256 entries, got {self.nested_code.numel()}"
                )
        elif self.absmax.dtype != torch.float32:
            raise ValueError(
                f"absmax must be float32 without double quantization, got {self.absmax.dtype}"
            )

    # --- properties ---------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device by the packed codes and all quantization state."""
        tensors = [
            self.packed,
            self.absmax,
            self.code,
            self.nested_absmax,
            self.nested_code,
            self.offset,
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def scales(self) -> torch.Tensor:
        """fp32 ``[nblocks]`` per-block scales (double quantization decoded)."""
        return dequantize_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset)

    # --- conversion ---------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the original dtype), shape :attr:`shape`.

        Equal to ``bitsandbytes.functional.dequantize_4bit`` on the same state. ``dtype``
        is fp32, fp16 or bf16 (or fp64 on CPU, for references).
        """
        dtype = self.dtype if dtype is None else dtype
        # float64 serves as the reference in tests; it runs on the torch path only.
        check_choice("dtype", dtype, (*FLOAT_DTYPES, torch.float64))
        return dequantize_4bit(
            self.packed,
            self.absmax,
            self.code,
            self.nested_absmax,
            self.nested_code,
            self.offset,
            self.blocksize,
            list(self.shape),
            dtype,
        )

    def kernel_args(self):
        """The tensors and sizes the Triton launchers take (``trilora.kernels.quantize.Weight4bit``)."""
        return kernel_weight(
            self.packed,
            self.absmax,
            self.code,
            self.nested_absmax,
            self.nested_code,
            self.offset,
            self.blocksize,
            self.shape,
        )

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    def with_storage(self, quant_storage: torch.dtype) -> QuantizedWeight:
        """The same bytes viewed as ``quant_storage`` (e.g. bf16 so FSDP can shard them).

        Padding added for the old storage's item size is dropped first, so any storage can
        go to any other (e.g. fp32 -> bf16 for an odd byte count)."""
        code_bytes = (self.numel + 1) // 2
        packed_u8 = self.packed.reshape(-1).view(torch.uint8)[:code_bytes]
        return replace(self, packed=pack_storage(packed_u8, quant_storage))

    # --- serialization ------------------------------------------------------------------

    def quant_state_dict(self) -> dict[str, object]:
        """The JSON fields bitsandbytes packs into ``quant_state.bitsandbytes__<type>``."""
        fields: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            fields.update(
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_dtype="float32",
                nested_offset=float(self.offset.item()),
            )
        return fields

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The checkpoint tensors under ``prefix``, with transformers/bitsandbytes keys."""
        sd = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.code,
        }
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code
        payload = json.dumps(self.quant_state_dict()).encode("utf-8")
        sd[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(payload), dtype=torch.uint8
        )
        return sd

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight"
    ) -> QuantizedWeight:
        """Read a weight written by :meth:`to_state_dict`, bitsandbytes or transformers.

        Raises:
            KeyError: a required key is missing (the message lists the keys present).
            ValueError: the keys are present but inconsistent with each other.
        """
        qs_keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        required = [prefix, f"{prefix}.absmax", f"{prefix}.quant_map"]
        missing = [k for k in required if k not in state_dict]
        if not qs_keys:
            missing.append(f"{prefix}.quant_state.bitsandbytes__{{nf4,fp4}}")
        if missing:
            present = sorted(k for k in state_dict if k == prefix or k.startswith(prefix + "."))
            raise KeyError(
                f"4-bit state dict is missing {missing}; keys under {prefix!r}: {present}"
            )
        if len(qs_keys) > 1:
            raise ValueError(f"expected one quant_state key under {prefix!r}, found {qs_keys}")
        try:
            fields = json.loads(
                bytes(state_dict[qs_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8")
            )
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{qs_keys[0]} does not hold valid JSON: {exc}") from exc
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in fields:
                raise ValueError(f"{qs_keys[0]} lacks field {field!r}; it has {sorted(fields)}")
        key_type = qs_keys[0].rsplit("__", 1)[1]
        if fields["quant_type"] != key_type:
            raise ValueError(
                f"quant_state key says {key_type!r} but its JSON says quant_type={fields['quant_type']!r}"
            )
        nested = f"{prefix}.nested_absmax" in state_dict
        if nested:
            for key in (f"{prefix}.nested_quant_map",):
                if key not in state_dict:
                    raise KeyError(f"4-bit state dict has {prefix}.nested_absmax but not {key}")
            if "nested_offset" not in fields:
                raise ValueError(
                    f"{qs_keys[0]} lacks nested_offset although nested_absmax is present"
                )
            if int(fields.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
                raise ValueError(
                    f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {fields['nested_blocksize']}"
                )
        absmax = state_dict[f"{prefix}.absmax"]
        device = state_dict[prefix].device
        return cls(
            packed=state_dict[prefix],
            absmax=absmax,
            code=state_dict[f"{prefix}.quant_map"].float(),
            quant_type=fields["quant_type"],
            blocksize=int(fields["blocksize"]),
            shape=torch.Size(fields["shape"]),
            dtype=_parse_dtype(fields["dtype"], "dtype"),
            nested_absmax=state_dict[f"{prefix}.nested_absmax"].float() if nested else None,
            nested_code=state_dict[f"{prefix}.nested_quant_map"].float() if nested else None,
            offset=torch.tensor(float(fields["nested_offset"]), device=device) if nested else None,
        )

    # --- bitsandbytes interop -----------------------------------------------------------

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> QuantizedWeight:
        """Wrap a bitsandbytes ``(packed, QuantState)`` pair (e.g. ``Params4bit`` and its
        ``quant_state``) without copying or re-quantizing."""
        nested = quant_state.nested
        return cls(
            packed=packed.data if isinstance(packed, torch.nn.Parameter) else packed,
            absmax=quant_state.absmax,
            code=quant_state.code.float(),
            quant_type=quant_state.quant_type,
            blocksize=int(quant_state.blocksize),
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            nested_absmax=quant_state.state2.absmax if nested else None,
            nested_code=quant_state.state2.code.float() if nested else None,
            offset=quant_state.offset.reshape(()).float() if nested else None,
        )


def pack_storage(packed_u8: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """Packed uint8 codes ``[nbytes]`` viewed as ``quant_storage`` elements, shaped
    ``[nbytes // itemsize, 1]`` as bitsandbytes stores them."""
    check_choice("quant_storage", quant_storage, STORAGE_DTYPES)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    pad = (-packed_u8.numel()) % itemsize
    if pad:
        packed_u8 = torch.cat([packed_u8, packed_u8.new_zeros(pad)])
    return packed_u8.view(quant_storage).unsqueeze(1)


def _check_finite(weight: torch.Tensor, absmax: torch.Tensor) -> None:
    if weight.device.type == "meta":
        return
    # On the CPU path the per-block max propagates NaN/Inf, so the absmax (1/blocksize of the
    # weight) answers for the whole tensor: a quarter of quantize()'s time saved. The Triton
    # kernel's max may drop NaN, so GPU weights are checked directly (cheap there).
    finite = torch.isfinite(absmax if weight.device.type == "cpu" else weight).all()
    if not bool(finite):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"weight has {bad} NaN/Inf value(s); 4-bit quantization needs finite values"
        )


def quantize(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> QuantizedWeight:
    """Quantize ``weight`` to bitsandbytes' 4-bit format.

    Byte-identical to ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage)``.

    Args:
        weight: any shape, fp32/fp16/bf16, finite.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: one of 32, 64, 128, 256, 512, 1024, 2048, 4096.
        double_quant: also quantize the per-block absmax to 8 bits (blocks of 256).
        quant_storage: dtype the packed bytes are viewed as (uint8, or e.g. bf16 for FSDP).

    Raises:
        TypeError: ``weight`` is not a floating-point tensor of a supported dtype.
        ValueError: unsupported option, an empty weight, or NaN/Inf values.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    check_choice("quant_type", quant_type, QUANT_TYPES)
    check_choice("blocksize", blocksize, BLOCKSIZES)
    check_choice("quant_storage", quant_storage, STORAGE_DTYPES)
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    code = code_table(quant_type, weight.device)
    packed, absmax = quantize_4bit(weight.detach(), code, blocksize)
    _check_finite(weight, absmax)
    nested_absmax = nested_code = offset = None
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map().to(weight.device)
        absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code)
    return QuantizedWeight(
        packed=pack_storage(packed, quant_storage),
        absmax=absmax,
        code=code,
        quant_type=quant_type,
        blocksize=blocksize,
        shape=weight.shape,
        dtype=weight.dtype,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=offset,
    )
