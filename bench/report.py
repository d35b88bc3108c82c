"""Ratios between providers, the Markdown report and the plots.

Ratios are only ever taken between rows of the same run (same case and metric), which is
the only comparison a CPU timing supports; on a CPU the report shows ratios, not times.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trilora.bench import optim
from trilora.bench.harness import atomic_write_text

TIME_UNITS = ("s",)
RATE_UNITS = ("tok/s", "GB/s")
BASELINES = ("bnb_peft", "bnb")


def _num(value: Any) -> float | None:
    if value in ("", None):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def add_ratios(rows: list[dict]) -> None:
    """Fill ``speedup_vs_bnb_peft`` (> 1: faster than bitsandbytes + PEFT, or the bare
    bitsandbytes quantizer) and ``ratio_vs_bf16_peft`` (time / float-LoRA time; 1.0 is the
    speed of light) for every ``ok`` timing or rate row, in place."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row["status"] == "ok":
            groups[(row["level"], row["case"], row["metric"])][row["provider"]] = row
    for group in groups.values():
        base = next((group[b] for b in BASELINES if b in group), None)
        bf16 = group.get("bf16_peft")
        for row in group.values():
            value = _num(row["median"])
            if value is None or value == 0:
                continue
            unit = row["unit"]
            if base is not None and (b := _num(base["median"])):
                if unit in TIME_UNITS:
                    row["speedup_vs_bnb_peft"] = b / value
                elif unit in RATE_UNITS:
                    row["speedup_vs_bnb_peft"] = value / b
            if bf16 is not None and (f := _num(bf16["median"])) and unit in TIME_UNITS:
                row["ratio_vs_bf16_peft"] = value / f


# --- plots --------------------------------------------------------------------------------


