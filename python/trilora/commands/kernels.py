"""``trilora kernels``: compile every shipped Triton kernel config ahead of time and check it.

For each ``AotSpec`` from ``trilora.kernels.aot.all_aot_specs()`` and each requested architecture,
the kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (no GPU
needed), the cubin is inspected with ``cuobjdump -res-usage``, and registers, spill bytes
(STACK + LOCAL) and shared memory are reported. Exit status is non-zero when any config
spills, exceeds the architecture's shared memory, or fails to compile.

The Triton interpreter (``TRITON_INTERPRET``) replaces ``triton.jit`` with something that
cannot be compiled, so when it is set the command re-executes itself in a subprocess without it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

_DESCRIPTION = (
    "Compile every shipped Triton kernel config ahead of time for each --arch (no GPU "
    "needed), read registers, spill bytes and shared memory from the cubin with cuobjdump, "
    "and exit 1 if any config spills, exceeds the architecture's shared memory, or fails to "
    "compile."
)

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DEFAULT_ARCHS = (80, 90)
_WORKERS = 2


class CheckResult(NamedTuple):
    name: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        limit = SHARED_LIMITS.get(self.arch, SHARED_LIMITS[80])
        return self.error is None and self.spill_bytes == 0 and self.shared_bytes <= limit


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str) -> tuple[int, int, int, int]:
    """(REG, STACK, SHARED, LOCAL) of the (single) kernel in ``cuobjdump -res-usage`` output."""
    match = _RES_RE.search(text)
    if match is None:
        raise ValueError(f"no resource usage line in cuobjdump output:\n{text}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, stack, shared, local


def check_spec(spec: Any, arch: int) -> CheckResult:
    """Compile one spec for ``sm_<arch>`` and measure it. Never raises on compile errors."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("check_spec cannot run with TRITON_INTERPRET set: unset it first")
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Triton 3.9 warns on every compile that the fp-fusion default will change; the
    # launchers' choice is what the spec's options say.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kernel.cubin"
            path.write_bytes(kernel.asm["cubin"])
            out = subprocess.run(
                [_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=True
            ).stdout
        reg, stack, shared, local = parse_res_usage(out)
        return CheckResult(spec.name, arch, reg, stack + local, max(kernel.metadata.shared, shared))
    except Exception as exc:  # report, keep checking the rest
        return CheckResult(spec.name, arch, 0, 0, 0, f"{type(exc).__name__}: {exc}".strip()[:500])


def _check_index(job: tuple[int, int, str | None]) -> CheckResult:
    index, arch, filt = job
    return check_spec(_select_specs(filt)[index], arch)


def _select_specs(filt: str | None) -> list:
    from trilora.kernels.aot import all_aot_specs

    specs = all_aot_specs()
    return [s for s in specs if filt is None or filt in s.name]


def check_all(archs, filt: str | None = None, workers: int = _WORKERS) -> list[CheckResult]:
    """Check every selected spec for every arch, in ``workers`` processes."""
    from concurrent.futures import ProcessPoolExecutor  # here: it costs --help 0.1 s

    specs = _select_specs(filt)
    jobs = [(i, arch, filt) for arch in archs for i in range(len(specs))]
    if workers <= 1 or len(jobs) <= 1:
        return [_check_index(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_check_index, jobs, chunksize=1))


def format_table(results: list[CheckResult]) -> str:
    rows = [("kernel", "config", "arch", "regs", "spill B", "shared B", "status")]
    for r in results:
        kernel, _, config = r.name.partition("[")
        status = "ok" if r.ok else ("ERROR" if r.error else "FAIL")
        rows.append(
            (
                kernel,
                config.rstrip("]"),
                f"sm_{r.arch}",
                str(r.registers),
                str(r.spill_bytes),
                str(r.shared_bytes),
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.error:
            lines.append(f"error in {r.name} (sm_{r.arch}): {r.error}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    """Register the ``kernels`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "kernels",
        help="compile every shipped Triton kernel config for sm_80/sm_90 and check spills/smem",
        description=_DESCRIPTION,
    )
    _add_args(p)
    p.set_defaults(func=run)


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=list(DEFAULT_ARCHS),
        choices=sorted(SHARED_LIMITS),
        metavar="SM",
        help=f"SM versions to compile for, among {sorted(SHARED_LIMITS)}",
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write results as JSON (default: not written)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument(
        "--filter",
        default=None,
        metavar="SUBSTR",
        help="only specs whose name has this (default: all)",
    )


def _reexec_without_interpreter(args) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "trilora.commands.kernels", "--arch", *map(str, args.arch)]
    if args.json:
        cmd += ["--json", args.json]
    if args.overwrite:
        cmd += ["--overwrite"]
    if args.filter:
        cmd += ["--filter", args.filter]
    return subprocess.call(cmd, env=env)


def run(args) -> int:
    """Run the check; returns the process exit status (0: every config compiles and fits)."""
    from trilora.io import UsageError, atomic_write_json, check_output

    if args.json:  # before minutes of compiling
        check_output(args.json, overwrite=args.overwrite, kind="file", flag="--json")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _reexec_without_interpreter(args)
    for arch in args.arch:
        if arch not in SHARED_LIMITS:
            raise UsageError(f"unknown --arch {arch}; known: {sorted(SHARED_LIMITS)}")
    results = check_all(args.arch, args.filter)
    if not results:
        raise UsageError(f"no kernel spec matches --filter {args.filter!r}")
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} configs ok")
    if args.json:
        payload = [{**r._asdict(), "ok": r.ok} for r in results]
        atomic_write_json(args.json, payload, overwrite=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m trilora.commands.kernels``: the command outside the ``trilora`` entry point."""
    from trilora.commands import ArgumentParser, HelpFormatter, report_error

    p = ArgumentParser(
        prog="trilora kernels", description=_DESCRIPTION, formatter_class=HelpFormatter
    )
    _add_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except Exception as exc:
        if os.environ.get("TRILORA_DEBUG", "") not in ("", "0"):
            raise
        return report_error("trilora kernels", exc)


if __name__ == "__main__":
    sys.exit(main())
