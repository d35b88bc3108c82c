"""Quantized weight formats: one folder each, one registry, one settings type.

``nf4/`` holds bitsandbytes' 4-bit layout (NF4 and FP4), ``int8/`` bitsandbytes' LLM.int8
weights. :func:`get_format` maps a ``quant_type`` (or a weight's ``format_name``) to its
:class:`~trilora.formats.base.WeightFormat`; :func:`format_for_state_dict` finds the format
of a checkpoint's quantized weight. A new format is a new folder plus one line in
``FORMATS`` (see ``docs/architecture.md``, "Where a new piece goes").
"""

from __future__ import annotations

from typing import Any

from trilora.formats.base import QuantizedTensor, WeightFormat
from trilora.formats.config import (
    BLOCKSIZES,
    QUANT_TYPES,
    STORAGE_DTYPES,
    QuantConfig,
    QuantConfigError,
    check_choice,
)
from trilora.formats.int8 import FORMAT as INT8
from trilora.formats.nf4 import FORMAT as FOUR_BIT

FORMATS: dict[str, Any] = {FOUR_BIT.name: FOUR_BIT, INT8.name: INT8}
"""Format name -> format object."""


def get_format(name: str) -> WeightFormat:
    """The format of a ``quant_type`` (``"nf4"``, ``"fp4"``, ``"int8"``), a
    :class:`QuantConfig`, or a format name (``"4bit"``, ``"int8"``)."""
    if isinstance(name, QuantConfig):
        name = name.format_name
    if name in ("nf4", "fp4"):
        name = FOUR_BIT.name
    if name not in FORMATS:
        raise QuantConfigError(
            f"unknown quantized format {name!r}; trilora has {sorted(FORMATS)} "
            f"(quant_type one of {QUANT_TYPES})"
        )
    return FORMATS[name]


def format_of(weight: QuantizedTensor) -> WeightFormat:
    """The format of a quantized weight object."""
    return FORMATS[weight.format_name]


def format_for_state_dict(keys, prefix: str = "weight") -> WeightFormat | None:
    """The format whose checkpoint keys sit under ``prefix`` in ``keys``, or None."""
    for fmt in FORMATS.values():
        if fmt.owns_state_dict(list(keys), prefix):
            return fmt
    return None


__all__ = [
    "BLOCKSIZES",
    "FORMATS",
    "QUANT_TYPES",
    "STORAGE_DTYPES",
    "QuantConfig",
    "QuantConfigError",
    "QuantizedTensor",
    "WeightFormat",
    "check_choice",
    "format_for_state_dict",
    "format_of",
    "get_format",
]
