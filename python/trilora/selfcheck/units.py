"""What a section is made of: units (a case, a benchmark shape), and the context they run in.

A section module exposes ``units(ctx) -> list[Unit]``: the ordered list of what it runs,
the same every time for the same ``ctx`` (the worker is restarted after a crash and skips
the units already recorded, by id). ``Unit.run(ctx)`` returns a dict of result fields:

* ``status``: one of :data:`trilora.selfcheck.UNIT_STATUSES` (``pass`` by default);
* ``message``: one line, required for ``fail`` / ``error`` / ``skipped``;
* ``checks``: ``[{"name", "error", "tol", "ok"}]`` for correctness cases (see :func:`check`);
* ``info``: any JSON-able numbers worth keeping (measured values, differing byte counts);
* ``rows``: ``trilora bench`` CSV rows (speed, memory and e2e sections).

This module imports no torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Context:
    """Where and how a section runs.

    ``device`` is ``"cuda"`` (``--gpu``) or ``"cpu"`` (Triton interpreter, small shapes);
    ``deadline`` is a ``time.time()`` value after which no new unit starts; ``quick``
    (``--quick``) keeps the tier-0 units of each section only (one shape of every case
    family); ``cache`` holds what units of one process share (e.g. the measured device peaks).
    """

    device: str
    seed: int
    out_dir: Path
    deadline: float = math.inf
    log: Callable[[str], None] = print
    quick: bool = False
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.time()


@dataclass
class Unit:
    """One thing a section runs and reports on its own line.

    ``kernel``, ``config``, ``shape`` and ``dtype`` name it in the report (a failing case
    names all four); ``min_s`` is the time it needs at least: it is not started with less
    left before the section's deadline (reported as ``budget``); ``tier`` orders a section's
    units by value (lower runs first).
    """

    id: str
    run: Callable[[Context], dict[str, Any]]
    kernel: str = ""
    config: str = ""
    shape: str = ""
    dtype: str = ""
    min_s: float = 0.0
    tier: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kernel": self.kernel,
            "config": self.config,
            "shape": self.shape,
            "dtype": self.dtype,
        }


def check(name: str, error: float, tol: float) -> dict[str, Any]:
    """One measured quantity against its tolerance; NaN or inf never passes."""
    error = float(error)
    ok = math.isfinite(error) and error <= tol
    return {"name": name, "error": error if math.isfinite(error) else None, "tol": tol, "ok": ok}


def verdict_of_checks(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """``status`` and ``message`` of a case from its checks: the first failing one named."""
    bad = [c for c in checks if not c["ok"]]
    if not bad:
        return {"status": "pass", "checks": checks}
    parts = []
    for c in bad:
        err = "nan/inf" if c["error"] is None else f"{c['error']:.3g}"
        parts.append(f"{c['name']} error {err} > tol {c['tol']:.3g}")
    return {"status": "fail", "checks": checks, "message": "; ".join(parts)}


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message (at file:line)``: one line naming the error."""
    import traceback

    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0][:400] if text else ''}".rstrip(": ")
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        msg += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
    return msg


__all__ = ["Context", "Unit", "check", "describe_exception", "verdict_of_checks"]
