"""The one quantization settings type: which format, and its options.

Every entry point that takes quantization settings (``trilora.from_pretrained``, the PEFT
backend, ``trilora train --quant``, ``trilora mem --quant``, ``trilora merge``) builds a
:class:`QuantConfig` and lets it validate; :meth:`QuantConfig.from_bnb` reads transformers'
``BitsAndBytesConfig`` (or a checkpoint's ``quantization_config`` dict) and
:meth:`QuantConfig.to_bnb` writes one back, so a config survives the round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

QUANT_TYPES = ("nf4", "fp4", "int8")
"""Every ``quant_type`` trilora reads and writes: the 4-bit NF4/FP4 tables, bitsandbytes 8-bit."""
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


class QuantConfigError(ValueError):
    """Quantization settings trilora cannot honour (one line naming the setting)."""


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise :class:`QuantConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise QuantConfigError(f"{name} must be one of {allowed}, got {value!r}")


def _dtype(value: Any, field: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise QuantConfigError(f"{field} must name a torch dtype, got {value!r}")
    return dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class QuantConfig:
    """How linear base weights are quantized.

    Attributes:
        quant_type: ``"nf4"`` / ``"fp4"`` (bitsandbytes 4-bit) or ``"int8"`` (bitsandbytes
            LLM.int8 weights: int8 codes with one fp32 absmax per row).
        blocksize: 4-bit absmax block size (ignored by int8, whose blocks are rows).
        double_quant: 4-bit only: quantize the absmax to 8 bits.
        compute_dtype: dtype the base matmul runs in (None: the input's dtype).
        quant_storage: 4-bit only: dtype the packed bytes are viewed as (bf16 for FSDP).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = torch.bfloat16
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_choice("blocksize", self.blocksize, BLOCKSIZES)
        check_choice("quant_storage", self.quant_storage, STORAGE_DTYPES)
        if self.compute_dtype is not None and not self.compute_dtype.is_floating_point:
            raise QuantConfigError(f"compute_dtype must be a float dtype, got {self.compute_dtype}")

    @property
    def format_name(self) -> str:
        """The weight format: ``"4bit"`` (NF4 and FP4 share one layout) or ``"int8"``."""
        return "int8" if self.quant_type == "int8" else "4bit"

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "int8" else 4

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)

    @classmethod
    def from_bnb(cls, config: Any, defaults: QuantConfig | None = None) -> QuantConfig:
        """Read a ``transformers.BitsAndBytesConfig`` or a checkpoint's
        ``quantization_config`` dict; options it does not set come from ``defaults``.

        Raises:
            QuantConfigError: not a bitsandbytes config, neither 4- nor 8-bit, or an
                option outside what trilora supports.
        """
        base = defaults or cls()
        qc = config if isinstance(config, Mapping) else config.to_dict()
        method = qc.get("quant_method", "bitsandbytes")
        method = getattr(method, "value", method)
        if method != "bitsandbytes":
            raise QuantConfigError(
                f"trilora loads bitsandbytes quantization only; the quantization config says "
                f"quant_method={method!r}"
            )
        if qc.get("load_in_8bit"):
            if qc.get("llm_int8_has_fp16_weight"):
                raise QuantConfigError(
                    "the quantization config sets llm_int8_has_fp16_weight=True (16-bit "
                    "weights trained in place); trilora's int8 base is frozen int8"
                )
            return replace(base, quant_type="int8", compute_dtype=base.compute_dtype)
        if not qc.get("load_in_4bit", False):
            raise QuantConfigError(
                f"the quantization config sets neither load_in_4bit nor load_in_8bit: {dict(qc)}"
            )
        quant_type = qc.get("bnb_4bit_quant_type") or base.quant_type
        if quant_type == "int8":
            quant_type = "nf4"
        return cls(
            quant_type=quant_type,
            blocksize=base.blocksize,
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", base.double_quant)),
            compute_dtype=_dtype(qc.get("bnb_4bit_compute_dtype"), "bnb_4bit_compute_dtype")
            or base.compute_dtype,
            quant_storage=_dtype(qc.get("bnb_4bit_quant_storage"), "bnb_4bit_quant_storage")
            or base.quant_storage,
        )

    def to_bnb(self, skip_modules: list[str] | None = None) -> dict[str, Any]:
        """The ``quantization_config`` dict transformers + bitsandbytes load this format with.

        ``skip_modules`` becomes ``llm_int8_skip_modules`` (transformers drops its default
        skip list when that option is given, so it must be complete)."""
        int8 = self.quant_type == "int8"
        qc: dict[str, Any] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": not int8,
            "load_in_8bit": int8,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }
        if not int8:
            qc.update(
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=_name(self.compute_dtype or torch.float32),
                bnb_4bit_quant_storage=_name(self.quant_storage),
            )
        if skip_modules is not None:
            qc["llm_int8_skip_modules"] = list(skip_modules)
        return qc
