"""bitsandbytes 8-bit (LLM.int8) weights: the weight type, its quantizer, the format object."""

from trilora.formats.int8.format import FORMAT, FormatInt8
from trilora.formats.int8.weight import ROW_FORMAT, Int8Weight, quantize

__all__ = ["FORMAT", "ROW_FORMAT", "FormatInt8", "Int8Weight", "quantize"]
