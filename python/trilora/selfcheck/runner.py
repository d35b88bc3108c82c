"""Run the sections within the budget and keep the report current.

The parent process (this module) imports no torch and never touches the GPU. For every
selected section it starts a worker (``python -m trilora.selfcheck.worker``) with the
section's deadline, and after it exits reads the worker's state file:

* exit 0: the section is done (units the worker could not start in time are ``budget``);
* the worker died in a unit (a signal, a sticky CUDA error, exit 3): that unit is
  ``crashed`` (or ``error``, as the worker recorded it) and a fresh worker runs the rest;
* the deadline plus a grace period passed: the worker's process group is killed, the unit
  it was running and the ones after it are ``budget``.

Deadlines: the budget is split between the sections that run in proportion to their shares
(:data:`trilora.selfcheck.SECTIONS`), cumulatively, so a section that finishes early leaves
its time to the next ones and one that overruns is stopped at its own deadline.

After every section ``results.json``, ``report.md`` and ``results.csv`` are rewritten
atomically (``trilora.io``). ``isolate=False`` runs the workers' loop in this process
instead (tests), without crash recovery or hard stops.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trilora.selfcheck import DEFAULT_BUDGET_S, GPU_ONLY, SECTION_NAMES, SECTIONS
from trilora.selfcheck.report import render, section_status, verdict

EXIT_OK = 0
EXIT_CORRECTNESS_FAILED = 1
STATE_DIR = ".state"
LOG_DIR = "logs"


@dataclass
class RunOptions:
    """What :func:`run_selfcheck` runs. ``out`` must exist (an empty folder is best)."""

    gpu: bool
    out: Path
    budget_s: float = DEFAULT_BUDGET_S
    sections: tuple[str, ...] = SECTION_NAMES
    seed: int = 0
    command: str = "trilora selfcheck"
    quick: bool = False
    isolate: bool = True
    # argv prefix that starts a worker; the section's arguments are appended
    worker_cmd: tuple[str, ...] = field(
        default_factory=lambda: (sys.executable, "-m", "trilora.selfcheck.worker")
    )
    grace_s: float = 15.0
    max_restarts: int = 10
    # {section: share} replacing the defaults of trilora.selfcheck.SECTIONS
    shares: dict[str, float] | None = None


def plan_deadlines(opts: RunOptions, start: float) -> dict[str, tuple[float, float]]:
    """``{section: (share in seconds, deadline as time.time())}`` for the sections that run."""
    shares = {name: share for name, share, _ in SECTIONS} | (opts.shares or {})
    runnable = [
        (name, shares[name])
        for name in SECTION_NAMES
        if name in opts.sections and (opts.gpu or name not in GPU_ONLY)
    ]
    total = sum(share for _, share in runnable) or 1.0
    out, cumulative = {}, 0.0
    for name, share in runnable:
        cumulative += share
        out[name] = (opts.budget_s * share / total, start + opts.budget_s * cumulative / total)
    return out


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == 3:
        return "exit status 3: the CUDA context was no longer usable"
    return f"exit status {rc}"


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = " / ".join(line.strip() for line in text[-lines:] if line.strip())
    return f"; log: {tail[-600:]}" if tail else ""


def _kill(proc: subprocess.Popen) -> None:
    """Stop a worker and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _spawn(
    opts: RunOptions, name: str, state: Path, deadline: float, log_path: Path
) -> tuple[int | None, bool]:
    """Run one worker; returns ``(exit status, stopped at the deadline)``."""
    cmd = [
        *opts.worker_cmd,
        "--section",
        name,
        "--state",
        str(state),
        "--deadline",
        repr(deadline),
        "--device",
        "cuda" if opts.gpu else "cpu",
        "--seed",
        str(opts.seed),
        "--out",
        str(opts.out),
        *(["--quick"] if opts.quick else []),
    ]
    env = dict(os.environ)
    if opts.gpu:
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as log:
        # cwd: the output folder, not wherever the user stands: a checkout's root would put
        # its kernels/ and bench/ folders on sys.path as top-level packages.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stderr=log, env=env, cwd=opts.out, start_new_session=True
        )
        try:
            return proc.wait(timeout=max(1.0, deadline - time.time() + opts.grace_s)), False
        except subprocess.TimeoutExpired:
            _kill(proc)
            return proc.returncode, True
        except BaseException:
            _kill(proc)
            raise


def _mark_pending(state: dict[str, Any], status: str, message: str) -> None:
    for u in state.get("planned") or []:
        if u["id"] not in state["results"]:
            state["results"][u["id"]] = {**u, "status": status, "message": message, "seconds": 0.0}


