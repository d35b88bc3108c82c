"""trilora: QLoRA fine-tuning with bitsandbytes-compatible 4-bit weights and Triton kernels."""

from trilora.quant import QuantizedWeight, quantize

__version__ = "0.1.0"
__all__ = ["QuantizedWeight", "__version__", "quantize"]
