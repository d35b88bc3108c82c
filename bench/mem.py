"""Memory level: memory-ceiling rows from ``trilora.memory.bench_cases``.

The memory model owns the cases (:func:`trilora.memory.bench.bench_cases`); this level only
runs them through the harness: it validates each row and stamps the schema's columns on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from trilora.bench.harness import Stats, guarded, make_row
from trilora.memory.bench import bench_cases

LEVEL = "mem"
REQUIRED_KEYS = ("case", "metric", "provider", "value", "unit")


def run(quick: bool, log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Rows of ``trilora.memory.bench_cases(quick)``; returns ``(rows, notes)``."""
    out = guarded(lambda: list(bench_cases(quick)))
    if out.status != "ok":
        row = make_row(
            LEVEL, "bench_cases", "value", "trilora", "", status=out.status, note=out.note
        )
        return [row], [f"mem level: bench_cases failed: {out.note}"]
    rows, notes = [], []
    for i, case in enumerate(out.value):
        missing = [k for k in REQUIRED_KEYS if not isinstance(case, dict) or k not in case]
        if missing:
            notes.append(
                f"mem level: case #{i} lacks {missing} (expected keys {list(REQUIRED_KEYS)}): {case!r}"
            )
            rows.append(
                make_row(
                    LEVEL,
                    f"case#{i}",
                    "value",
                    "trilora",
                    "",
                    status="error",
                    note=f"malformed bench_cases row, missing {missing}",
                )
            )
            continue
        try:
            value = float(case["value"])
        except (TypeError, ValueError):
            value = math.nan
        extra = {
            k: case[k]
            for k in ("model", "seq_len", "batch", "rank", "tokens", "dtype", "note")
            if k in case
        }
        status = case.get("status", "ok")
        if status not in ("ok", "oom", "error", "skipped"):
            status = "ok"
        stats = Stats(value, value, value, 1) if status == "ok" else None
        rows.append(
            make_row(
                LEVEL,
                str(case["case"]),
                str(case["metric"]),
                str(case["provider"]),
                str(case["unit"]),
                stats,
                status=status,
                **extra,
            )
        )
    return rows, notes
