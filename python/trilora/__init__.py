"""trilora: QLoRA fine-tuning with bitsandbytes-compatible 4-bit weights and Triton kernels.

Every public name imports on first use, so ``import trilora`` (and the ``trilora`` command's
``--help``) does not import torch, and never touches transformers or PEFT global state.

Imported before torch, it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose an OpenMP
wait policy (:mod:`trilora._openmp`): idle OpenMP threads then sleep instead of spinning,
which on a busy machine keeps trilora's CPU work at its fair share. Imported after torch it
changes nothing (``docs/cpu.md`` says how to get the same effect then).
"""

from __future__ import annotations

import importlib

from trilora._openmp import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "Linear4bit": ("trilora.nn", "Linear4bit"),
    "QLoraLinear": ("trilora.nn", "QLoraLinear"),
    "QuantizedWeight": ("trilora.quant", "QuantizedWeight"),
    "quantize": ("trilora.quant", "quantize"),
    "from_pretrained": ("trilora.loading", "from_pretrained"),
    "save_quantized": ("trilora.loading", "save_quantized"),
    "patch": ("trilora.peft", "patch"),
    "get_peft_model": ("trilora.peft", "get_peft_model"),
    "merge": ("trilora.merging", "merge"),
    "enable_checkpointing": ("trilora.patches.activation_checkpointing", "enable_checkpointing"),
    "offload_input_embeddings": ("trilora.patches.embedding_offload", "offload_input_embeddings"),
    "enable_fused_rms_norm": ("trilora.patches.fused_norm", "enable_fused_rms_norm"),
    "enable_grouped_attention": ("trilora.patches.grouped_attention", "enable_grouped_attention"),
    "CPUOffloadAdamW": ("trilora.optim", "CPUOffloadAdamW"),
    "AdamW": ("trilora.optim", "AdamW"),
    "AdamW8bit": ("trilora.optim", "AdamW8bit"),
    "PagedAdamW": ("trilora.optim", "PagedAdamW"),
    "PagedAdamW8bit": ("trilora.optim", "PagedAdamW8bit"),
    "optim": ("trilora.optim", None),
    "cuda_ext": ("trilora.native.cuda_ext", None),
    "distributed": ("trilora.distributed", None),
    "ops": ("trilora.ops", None),
    "config": ("trilora.config", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trilora' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
