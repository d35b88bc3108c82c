"""trilora's optimizers: one fused AdamW at 32 or 8 bits, resident, paged or on the host.

* :class:`AdamW` ``(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
  state_bits=32, paging="off", device_budget=None, offload_gradients=False)``;
* the names bitsandbytes users expect: :class:`AdamW8bit` (``state_bits=8``),
  :class:`PagedAdamW` (``paging="auto"``), :class:`PagedAdamW8bit` (both);
* :class:`CPUOffloadAdamW`: the update on the CPU with state, fp32 masters and gradients in
  host memory (``paging="host", device_budget=0``, offloaded gradients);
* :data:`OPTIMIZERS`: the names of the common settings (``trilora train --optim``,
  ``trilora mem --optimizer``) and :func:`create` to build one by name;
* :func:`to_bitsandbytes`: a state dict in bitsandbytes' layout.

``from trilora.optim import OPTIMIZERS`` does not import torch (command-line parsers use it);
everything else is imported on first access. See ``docs/optimizer.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"state_bits": 32, "paging": "off"},
    "adamw_8bit": {"state_bits": 8, "paging": "off"},
    "paged_adamw": {"state_bits": 32, "paging": "auto"},
    "paged_adamw_8bit": {"state_bits": 8, "paging": "auto"},
    "adamw_host": {"state_bits": 32, "paging": "host", "device_budget": 0},
    "adamw_8bit_host": {"state_bits": 8, "paging": "host", "device_budget": 0},
    "adamw_uvm": {"state_bits": 32, "paging": "uvm"},
    "adamw_8bit_uvm": {"state_bits": 8, "paging": "uvm"},
    "adamw_cpu_offload": {
        "state_bits": 32,
        "paging": "host",
        "device_budget": 0,
        "offload_gradients": True,
    },
    "adamw_8bit_cpu_offload": {
        "state_bits": 8,
        "paging": "host",
        "device_budget": 0,
        "offload_gradients": True,
    },
}
"""Optimizer names and the :class:`AdamW` settings each stands for: ``*_8bit*`` 8-bit state;
``paged_*`` resident until memory gets tight (bitsandbytes' names); ``*_host`` all state in
pinned host memory, streamed through the device a page at a time; ``*_uvm`` CUDA managed
memory; ``*_cpu_offload`` the update on the CPU with gradients moved to the host as backward
produces them (:class:`CPUOffloadAdamW`)."""


def create(name: str, params, **kwargs: Any):
    """The optimizer called ``name`` (a key of :data:`OPTIMIZERS`) over ``params``;
    ``kwargs`` (lr, betas, eps, weight_decay, device_budget, ...) override its settings."""
    from trilora.optim.adamw import AdamW
    from trilora.optim.errors import OptimizerInputError

    if name not in OPTIMIZERS:
        raise OptimizerInputError(
            f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}"
        )
    return AdamW(params, **{**OPTIMIZERS[name], **kwargs})


# name -> submodule holding it, imported on first access (torch comes with them)
_LAZY = {
    "AdamW": "adamw",
    "AdamW8bit": "adamw",
    "PagedAdamW": "adamw",
    "PagedAdamW8bit": "adamw",
    "CPUOffloadAdamW": "adamw",
    "PAGING_MODES": "adamw",
    "STATE_BITS": "adamw",
    "to_bitsandbytes": "state_dict_layout",
    "OptimizerInputError": "errors",
    "ParameterTypeError": "errors",
    "StateDictLayoutError": "errors",
    "PagingFallbackWarning": "errors",
    "UnclippedGradientsWarning": "errors",
    # transformers.TrainerCallback costs seconds to import
    "OffloadClipCallback": "callbacks",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["OPTIMIZERS", "create", *_LAZY]
