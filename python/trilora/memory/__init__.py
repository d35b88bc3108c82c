"""Memory ceilings of QLoRA training, computed without a GPU (``trilora mem``).

Modules, bottom to top: :mod:`~trilora.memory.report` (the core types),
:mod:`~trilora.memory.trace` (how the step is traced), :mod:`~trilora.memory.bnb_peft`
(the same step in bitsandbytes + PEFT), :mod:`~trilora.memory.depth` (a whole model from
two depths), :mod:`~trilora.memory.fast` (long contexts from short traces),
:mod:`~trilora.memory.search` (budgets and sweeps), and ``docs/memory.md`` for the user
guide. The names below import on first use, so ``trilora.commands.mem`` (the command's
parser) loads without torch.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_LAZY = {
    "bench_cases": "trilora.memory.bench",
    "FastProfiler": "trilora.memory.fast",
    "MemOptions": "trilora.memory.report",
    "MemReport": "trilora.memory.report",
    "find_max": "trilora.memory.search",
    "load_config": "trilora.memory.trace",
    "preset_names": "trilora.memory.trace",
    "profile": "trilora.memory.search",
    "profile_trilora": "trilora.memory.trace",
    "sweep": "trilora.memory.search",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trilora.memory' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
