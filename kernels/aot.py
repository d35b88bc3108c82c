"""The registry of trilora's Triton kernels for ahead-of-time checks (``trilora.kernels.aot``).

``kernels/`` is installed as ``trilora.kernels``. It has no ``__init__.py`` on purpose: a
regular package named ``kernels`` at the repository root would shadow Hugging Face's
``kernels`` distribution (which transformers imports) whenever the root is on ``sys.path``.

One module per op family. Each module holds private ``@triton.jit`` kernels followed by
launchers, and exports ``AOT_SPECS``: every (kernel, signature, constexprs) combination the
launchers can ship, so ``trilora kernels`` can compile all of them ahead of time for sm_80 and
sm_90 on a machine without a GPU.

This package imports torch and triton only, never ``torch.nn`` or trilora's higher layers.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple


class AotSpec(NamedTuple):
    """One compile unit for ahead-of-time checking.

    ``signature`` maps every kernel argument to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the value of each constexpr argument;
    ``options`` are compile options (``num_warps``, ``num_stages``, ``enable_fp_fusion``)
    exactly as the launcher passes them.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = {}  # noqa: RUF012 - NamedTuple default, never mutated


# Modules (relative to this package) whose AOT_SPECS make up the shipped kernel set.
KERNEL_MODULES: tuple[str, ...] = (
    "quantize",
    "qlora_linear",
    "grouped_qlora",
    "cross_entropy",
    "rms_norm",
    "optim",
)


def all_aot_specs() -> list[AotSpec]:
    """Every shipped kernel configuration of every module listed in ``KERNEL_MODULES``."""
    specs: list[AotSpec] = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        specs.extend(module.AOT_SPECS)
    return specs


__all__ = ["KERNEL_MODULES", "AotSpec", "all_aot_specs"]
