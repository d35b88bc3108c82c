"""Section statuses, one-line verdicts and ``report.md``, from the recorded results.

Pure Python over the JSON the workers record (no torch), so the runner can rewrite the
report after every section, and a report can be re-rendered from a ``results.json``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from trilora.selfcheck import FAILED

# ---------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if value in ("", None):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return (
        fmt.format(lo)
        if math.isclose(lo, hi, rel_tol=5e-3)
        else f"{fmt.format(lo)}-{fmt.format(hi)}"
    )


def unit_name(u: dict[str, Any]) -> str:
    """``kernel [config] shape dtype``: how a case is named in verdicts and tables."""
    parts = [u.get("kernel") or u.get("id", "")]
    if u.get("config"):
        parts.append(f"[{u['config']}]")
    parts.extend(x for x in (u.get("shape"), u.get("dtype")) if x)
    return " ".join(parts)


def _rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for u in record.get("units", []) for row in u.get("rows", [])]


# ---------------------------------------------------------------------------------------
# statuses and verdicts
# ---------------------------------------------------------------------------------------


def section_status(record: dict[str, Any]) -> str:
    """``pass``, ``fail`` (a unit failed, errored or crashed), ``incomplete`` (units not run
    for lack of time), ``skipped`` or ``error`` (the section could not run)."""
    if record.get("skipped"):
        return "skipped"
    if record.get("error"):
        return "error"
    statuses = Counter(u["status"] for u in record.get("units", []))
    if any(statuses[s] for s in FAILED):
        return "fail"
    if statuses["budget"]:
        return "incomplete"
    if statuses and set(statuses) == {"skipped"}:
        return "skipped"
    return "pass"


def _tail(record: dict[str, Any]) -> str:
    units = record.get("units", [])
    budget = sum(u["status"] == "budget" for u in units)
    return f"; {budget} of {len(units)} units not run (out of time)" if budget else ""


def _failures(record: dict[str, Any]) -> str:
    bad = [u for u in record.get("units", []) if u["status"] in FAILED]
    if not bad:
        return ""
    u = bad[0]
    return f"{len(bad)} failed, first: {unit_name(u)}: {u['status']}: {u.get('message', '')}; "


def verdict_environment(record: dict[str, Any]) -> str:
    units = record.get("units", [])
    info = units[0].get("info", {}) if units else {}
    if not info:
        return _failures(record) or "no environment recorded"
    dev = info.get("device", "?")
    if info.get("capability"):
        dev += f" ({info['capability']}, {info.get('memory_gib', '?')} GiB)"
    cuda = (
        f", driver {info.get('driver') or '?'}, CUDA {info.get('cuda') or '?'}"
        if info.get("device_type") == "cuda"
        else " (Triton interpreter)"
        if info.get("triton_interpreter")
        else ""
    )
    libs = ", ".join(
        f"{name} {info.get(name, '?')}"
        for name in ("torch", "triton", "transformers", "peft", "bitsandbytes")
    )
    commit = f" @{info['git_commit']}" if info.get("git_commit") else ""
    return f"{dev}{cuda}; {libs}; trilora {info.get('trilora', '?')}{commit}"


def verdict_correctness(record: dict[str, Any]) -> str:
    units = record.get("units", [])
    ran = [u for u in units if u["status"] in ("pass", *FAILED)]
    failed = [u for u in ran if u["status"] in FAILED]
    skipped = [u for u in units if u["status"] == "skipped"]
    dtypes = sorted({u["dtype"] for u in ran if u.get("dtype")})
    if failed:
        u = failed[0]
        text = (
            f"{len(failed)} of {len(ran)} cases failed; first: {unit_name(u)}: "
            f"{u.get('message', u['status'])}"
        )
    elif ran:
        worst = max((_worst_ratio(u) for u in ran), default=0.0)
        text = (
            f"{len(ran)} of {len(ran)} cases passed ({', '.join(dtypes)}), worst error "
            f"{worst:.2f} of its tolerance"
        )
    else:
        text = "no case ran"
    if skipped:
        reasons = Counter(u.get("message", "").split(";")[0] for u in skipped)
        reason, _ = reasons.most_common(1)[0]
        text += f"; {len(skipped)} skipped ({reason})"
    return text + _tail(record)


def _worst_ratio(u: dict[str, Any]) -> float:
    worst = 0.0
    for c in u.get("checks", []):
        err, tol = c.get("error"), c.get("tol", 0)
        if err is None:
            return math.inf
        worst = max(worst, err / tol if tol else (0.0 if err == 0 else math.inf))
    return worst


def verdict_speed(record: dict[str, Any]) -> str:
    rows = [r for r in _rows(record) if r.get("status") == "ok"]
    layer_rows = [
        r
        for r in rows
        if r["level"] == "kernels"
        and r["metric"] == "fwd_bwd"
        and r["provider"] == "trilora"
        and not str(r["case"]).endswith("crossover")
    ]
    parts = []
    ratios = [x for r in layer_rows if (x := _num(r.get("ratio_vs_bf16_peft"))) is not None]
    if ratios:
        top = max(int(r["tokens"]) for r in layer_rows)
        at_top = [
            x
            for r in layer_rows
            if int(r["tokens"]) == top and (x := _num(r.get("ratio_vs_bf16_peft"))) is not None
        ]
        text = f"fwd+bwd {_range(ratios)}x the time of bf16 LoRA"
        if at_top:
            text += f" ({_range(at_top)}x at M={top}; target <= 1.15x at M >= 4096)"
        parts.append(text)
    small = [
        x
        for r in layer_rows
        if int(r["tokens"]) <= 16 and (x := _num(r.get("speedup_vs_bnb_peft"))) is not None
    ]
    if small:
        parts.append(f"{_range(small)}x faster than bitsandbytes + PEFT at M <= 16 (target >= 3x)")
    elif layer_rows:
        parts.append("bitsandbytes + PEFT not measured")
    roof = [x for r in layer_rows if (x := _num(r.get("floor_frac"))) is not None]
    if roof:
        parts.append(f"{_range([100 * x for x in roof], '{:.0f}')} % of the roofline")
    cross = []
    configured = None
    for u in record.get("units", []):
        info = u.get("info", {})
        if "crossover_tokens" not in info:
            continue
        configured = info.get("configured_fused_max_tokens")
        if info["crossover_tokens"] is not None:
            cross.append(f"~{info['crossover_tokens']:,.0f} ({info.get('layer')})")
        elif info.get("crossover_bound"):
            sign = "<" if info["crossover_bound"] == "below" else ">"
            cross.append(f"{sign} {info.get('crossover_at')} ({info.get('layer')})")
    if cross:
        parts.append(f"fused/scratch crossover {', '.join(cross)} tokens, configured {configured}")
    return _failures(record) + ("; ".join(parts) or "nothing measured") + _tail(record)


def verdict_memory(record: dict[str, Any]) -> str:
    parts = []
    for u in record.get("units", []):
        info = u.get("info", {})
        if info.get("relative_error") is not None:
            parts.append(f"{100 * info['relative_error']:+.1f} % ({u.get('config')})")
        elif u["status"] == "skipped" and info.get("predicted_bytes") is not None:
            parts.append(
                f"predicted {fmt_gib(info['predicted_bytes'])}, not measured ({u.get('config')})"
            )
    text = (
        "(measured - predicted) / measured: " if any("%" in p for p in parts) else ""
    ) + "; ".join(parts)
    return _failures(record) + (text or "nothing measured") + _tail(record)


def verdict_e2e(record: dict[str, Any]) -> str:
    rows = [r for r in _rows(record) if r.get("status") == "ok"]
    value = {(r["provider"], r["metric"]): _num(r.get("median")) for r in rows}
    tps = {p: v for (p, m), v in value.items() if m == "tokens_per_s" and v}
    peak = {p: v for (p, m), v in value.items() if m == "peak_mem" and v}
    parts = []
    if "trilora" in tps and "bnb_peft" in tps:
        parts.append(
            f"trilora {tps['trilora']:,.0f} tok/s vs bitsandbytes + PEFT {tps['bnb_peft']:,.0f}: "
            f"{tps['trilora'] / tps['bnb_peft']:.2f}x (target >= 2x)"
        )
    elif tps:
        parts.append(", ".join(f"{p} {v:,.0f} tok/s" for p, v in tps.items()))
    if "trilora" in peak and "bnb_peft" in peak:
        parts.append(
            f"peak memory {fmt_gib(peak['trilora'])} vs {fmt_gib(peak['bnb_peft'])} "
            f"({peak['trilora'] / peak['bnb_peft']:.2f}x)"
        )
    elif peak:
        parts.append(", ".join(f"{p} peak {fmt_gib(v)}" for p, v in peak.items()))
    for u in record.get("units", []):
        parts.extend(n for n in u.get("info", {}).get("notes", []) if "alone" in n)
        if u["status"] == "skipped":
            parts.append(u.get("message", "skipped"))
    return _failures(record) + ("; ".join(parts) or "nothing measured") + _tail(record)


VERDICTS = {
    "environment": verdict_environment,
    "correctness": verdict_correctness,
    "speed": verdict_speed,
    "memory": verdict_memory,
    "e2e": verdict_e2e,
}


def verdict(record: dict[str, Any]) -> str:
    """The section's one-line verdict."""
    if record.get("skipped"):
        return record["skipped"]
    if record.get("error"):
        return f"ERROR: {record['error']}"
    try:
        return VERDICTS[record["name"]](record)
    except Exception as exc:  # a verdict must never take the report down
        return f"(verdict unavailable: {type(exc).__name__}: {exc})"