def make_plots(
    out_dir: Path, rows: list[dict], curves: dict[str, list[float]]
) -> tuple[list[str], list[str]]:
    """Write the PNG plots under ``out_dir/plots``; returns ``(relative paths, notes)``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        from trilora.io import install_hint

        return [], [
            f"plots skipped: matplotlib unavailable ({type(exc).__name__}: {exc}); "
            f"to draw them: {install_hint('matplotlib')}"
        ]
    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    notes: list[str] = []
    for name, fn in (
        ("kernels_speedup_vs_M.png", _plot_speedup),
        ("memory_vs_seq_len.png", _plot_memory),
        ("loss_curves.png", _plot_loss),
    ):
        try:
            fig = fn(plt, rows, curves)
        except Exception as exc:
            notes.append(f"plot {name} failed: {type(exc).__name__}: {exc}")
            continue
        if fig is None:
            notes.append(f"plot {name} not drawn: no data for it in this run")
            continue
        tmp = plot_dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(plot_dir / name)
        written.append(f"plots/{name}")
    return written, notes


def _plot_speedup(plt, rows: list[dict], curves) -> Any:
    data: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if (
            row["level"] == "kernels"
            and row["metric"] == "fwd_bwd"
            and row["provider"] == "trilora"
            and row["status"] == "ok"
        ):
            key = (row["model"], row["rank"])
            data[key][row["layer"]].append(
                (
                    int(row["tokens"]),
                    _num(row["speedup_vs_bnb_peft"]),
                    _num(row["ratio_vs_bf16_peft"]),
                )
            )
    if not data:
        return None
    keys = sorted(data)
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.6 * len(keys)), squeeze=False)
    for ax_row, key in zip(axes, keys):
        for layer, pts in sorted(data[key].items()):
            pts.sort()
            ms = [p[0] for p in pts]
            ax_row[0].plot(
                ms, [p[1] if p[1] is not None else math.nan for p in pts], marker="o", label=layer
            )
            ax_row[1].plot(
                ms, [p[2] if p[2] is not None else math.nan for p in pts], marker="o", label=layer
            )
        model, rank = key
        ax_row[0].set_title(f"{model} r={rank}: trilora speedup vs bnb+PEFT (fwd+bwd)")
        ax_row[1].set_title(f"{model} r={rank}: trilora time / float LoRA time")
        for ax, ref in ((ax_row[0], 1.0), (ax_row[1], 1.0)):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.axhline(ref, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
        ax_row[0].set_ylabel("x (higher is better)")
        ax_row[1].set_ylabel("x (1.0 = speed of light)")
        ax_row[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


_SEQ_RE = re.compile(r"(?:seq_len|seq|ctx|context|len|tokens|L)[=_:-]?(\d+)", re.IGNORECASE)


def _seq_of(row: dict) -> int | None:
    if _num(row.get("seq_len")) is not None:
        return int(float(row["seq_len"]))
    m = _SEQ_RE.search(str(row["case"]))
    return int(m.group(1)) if m else None


def _plot_memory(plt, rows: list[dict], curves) -> Any:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["status"] != "ok" or row["unit"] not in ("bytes", "B", "GiB", "GB", "MiB", "MB"):
            continue
        if row["level"] not in ("mem", "e2e"):
            continue
        seq = _seq_of(row)
        value = _num(row["median"])
        if seq is None or value is None:
            continue
        scale = {
            "bytes": 2**-30,
            "B": 2**-30,
            "MiB": 1 / 1024,
            "MB": 1e6 / 2**30,
            "GB": 1e9 / 2**30,
        }.get(row["unit"], 1.0)
        series[f"{row['level']}: {row['provider']} {row['metric']}"].append((seq, value * scale))
    series = {k: v for k, v in series.items() if len({s for s, _ in v}) >= 2}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("memory (GiB)")
    ax.set_title("memory vs sequence length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_loss(plt, rows, curves: dict[str, list[float]]) -> Any:
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for provider, losses in sorted(curves.items()):
        style = "-" if provider == "trilora" else "--"
        ax.plot(range(1, len(losses) + 1), losses, style, marker="o", label=provider)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss: trilora vs transformers + bitsandbytes + PEFT (same data, seed, LoRA)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


# --- markdown -----------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".3g") -> str:
    v = _num(x)
    return "" if v is None else format(v, spec)


def _bold(text: str) -> str:
    """``text`` in bold, or ``-`` when there is none (bold markers around nothing render as
    a literal ``****``)."""
    return f"**{text}**" if text else "-"


def _fmt_time(x: Any) -> str:
    v = _num(x)
    if v is None:
        return ""
    return f"{v * 1e6:.1f} us" if v < 1e-3 else f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"


def _fmt_bytes(x: Any) -> str:
    v = _num(x)
    return "" if v is None else f"{v / 2**30:.3f} GiB"


def render_markdown(meta: dict, rows: list[dict], notes: Iterable[str], plots: list[str]) -> str:
    """The report: environment, notes (skips, failures), then one table per level."""
    env = meta["env"]
    on_gpu = env["device_type"] == "cuda"
    out = [f"# trilora bench report ({meta['run_id']})", ""]
    out.append(
        f"- device: **{env['device']}** ({env['device_type']})"
        + (f", driver {env['driver']}, CUDA {env['cuda']}" if on_gpu else "")
    )
    # Older results files have no cpu_isa.
    out.append(f"- host CPU: {env['host_cpu']}, ISA {env.get('cpu_isa') or 'not recorded'}")
    out.append(
        f"- torch {env['torch']}, triton {env['triton']}, bitsandbytes {env['bitsandbytes']}, peft {env['peft']}, "
        f"transformers {env['transformers']}, trilora {env['trilora']} (git {env['git_commit'] or 'unknown'})"
    )
    out.append(
        f"- command: `{meta['command']}`; levels: {', '.join(meta['levels'])}; quick: {meta['quick']}; wall time {meta['wall_s']:.0f} s"
    )
    if meta.get("loadavg"):
        out.append(
            f"- machine load average at start / end: {meta['loadavg'][0]} / {meta['loadavg'][1]} (on {meta['cpus']} CPUs)"
        )
    peaks = meta.get("peaks")
    if peaks:
        out.append(
            f"- measured peaks: copy bandwidth {peaks['bandwidth'] / 1e9:.1f} GB/s, matmul {peaks['matmul_rate'] / 1e12:.3f} TFLOP/s "
            f"({peaks['matmul_dtype']}, {peaks['matmul_size']}^3){' (cached from an earlier run)' if not meta.get('peaks_measured_now') else ''}"
        )
    if not on_gpu:
        out.append(
            "- **CPU run:** times are wall clock on a CPU and only their ratios within this run mean anything; no figure here was measured on a GPU."
        )
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["status"]] += 1
    out.append(f"- rows: {dict(counts)}")
    out += ["", "## Notes", ""]
    out += [f"- {n}" for n in notes] or ["- none"]
    failed = [r for r in rows if r["status"] in ("error", "oom")]
    if failed:
        out += [
            "",
            "## Failed or out-of-memory cases",
            "",
            "| level | case | metric | provider | status | note |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['level']} | {r['case']} | {r['metric']} | {r['provider']} | {r['status']} | {r['note'][:160]} |"
            for r in failed
        ]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    out += _kernel_tables(rows, on_gpu)
    out += _e2e_table(rows, on_gpu)
    out += _e2e_table(
        rows,
        on_gpu,
        "moe",
        "Mixture of experts (Qwen3-MoE training steps; experts layer forward + backward)",
    )
    out += _busy_table(rows)
    out += _mem_table(rows)
    out += optim.report_lines(rows)
    out += [
        "",
        "## Columns",
        "",
        "- **speedup vs bnb+PEFT**: bitsandbytes+PEFT median time / trilora median time (same run); > 1 means trilora is faster.",
        "- **/ float LoRA**: trilora time / float `nn.Linear` + PEFT LoRA time (bf16 on GPU, fp32 on CPU); 1.0 is the speed of light.",
        "- **floor frac**: analytical floor (max(bytes / measured bandwidth, FLOPs / measured matmul rate)) / measured median; 1.0 would be perfect.",
        "- p20/p80 of every timing are in the CSV/JSON next to the median.",
    ]
    return "\n".join(out) + "\n"


def _by(rows: list[dict], level: str) -> dict[tuple, dict[str, dict]]:
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row["level"] == level:
            table[(row["case"], row["metric"])][row["provider"]] = row
    return table


def _kernel_tables(rows: list[dict], on_gpu: bool) -> list[str]:
    table = _by(rows, "kernels")
    if not table:
        return []
    out = ["", "## Kernels", ""]
    quant = [(k, v) for k, v in table.items() if k[1] == "time" and ("quantize" in k[0])]
    if quant:
        out += [
            "### 4-bit quantize / dequantize",
            "",
            "| case | trilora | bitsandbytes | speedup vs bnb | trilora floor frac |",
            "|---|---|---|---|---|",
        ]
        for (case, _), prov in sorted(quant):
            t, b = prov.get("trilora", {}), prov.get("bnb", {})
            out.append(
                f"| {case} | {_cell(t, on_gpu)} | {_cell(b, on_gpu)} | {_fmt(t.get('speedup_vs_bnb_peft'), '.2f')} | {_fmt(t.get('floor_frac'), '.2f')} |"
            )
        out.append("")
    layer = sorted(
        ((k, v) for k, v in table.items() if k[1] in ("fwd", "bwd", "fwd_bwd")),
        key=lambda kv: (_case_key(kv[0][0]), ("fwd", "bwd", "fwd_bwd").index(kv[0][1])),
    )
    if layer:
        head = "| case | metric | trilora | bnb+PEFT | float+PEFT | speedup vs bnb+PEFT | trilora / float LoRA | floor frac (trilora / bnb / float) |"
        out += [
            "### QLoRA linear (one projection + LoRA)",
            "",
            head,
            "|---|---|---|---|---|---|---|---|",
        ]
        for (case, metric), prov in layer:
            t, b, f = prov.get("trilora", {}), prov.get("bnb_peft", {}), prov.get("bf16_peft", {})
            fracs = " / ".join(_fmt(p.get("floor_frac"), ".2f") or "-" for p in (t, b, f))
            out.append(
                f"| {case} | {metric} | {_cell(t, on_gpu)} | {_cell(b, on_gpu)} | {_cell(f, on_gpu)} | "
                f"{_bold(_fmt(t.get('speedup_vs_bnb_peft'), '.2f'))} | {_fmt(t.get('ratio_vs_bf16_peft'), '.2f')} | {fracs} |"
            )
    return out


def _case_key(case: str) -> tuple:
    parts = case.split("/")
    m = re.search(r"/M(\d+)$", case)
    return (*parts[:-1], int(m.group(1)) if m else 0)


def _cell(row: dict, on_gpu: bool) -> str:
    if not row:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    if row["unit"] == "s":
        # On a CPU, absolute times are not comparable across runs: show them only on a GPU.
        return _fmt_time(row["median"]) if on_gpu else "ok"
    return _fmt(row["median"])


def _e2e_table(
    rows: list[dict], on_gpu: bool, level: str = "e2e", title: str = "End to end (training steps)"
) -> list[str]:
    table = _by(rows, level)
    if not table:
        return []
    out = [
        "",
        f"## {title}",
        "",
        "| case | metric | provider | median | p20 | p80 | speedup vs bnb+PEFT | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (case, metric), prov in sorted(table.items()):
        for name, row in sorted(prov.items()):
            if row["status"] != "ok":
                vals = (row["status"], "", "")
            elif row["unit"] == "bytes":
                vals = tuple(_fmt_bytes(row[k]) for k in ("median", "p20", "p80"))
            elif row["unit"] == "s":
                vals = tuple(_fmt_time(row[k]) for k in ("median", "p20", "p80"))
            else:
                vals = tuple(_fmt(row[k], ".4g") for k in ("median", "p20", "p80"))
            out.append(
                f"| {case} | {metric} | {name} | {' | '.join(vals)} | {_fmt(row.get('speedup_vs_bnb_peft'), '.2f')} | {row['note'][:120]} |"
            )
    return out


def _busy_table(rows: list[dict]) -> list[str]:
    table = _by(rows, "busy")
    if not table:
        return []
    out = [
        "",
        "## Busy machine (training step beside competing CPU-bound processes)",
        "",
        "| case | provider | slowdown (busy / idle) | p20 | p80 | note |",
        "|---|---|---|---|---|---|",
    ]
    for (case, metric), prov in sorted(table.items()):
        if metric != "slowdown":
            continue
        for name, row in sorted(prov.items()):
            if row["status"] != "ok":
                vals = (row["status"], "", "")
            else:
                median = _fmt(row["median"], ".2f")
                vals = (
                    _bold(f"{median}x" if median else ""),
                    _fmt(row["p20"], ".2f"),
                    _fmt(row["p80"], ".2f"),
                )
            out.append(f"| {case} | {name} | {' | '.join(vals)} | {row['note'][:320]} |")
    return out


def _mem_table(rows: list[dict]) -> list[str]:
    mem = [r for r in rows if r["level"] == "mem"]
    if not mem:
        return []
    out = [
        "",
        "## Memory ceilings (trilora.memory)",
        "",
        "| case | metric | provider | value | unit | status |",
        "|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['case']} | {r['metric']} | {r['provider']} | {_fmt(r['median'], '.6g')} | {r['unit']} | {r['status']} |"
        for r in mem
    ]
    return out


def write_report(
    out_dir: Path, meta: dict, rows: list[dict], notes: list[str], curves: dict[str, list[float]]
) -> Path:
    """Plots plus ``report.md`` in ``out_dir``; returns the report's path."""
    plots, plot_notes = make_plots(out_dir, rows, curves)
    path = Path(out_dir) / "report.md"
    atomic_write_text(path, render_markdown(meta, rows, [*notes, *plot_notes], plots))
    return path
