"""Memory ceilings of QLoRA training, computed without a GPU (``trilora mem``).

See :mod:`trilora.memory.profiler` for how the step is traced, :mod:`trilora.memory.fast`
for how long contexts are answered from short traces, and ``docs/memory.md`` for the user
guide. The names below import on first use, so ``trilora.memory.cli`` (the command's
parser) loads without torch.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_LAZY = {
    "bench_cases": "trilora.memory.bench",
    "FastProfiler": "trilora.memory.fast",
    "MemOptions": "trilora.memory.profiler",
    "MemReport": "trilora.memory.profiler",
    "find_max": "trilora.memory.profiler",
    "load_config": "trilora.memory.profiler",
    "preset_names": "trilora.memory.profiler",
    "profile": "trilora.memory.profiler",
    "profile_trilora": "trilora.memory.profiler",
    "sweep": "trilora.memory.profiler",
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
