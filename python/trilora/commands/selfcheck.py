"""``trilora selfcheck``: validate trilora on this machine and write a report.

Imports nothing heavy at module level (``trilora --help`` and ``trilora selfcheck --help``
stay instant); the parent process only imports torch to check ``--gpu`` and to write the
bench CSV rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trilora.selfcheck import DEFAULT_BUDGET_S, GPU_ONLY, SECTION_NAMES, SECTIONS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    sections = "\n".join(f"  {i}. {name}: {desc}" for i, (name, _, desc) in enumerate(SECTIONS, 1))
    p = subparsers.add_parser(
        "selfcheck",
        help="validate trilora on this machine: versions, correctness, speed, memory, e2e",
        description="Validate trilora on this machine within a time budget and write "
        "report.md, results.json and results.csv to --out. Sections, in order of value:\n"
        f"{sections}\n"
        "With --gpu every section runs on the CUDA device (see docs/gpu-check.md). Without it "
        "the environment and correctness sections run on the CPU, the Triton kernels through "
        "the interpreter at small shapes. Exit status 1 when a correctness case fails.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="run every section on the CUDA device (default: off: environment and "
        "correctness on the CPU through the Triton interpreter)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("trilora-selfcheck"),
        help="output folder; must be new or empty unless --overwrite (default: ./trilora-selfcheck)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder (default: off: refuse)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"time budget in seconds for all sections together; each gets its share "
        f"(default: {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument(
        "--sections",
        default="all",
        help=f"comma-separated subset of {','.join(SECTION_NAMES)} (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one shape of every case family (the first real projection in bf16 and fp16, "
        "each other op once): every kernel and op still runs, in a fraction of the time "
        "(default: off: every shape)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the random inputs (default: a fresh one, recorded in the report)",
    )
    return p


def _sections(text: str) -> tuple[str, ...]:
    from trilora.io import UsageError

    if text.strip() == "all":
        return SECTION_NAMES
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in SECTION_NAMES]
    if unknown or not names:
        raise UsageError(
            f"--sections: unknown section(s) {unknown or [text]}; choose from {', '.join(SECTION_NAMES)} or all"
        )
    return tuple(n for n in SECTION_NAMES if n in names)


def run(args: argparse.Namespace) -> int:
    import random

    from trilora.io import UsageError, atomic_directory, check_output
    from trilora.selfcheck.runner import RunOptions, command_line, run_selfcheck

    if not args.budget_s > 0:
        raise UsageError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    sections = _sections(args.sections)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "--gpu needs a CUDA device, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); run without --gpu for the CPU check"
            )
    out = check_output(args.out, overwrite=args.overwrite, kind="dir")
    # A fresh, empty folder (an old one is swapped out only with --overwrite); the runner
    # then rewrites each file in it atomically after every section.
    with atomic_directory(out, overwrite=args.overwrite):
        pass
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    opts = RunOptions(
        gpu=args.gpu,
        out=out,
        budget_s=float(args.budget_s),
        sections=sections,
        seed=seed,
        quick=args.quick,
        command=command_line(sys.argv[1:])
        if sys.argv[1:2] == ["selfcheck"]
        else "trilora selfcheck",
    )
    skipped = [s for s in sections if s in GPU_ONLY] if not args.gpu else []
    print(
        f"trilora selfcheck on {'the GPU' if args.gpu else 'the CPU (Triton interpreter)'}: "
        f"budget {args.budget_s:.0f} s, seed {seed}, report in {out}"
        + (f"; {', '.join(skipped)} need --gpu" if skipped else ""),
        flush=True,
    )
    status = run_selfcheck(opts, log=lambda line: print(line, flush=True))
    print(f"report: {out / 'report.md'}; exit status {status}", flush=True)
    return status


__all__ = ["add_parser", "run"]
