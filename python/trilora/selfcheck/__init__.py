"""``trilora selfcheck``: one prepared command that validates trilora on a GPU.

``trilora selfcheck --gpu --out DIR`` runs five sections, in order of value, within one
time budget (``--budget-s``, 420 s by default), each with its share of it:

1. ``environment``: device, driver, CUDA, torch, triton, transformers, peft, bitsandbytes
   and trilora versions (:mod:`trilora.selfcheck.environment`);
2. ``correctness``: every op and kernel against a float64 torch reference, bf16 and fp16,
   odd shapes and Llama-3.1-8B projection shapes (:mod:`trilora.selfcheck.cases`, a
   registry of cases);
3. ``speed``: a short ``trilora bench`` kernels plan on the same shapes, and the measured
   ``fused_max_tokens`` crossover (:mod:`trilora.selfcheck.speed`);
4. ``memory``: ``trilora mem --measure`` on a small model against its own prediction
   (:mod:`trilora.selfcheck.memory`);
5. ``e2e``: one training step of a small Llama at 2,048 tokens, trilora against
   bitsandbytes + PEFT (:mod:`trilora.selfcheck.e2e`).

Without ``--gpu`` the environment and correctness sections run on the CPU, the kernels
through the Triton interpreter at small shapes; that is how CI tests the command.

How it runs (:mod:`trilora.selfcheck.runner`): the parent process never touches the GPU.
Each section runs in a worker process (:mod:`trilora.selfcheck.worker`) that records every
finished unit (a case, a benchmark shape) in a state file, atomically, before it starts the
next. A unit that kills its process (a segfault, a sticky CUDA error such as an illegal
address) is recorded as ``crashed`` and the worker is restarted on the next unit; a section
that outlives its share of the budget is stopped and its remaining units are reported as
not run. ``report.md``, ``results.json`` and the bench rows (``results.csv``) are rewritten
atomically after every section, so an interrupted run still leaves a readable report.

This package's ``__init__``, ``cli`` and ``runner`` modules import no torch.
"""

from __future__ import annotations

# (name, share of the budget, one-line description), in the order they run. A section's
# deadline is the start time plus the cumulative share of the budget of the sections up to
# it, so time a section leaves unused passes to the next ones.
SECTIONS: tuple[tuple[str, float, str], ...] = (
    ("environment", 0.04, "device, driver, CUDA and library versions"),
    ("correctness", 0.37, "every op and kernel against a float64 reference, bf16 and fp16"),
    ("speed", 0.26, "kernels bench plan: vs bf16 LoRA, vs bnb + PEFT, roofline, crossover"),
    ("memory", 0.11, "trilora mem --measure against its own prediction"),
    ("e2e", 0.22, "a training step of a small Llama at 2,048 tokens vs bnb + PEFT"),
)
SECTION_NAMES: tuple[str, ...] = tuple(name for name, _, _ in SECTIONS)
# Sections that need a CUDA device; on the CPU they are reported as skipped.
GPU_ONLY: tuple[str, ...] = ("speed", "memory", "e2e")
DEFAULT_BUDGET_S = 420.0

# Statuses of one unit. "budget": not run because the section's time ran out;
# "crashed": the process died while the unit ran (the worker was restarted after it).
UNIT_STATUSES = ("pass", "fail", "error", "skipped", "budget", "crashed")
FAILED = ("fail", "error", "crashed")

__all__ = ["DEFAULT_BUDGET_S", "FAILED", "GPU_ONLY", "SECTIONS", "SECTION_NAMES", "UNIT_STATUSES"]