# ---------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return out


def _checks_text(u: dict[str, Any]) -> str:
    parts = []
    for c in u.get("checks", []):
        err = "nan" if c.get("error") is None else f"{c['error']:.2g}"
        parts.append(f"{c['name']} {err}/{c['tol']:.2g}")
    return "; ".join(parts) or u.get("message", "")


def _section_correctness(record: dict[str, Any]) -> list[str]:
    units = record.get("units", [])
    out: list[str] = []
    failed = [u for u in units if u["status"] in FAILED]
    if failed:
        out += ["### Failures", ""]
        out += _table(
            ["kernel", "config", "shape", "dtype", "status", "error"],
            [
                [
                    u.get("kernel"),
                    u.get("config"),
                    u.get("shape"),
                    u.get("dtype"),
                    u["status"],
                    u.get("message", ""),
                ]
                for u in failed
            ],
        )
        out.append("")
    by_kernel: dict[str, list[dict]] = defaultdict(list)
    for u in units:
        by_kernel[u.get("kernel", "")].append(u)
    summary = []
    for kernel, us in by_kernel.items():
        c = Counter(u["status"] for u in us)
        worst = max((_worst_ratio(u) for u in us if u["status"] in ("pass", *FAILED)), default=None)
        summary.append(
            [
                kernel,
                len(us),
                c["pass"],
                sum(c[s] for s in FAILED),
                c["skipped"],
                c["budget"],
                "-" if worst is None else f"{worst:.2f}",
            ]
        )
    out += [
        "### By kernel",
        "",
        "Worst error is the largest measured error divided by its tolerance (<= 1 passes).",
        "",
    ]
    out += _table(
        ["kernel", "cases", "pass", "fail", "skipped", "not run", "worst error / tol"], summary
    )
    out += ["", "<details><summary>Every case (measured error / tolerance)</summary>", ""]
    out += _table(
        ["status", "kernel", "config", "shape", "dtype", "checks", "s"],
        [
            [
                u["status"],
                u.get("kernel"),
                u.get("config"),
                u.get("shape"),
                u.get("dtype"),
                _checks_text(u),
                f"{u.get('seconds', 0):.1f}",
            ]
            for u in units
        ],
    )
    out += ["", "</details>", ""]
    return out


