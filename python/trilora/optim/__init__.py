"""trilora's optimizers: one fused AdamW at 32 or 8 bits, resident, paged or on the host.

* :class:`AdamW` ``(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
  state_bits=32, paging="off", device_budget=None, offload_gradients=False)``;
* the names bitsandbytes users expect: :class:`AdamW8bit` (``state_bits=8``),
  :class:`PagedAdamW` (``paging="auto"``), :class:`PagedAdamW8bit` (both);
* :class:`CPUOffloadAdamW`: the update on the CPU with state, fp32 masters and gradients in
  host memory (``paging="host", device_budget=0``, offloaded gradients);
* :data:`OPTIMIZERS`: the ``--optim`` names of the trainer and :func:`create` to build one;
* :func:`to_bitsandbytes`: a state dict in bitsandbytes' layout.

See ``docs/optimizer.md``.
"""

from __future__ import annotations

from typing import Any

from trilora.optim.adamw import (
    PAGING_MODES,
    STATE_BITS,
    AdamW,
    AdamW8bit,
    CPUOffloadAdamW,
    PagedAdamW,
    PagedAdamW8bit,
)
from trilora.optim.checkpoint import to_bitsandbytes
from trilora.optim.errors import (
    OptimizerInputError,
    PagingFallbackWarning,
    ParameterTypeError,
    StateDictLayoutError,
    UnclippedGradientsWarning,
)

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"state_bits": 32, "paging": "off"},
    "adamw_8bit": {"state_bits": 8, "paging": "off"},
    "paged_adamw": {"state_bits": 32, "paging": "auto"},
    "paged_adamw_8bit": {"state_bits": 8, "paging": "auto"},
    "adamw_host": {"state_bits": 32, "paging": "host", "device_budget": 0},
    "adamw_8bit_host": {"state_bits": 8, "paging": "host", "device_budget": 0},
    "adamw_uvm": {"state_bits": 32, "paging": "uvm"},
    "adamw_8bit_uvm": {"state_bits": 8, "paging": "uvm"},
    "adamw_cpu_offload": {"state_bits": 32, "paging": "host", "device_budget": 0,
                          "offload_gradients": True},
    "adamw_8bit_cpu_offload": {"state_bits": 8, "paging": "host", "device_budget": 0,
                               "offload_gradients": True},
}  # fmt: skip
"""Optimizer names (``trilora train --optim``, ``trilora mem --optimizer``) and the
:class:`AdamW` settings each stands for."""


def create(name: str, params, **kwargs: Any) -> AdamW:
    """The optimizer called ``name`` (a key of :data:`OPTIMIZERS`) over ``params``;
    ``kwargs`` (lr, betas, eps, weight_decay, device_budget, ...) override its settings."""
    if name not in OPTIMIZERS:
        raise OptimizerInputError(
            f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}"
        )
    return AdamW(params, **{**OPTIMIZERS[name], **kwargs})


def __getattr__(name: str) -> Any:
    # transformers.TrainerCallback costs seconds to import: built on first access only.
    if name == "OffloadClipCallback":
        from trilora.optim.callbacks import OffloadClipCallback

        globals()[name] = OffloadClipCallback
        return OffloadClipCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # noqa: RUF022 - grouped by kind
    "AdamW",
    "AdamW8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "CPUOffloadAdamW",
    "OffloadClipCallback",
    "OPTIMIZERS",
    "PAGING_MODES",
    "STATE_BITS",
    "create",
    "to_bitsandbytes",
    "OptimizerInputError",
    "ParameterTypeError",
    "StateDictLayoutError",
    "PagingFallbackWarning",
    "UnclippedGradientsWarning",
]
