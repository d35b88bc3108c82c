"""trilora's ops: torch.library custom ops with autograd, a torch reference path and fake
(meta) implementations. See ``docs/architecture.md``."""

from trilora.ops.linear_cross_entropy import linear_cross_entropy
from trilora.ops.qlora_linear import qlora_linear
from trilora.ops.quantize import dequantize_4bit, quantize_4bit
from trilora.ops.rms_norm import rms_norm

__all__ = ["dequantize_4bit", "linear_cross_entropy", "qlora_linear", "quantize_4bit", "rms_norm"]