def _section_speed(record: dict[str, Any]) -> list[str]:
    rows = [r for r in _rows(record) if r.get("status") == "ok"]
    out: list[str] = []
    info = next((u.get("info") for u in record.get("units", []) if u["id"] == "device peaks"), None)
    if info:
        out += [
            f"Device peaks: {info.get('bandwidth', 0) / 1e12:.2f} TB/s copy bandwidth, "
            f"{info.get('matmul_rate', 0) / 1e12:.0f} TFLOP/s {info.get('matmul_dtype', '')} matmul.",
            "",
        ]
    by = defaultdict(dict)
    for r in rows:
        if (
            r["level"] == "kernels"
            and r["metric"] == "fwd_bwd"
            and not str(r["case"]).endswith("crossover")
        ):
            by[(r["layer"], int(r["tokens"]))][r["provider"]] = r
    table = []
    for (layer, m), provs in sorted(by.items()):
        t = provs.get("trilora", {})
        table.append(
            [
                layer,
                m,
                fmt_time(_num(t.get("median"))),
                fmt_time(_num(provs.get("bf16_peft", {}).get("median"))),
                fmt_time(_num(provs.get("bnb_peft", {}).get("median"))),
                f"{x:.2f}x" if (x := _num(t.get("ratio_vs_bf16_peft"))) else "-",
                f"{x:.2f}x" if (x := _num(t.get("speedup_vs_bnb_peft"))) else "-",
                f"{100 * x:.0f} %" if (x := _num(t.get("floor_frac"))) else "-",
            ]
        )
    if table:
        out += ["### QLoRA linear, forward + backward (r=16)", ""]
        out += _table(
            [
                "projection",
                "M",
                "trilora",
                "bf16 LoRA",
                "bnb + PEFT",
                "trilora / bf16 LoRA",
                "speedup vs bnb + PEFT",
                "roofline",
            ],
            table,
        )
        out.append("")
    cross = [r for r in rows if str(r["case"]).endswith("crossover")]
    if cross:
        pairs: dict[tuple, dict] = defaultdict(dict)
        for r in cross:
            pairs[(r["layer"], int(r["tokens"]))][r["provider"]] = _num(r.get("median"))
        out += ["### fused_max_tokens crossover (fwd + bwd)", ""]
        out += _table(
            ["projection", "M", "fused", "scratch + cuBLAS", "fused / scratch"],
            [
                [
                    layer,
                    m,
                    fmt_time(p.get("trilora_fused")),
                    fmt_time(p.get("trilora_scratch")),
                    f"{p['trilora_fused'] / p['trilora_scratch']:.2f}"
                    if p.get("trilora_fused") and p.get("trilora_scratch")
                    else "-",
                ]
                for (layer, m), p in sorted(pairs.items())
            ],
        )
        out.append("")
    other = [r for r in rows if r["metric"] == "time"]
    if other:
        out += ["### Quantize, dequantize, RMSNorm", ""]
        out += _table(
            ["case", "provider", "time", "speedup vs bitsandbytes", "roofline"],
            [
                [
                    r["case"],
                    r["provider"],
                    fmt_time(_num(r["median"])),
                    f"{x:.2f}x" if (x := _num(r.get("speedup_vs_bnb_peft"))) else "-",
                    f"{100 * x:.0f} %" if (x := _num(r.get("floor_frac"))) else "-",
                ]
                for r in other
            ],
        )
        out.append("")
    return out