def run_section(
    opts: RunOptions, name: str, deadline: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run one section to completion, crash or deadline; returns its record (without status
    and verdict)."""
    from trilora.selfcheck import worker

    state_path = opts.out / STATE_DIR / f"{name}.json"
    log_path = opts.out / LOG_DIR / f"{name}.log"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.unlink(missing_ok=True)
    record: dict[str, Any] = {"name": name, "units": [], "restarts": 0}
    while True:
        if opts.isolate:
            rc, timed_out = _spawn(opts, name, state_path, deadline, log_path)
        else:
            from trilora.selfcheck.units import Context

            ctx = Context(
                "cuda" if opts.gpu else "cpu", opts.seed, opts.out, deadline, log, quick=opts.quick
            )
            rc, timed_out = worker.run_units(name, ctx, state_path), False
        state = worker.load_state(state_path)
        if state.get("plan_error"):
            record["error"] = f"could not list the section's units: {state['plan_error']}"
            break
        if state.get("planned") is None:
            record["error"] = (
                f"the worker stopped ({_describe_exit(rc)}) before listing its units"
                f"{_log_tail(log_path)}"
            )
            break
        current = state.get("current")
        planned = {u["id"]: u for u in state["planned"]}
        running = planned.get(current) if current and current not in state["results"] else None
        if timed_out:
            if running:
                state["results"][current] = {
                    **running,
                    "status": "budget",
                    "seconds": 0.0,
                    "message": "stopped: the section's share of the budget "
                    "ran out while this unit ran",
                }
            _mark_pending(state, "budget", "not run: the section's share of the budget ran out")
            worker.save_state(state_path, state)
            break
        if rc == worker.EXIT_DONE:
            break
        if running:
            state["results"][current] = {
                **running,
                "status": "crashed",
                "seconds": 0.0,
                "message": f"the worker process died while running it "
                f"({_describe_exit(rc)}){_log_tail(log_path)}",
            }
        state["current"] = None
        record["restarts"] += 1
        if not opts.isolate or record["restarts"] > opts.max_restarts:
            _mark_pending(
                state,
                "error",
                f"not run: the worker failed ({_describe_exit(rc)}) {record['restarts']} time(s)",
            )
            worker.save_state(state_path, state)
            break
        worker.save_state(state_path, state)
        if time.time() >= deadline:
            _mark_pending(state, "budget", "not run: the section's share of the budget ran out")
            worker.save_state(state_path, state)
            break
        log(f"  restarting the {name} worker ({_describe_exit(rc)})")
    if state.get("planned"):
        record["units"] = [
            state["results"][u["id"]] for u in state["planned"] if u["id"] in state["results"]
        ]
    return record


def _env_fields(results: dict[str, Any]) -> dict[str, str]:
    from trilora.bench.harness import ENV_FIELDS

    for s in results["sections"]:
        if s["name"] == "environment" and s.get("units"):
            info = s["units"][0].get("info", {})
            return {k: str(info.get(k, "")) for k in ENV_FIELDS}
    return dict.fromkeys(ENV_FIELDS, "")


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``report.md`` and (when there are bench rows) ``results.csv``, each
    through a temporary file and a rename."""
    from trilora.io import atomic_write_json, atomic_write_text

    results["meta"]["elapsed_s"] = time.time() - results["meta"]["start_time"]
    atomic_write_json(out / "results.json", results, indent=1)
    atomic_write_text(out / "report.md", render(results))
    rows = [
        dict(r) for s in results["sections"] for u in s.get("units", []) for r in u.get("rows", [])
    ]
    if rows:
        from trilora.bench.harness import append_csv, finalize_rows

        finalize_rows(rows, results["meta"]["run_id"], _env_fields(results), quick=False)
        tmp = out / ".results.csv.tmp"
        tmp.unlink(missing_ok=True)
        append_csv(tmp, rows)
        os.replace(tmp, out / "results.csv")


def run_selfcheck(opts: RunOptions, log: Callable[[str], None] = print) -> int:
    """Run the selected sections into ``opts.out``; returns the exit status (1 when a
    correctness case failed, errored or crashed, or the section could not run)."""
    start = time.time()
    deadlines = plan_deadlines(opts, start)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    results: dict[str, Any] = {
        "meta": {
            "command": opts.command,
            "device_mode": "GPU (CUDA)" if opts.gpu else "CPU (Triton interpreter)",
            "started": stamp.isoformat(timespec="seconds"),
            "start_time": start,
            "run_id": stamp.strftime("%Y%m%dT%H%M%SZ") + f"-selfcheck-{os.getpid()}",
            "budget_s": opts.budget_s,
            "seed": opts.seed,
            "quick": opts.quick,
            "sections_selected": list(opts.sections),
            "python": sys.executable,
        },
        "sections": [],
    }
    write_outputs(opts.out, results)
    selected = [(name, desc) for name, _, desc in SECTIONS if name in opts.sections]
    try:
        for i, (name, desc) in enumerate(selected, start=1):
            t0 = time.time()
            if name in deadlines:
                share, deadline = deadlines[name]
                log(f"[{i}/{len(selected)}] {name}: {desc} (until +{deadline - start:.0f} s)")
                record = run_section(opts, name, deadline, log)
            else:
                share = 0.0
                record = {
                    "name": name,
                    "units": [],
                    "skipped": "needs --gpu (a CUDA device); not run on the CPU",
                }
            record.update(description=desc, share_s=share, seconds=time.time() - t0)
            record["status"] = section_status(record)
            record["verdict"] = verdict(record)
            results["sections"].append(record)
            log(f"{name}: {record['status'].upper()}: {record['verdict']}")
            write_outputs(opts.out, results)
    except BaseException:
        results["meta"]["interrupted"] = True
        write_outputs(opts.out, results)
        raise
    correctness = next((s for s in results["sections"] if s["name"] == "correctness"), None)
    failed = correctness is not None and correctness["status"] in ("fail", "error")
    status = EXIT_CORRECTNESS_FAILED if failed else EXIT_OK
    results["meta"]["exit_status"] = status
    write_outputs(opts.out, results)
    shutil.rmtree(opts.out / STATE_DIR, ignore_errors=True)
    return status


def command_line(argv: list[str]) -> str:
    return "trilora " + " ".join(shlex.quote(a) for a in argv)


__all__ = [
    "RunOptions",
    "command_line",
    "plan_deadlines",
    "run_section",
    "run_selfcheck",
    "write_outputs",
]
