"""Memory ceilings of QLoRA training, computed without a GPU (``trilora mem``).

See :mod:`trilora.memory.profiler` for how the step is traced, :mod:`trilora.memory.fast`
for how long contexts are answered from short traces, and ``docs/memory.md`` for the user
guide.
"""

from trilora.memory.bench import bench_cases
from trilora.memory.fast import FastProfiler
from trilora.memory.profiler import (
    MemOptions,
    MemReport,
    find_max,
    load_config,
    preset_names,
    profile,
    profile_trilora,
    sweep,
)

__all__ = [
    "FastProfiler",
    "MemOptions",
    "MemReport",
    "bench_cases",
    "find_max",
    "load_config",
    "preset_names",
    "profile",
    "profile_trilora",
    "sweep",
]
