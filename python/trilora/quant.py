"""The 4-bit format's names under their historical module (``trilora.quant``).

The format itself lives in :mod:`trilora.formats.nf4`; this module re-exports it so code
written against ``trilora.quant`` keeps working. New code imports from ``trilora.formats``.
"""

from trilora.formats.config import BLOCKSIZES, STORAGE_DTYPES
from trilora.formats.nf4.weight import (
    FLOAT_DTYPES,
    QUANT_TYPES,
    QuantizedWeight,
    code_table,
    pack_storage,
    quantize,
)

__all__ = [
    "BLOCKSIZES",
    "FLOAT_DTYPES",
    "QUANT_TYPES",
    "STORAGE_DTYPES",
    "QuantizedWeight",
    "code_table",
    "pack_storage",
    "quantize",
]
