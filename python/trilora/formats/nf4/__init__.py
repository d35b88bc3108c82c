"""bitsandbytes 4-bit weights (NF4 / FP4): the weight type, its quantizer, the format object."""

from trilora.formats.nf4.format import FORMAT, Format4bit
from trilora.formats.nf4.weight import (
    FLOAT_DTYPES,
    QUANT_TYPES,
    QuantizedWeight,
    code_table,
    pack_storage,
    quantize,
)

__all__ = [
    "FLOAT_DTYPES",
    "FORMAT",
    "QUANT_TYPES",
    "Format4bit",
    "QuantizedWeight",
    "code_table",
    "pack_storage",
    "quantize",
]
