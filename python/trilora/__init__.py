"""trilora: QLoRA fine-tuning with bitsandbytes-compatible 4-bit weights and Triton kernels."""

from trilora.nn import Linear4bit, QLoraLinear
from trilora.quant import QuantizedWeight, quantize

__version__ = "0.1.0"
__all__ = ["Linear4bit", "QLoraLinear", "QuantizedWeight", "__version__", "quantize"]
