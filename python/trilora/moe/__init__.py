"""Mixture-of-experts models: experts quantized expert by expert, LoRA on them, and the
experts forward trilora registers with transformers (see ``docs/moe.md``)."""

from trilora.moe.experts import QuantizedExperts
from trilora.moe.forward import (
    IMPLEMENTATION,
    expert_lora,
    experts_forward,
    experts_modules,
    experts_summary,
    experts_tensors,
    is_experts_module,
    quantize_experts,
    register_trilora_experts,
    use_trilora_experts,
)

__all__ = [
    "IMPLEMENTATION",
    "QuantizedExperts",
    "expert_lora",
    "experts_forward",
    "experts_modules",
    "experts_summary",
    "experts_tensors",
    "is_experts_module",
    "quantize_experts",
    "register_trilora_experts",
    "use_trilora_experts",
]