def _section_memory(record: dict[str, Any]) -> list[str]:
    rows = []
    for u in record.get("units", []):
        info = u.get("info", {})
        rel = info.get("relative_error")
        rows.append(
            [
                u.get("config"),
                u.get("shape"),
                fmt_gib(info.get("predicted_bytes")),
                fmt_gib(info.get("measured_bytes")),
                "-" if rel is None else f"{100 * rel:+.1f} %",
                u["status"],
            ]
        )
    out = _table(
        [
            "configuration",
            "model",
            "predicted (traced peak)",
            "measured (max allocated)",
            "(measured - predicted) / measured",
            "status",
        ],
        rows,
    )
    return [*out, ""]


def _section_e2e(record: dict[str, Any]) -> list[str]:
    rows = [r for r in _rows(record) if r.get("status") == "ok"]
    by: dict[str, dict] = defaultdict(dict)
    for r in rows:
        by[r["provider"]][r["metric"]] = _num(r.get("median"))
    table = [
        [
            p,
            f"{m['tokens_per_s']:,.0f}" if m.get("tokens_per_s") else "-",
            fmt_time(m.get("step_time")),
            fmt_gib(m.get("peak_mem")),
            f"{m['loss_final']:.4f}" if m.get("loss_final") is not None else "-",
        ]
        for p, m in by.items()
    ]
    out = _table(["provider", "tokens/s", "step time", "peak memory", "final loss"], table)
    notes = [n for u in record.get("units", []) for n in u.get("info", {}).get("notes", [])]
    return [*out, "", *(f"- {n}" for n in notes), ""]


