"""Run one section's units and record each result before starting the next.

``python -m trilora.selfcheck.worker --section NAME --state FILE --deadline T --device D
--seed S --out DIR`` is what :mod:`trilora.selfcheck.runner` starts for every section.
The state file (JSON, rewritten atomically) holds the planned units, the results so far
and the unit that is running; a restarted worker skips what is recorded. Exit status:

* 0: every planned unit has a result (run, skipped, or not run for lack of time);
* 3: a unit left the CUDA context unusable (an illegal address or another sticky error);
  its result is recorded and the runner starts a fresh worker for the rest;
* 4: the section's units could not be listed (the error is in the state file).

:func:`run_units` is also what the runner calls in its in-process mode (used by tests);
there a crash takes the caller with it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from trilora.selfcheck.units import Context, Unit, describe_exception

EXIT_DONE = 0
EXIT_CONTEXT_LOST = 3
EXIT_PLAN_FAILED = 4

# section -> module exposing units(ctx) -> list[Unit]
SECTION_MODULES: dict[str, str] = {
    "environment": "trilora.selfcheck.environment",
    "correctness": "trilora.selfcheck.cases",
    "speed": "trilora.selfcheck.speed",
    "memory": "trilora.selfcheck.memory",
    "e2e": "trilora.selfcheck.e2e",
}


def load_state(path: Path) -> dict[str, Any]:
    """The state file's content, or a fresh state when it does not exist yet."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"planned": None, "results": {}, "current": None, "plan_error": None}


def save_state(path: Path, state: dict[str, Any]) -> None:
    from trilora.io import atomic_write_json

    atomic_write_json(path, state, indent=1)


def plan_units(section: str, ctx: Context) -> list[Unit]:
    """The units of ``section`` for ``ctx`` (imports the section's module)."""
    module = importlib.import_module(SECTION_MODULES[section])
    units = module.units(ctx)
    if ctx.quick:
        units = [u for u in units if u.tier == 0]
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise RuntimeError(f"section {section} lists duplicate unit ids: {dupes[:5]}")
    return units


def _cuda_usable() -> bool:
    """Whether the CUDA context still works after a failed unit (sticky errors poison it)."""
    import torch

    try:
        torch.cuda.synchronize()
        return float(torch.ones(1, device="cuda").add_(1).item()) == 2.0
    except Exception:
        return False


def _release(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.gpu:
        import torch

        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _status_line(res: dict[str, Any]) -> str:
    name = " ".join(
        x for x in (res.get("kernel"), f"[{res['config']}]" if res.get("config") else "") if x
    )
    where = " ".join(x for x in (res.get("shape"), res.get("dtype")) if x)
    line = f"  {res['status']:<7} {name} {where}".rstrip()
    if res.get("message") and res["status"] != "pass":
        line += f": {res['message']}"
    return f"{line} ({res.get('seconds', 0.0):.1f} s)"


def run_units(section: str, ctx: Context, state_path: Path, units: list[Unit] | None = None) -> int:
    """Run the units of ``section`` not yet in the state file; returns the exit status."""
    state = load_state(state_path)
    state["section"] = section
    if units is None:
        try:
            units = plan_units(section, ctx)
        except Exception as exc:
            state["plan_error"] = describe_exception(exc)
            save_state(state_path, state)
            ctx.log(f"  error: could not list the {section} units: {state['plan_error']}")
            return EXIT_PLAN_FAILED
    state["planned"] = [u.describe() for u in units]
    state.setdefault("results", {})
    save_state(state_path, state)
    for unit in units:
        if unit.id in state["results"]:
            continue
        left = ctx.time_left()
        if left <= 0 or left < unit.min_s:
            res = {
                **unit.describe(),
                "status": "budget",
                "seconds": 0.0,
                "message": f"not run: {max(left, 0):.0f} s left of the section's share, "
                f"the unit needs about {unit.min_s:.0f} s",
            }
            state["results"][unit.id] = res
            continue
        state["current"] = unit.id
        save_state(state_path, state)
        t0 = time.perf_counter()
        try:
            res = dict(unit.run(ctx) or {})
            if ctx.gpu:
                import torch

                # Asynchronous kernel faults surface here, attributed to this unit.
                torch.cuda.synchronize()
        except Exception as exc:
            res = {"status": "error", "message": describe_exception(exc)}
        res.setdefault("status", "pass")
        res = {**unit.describe(), **res, "seconds": time.perf_counter() - t0}
        state["results"][unit.id] = res
        state["current"] = None
        save_state(state_path, state)
        ctx.log(_status_line(res))
        _release(ctx)
        if res["status"] == "error" and ctx.gpu and not _cuda_usable():
            ctx.log("  the CUDA context is no longer usable; restarting the worker")
            return EXIT_CONTEXT_LOST
    save_state(state_path, state)
    return EXIT_DONE


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trilora.selfcheck.worker")
    p.add_argument("--section", required=True, choices=sorted(SECTION_MODULES))
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--deadline", required=True, type=float, help="time.time() to stop at")
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quick", action="store_true", help="tier-0 units only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # The interpreter is chosen when a kernel is decorated: set (or clear) it before any
    # trilora.kernels module is imported.
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keeps the logs readable
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def log(line: str) -> None:
        print(line, flush=True)

    ctx = Context(args.device, args.seed, args.out, args.deadline, log, quick=args.quick)
    return run_units(args.section, ctx, args.state)


if __name__ == "__main__":
    sys.exit(main())
