"""trilora: QLoRA fine-tuning with bitsandbytes-compatible 4-bit weights and Triton kernels.

The format and modules import eagerly; the model-level entry points (loading, PEFT
patching, merging, checkpointing, memory planning) import on first use, so ``import
trilora`` stays light and never touches transformers or PEFT global state.
"""

from __future__ import annotations

import importlib

from trilora.nn import Linear4bit, QLoraLinear
from trilora.quant import QuantizedWeight, quantize

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "trilora.loading",
    "save_quantized": "trilora.loading",
    "patch": "trilora.peft",
    "get_peft_model": "trilora.peft",
    "merge": "trilora.merge",
    "enable_checkpointing": "trilora.checkpoint",
    "ops": "trilora.ops",
    "config": "trilora.config",
}

__all__ = ["Linear4bit", "QLoraLinear", "QuantizedWeight", "__version__", "quantize", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trilora' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