DETAILS = {
    "correctness": _section_correctness,
    "speed": _section_speed,
    "memory": _section_memory,
    "e2e": _section_e2e,
}


def render(results: dict[str, Any]) -> str:
    """The whole ``report.md``."""
    meta = results.get("meta", {})
    out = ["# trilora selfcheck", ""]
    out.append(
        f"`{meta.get('command', 'trilora selfcheck')}` on {meta.get('device_mode', '?')}; "
        f"started {meta.get('started', '?')}; {meta.get('elapsed_s', 0):.0f} s of a "
        f"{meta.get('budget_s', 0):.0f} s budget; seed {meta.get('seed')}; "
        f"{'finished, exit status ' + str(meta['exit_status']) if 'exit_status' in meta else 'RUNNING (partial report)'}."
    )
    out += [
        "",
        "Exit status 1 means a correctness case failed, errored or crashed. Files: "
        "`results.json` (every unit and check), `results.csv` (the `trilora bench` rows), "
        "`logs/` (each section's stderr).",
        "",
    ]
    sections = results.get("sections", [])
    out += _table(
        ["section", "status", "time", "share", "verdict"],
        [
            [
                s["name"],
                s.get("status", "?"),
                f"{s.get('seconds', 0):.0f} s",
                f"{s.get('share_s', 0):.0f} s",
                s.get("verdict", ""),
            ]
            for s in sections
        ],
    )
    out.append("")
    for i, s in enumerate(sections, start=1):
        out += [f"## {i}. {s['name']}: {s.get('status', '?')}", "", s.get("verdict", ""), ""]
        if s.get("restarts"):
            out += [f"The worker was restarted {s['restarts']} time(s) after a crash.", ""]
        if s["name"] == "environment" and s.get("units"):
            info = s["units"][0].get("info", {})
            out += _table(["", ""], [[k, v] for k, v in info.items()])
            out.append("")
        elif s["name"] in DETAILS and s.get("units") and not s.get("skipped"):
            try:
                out += DETAILS[s["name"]](s)
            except Exception as exc:
                out += [f"(details unavailable: {type(exc).__name__}: {exc})", ""]
            failed = [u for u in s["units"] if u["status"] in FAILED and s["name"] != "correctness"]
            for u in failed:
                out.append(f"- {u['status']}: {unit_name(u)}: {u.get('message', '')}")
            if failed:
                out.append("")
    return "\n".join(out) + "\n"


__all__ = ["render", "section_status", "unit_name", "verdict"]
