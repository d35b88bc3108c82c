"""``trilora train --sweep NAME=V1,V2,...``: one run per value, tabulated.

Each run is a separate ``trilora train`` process in ``OUT/NAME-VALUE`` (so its peak memory
is its own: the CUDA peak it reports, or on the CPU its peak resident set from
``wait4``). The table (held-out loss, trainable parameters, peak memory, time) is printed
and written to ``OUT/sweep.md`` and ``OUT/sweep.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from trilora.io import UsageError, atomic_write_json, atomic_write_text, check_output
from trilora.train.config import TrainConfig, dump_yaml, parse_value
from trilora.train.reporting import human_bytes

__all__ = ["parse_sweep", "run_sweep"]


def parse_sweep(spec: str) -> tuple[str, list]:
    """``"lora_r=4,8"`` -> ``("lora_r", [4, 8])`` (names with - or _; values typed)."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not sep or name not in fields:
        raise UsageError(
            f"--sweep {spec!r}: expected NAME=V1,V2,... with NAME a setting such as "
            "lora_r, lr or max_seq_len"
        )
    if name in ("out", "model", "data"):
        raise UsageError(f"--sweep: {name} cannot be swept")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if len(items) < 1:
        raise UsageError(f"--sweep {spec!r}: no values")
    return name, [parse_value(name, v) for v in items]


def run_sweep(
    cfg: TrainConfig, spec: str, overwrite: bool = False, device: str | None = None
) -> int:

    name, values = parse_sweep(spec)
    cfg.validate()
    root = check_output(cfg.out, overwrite=overwrite, inputs=[cfg.model, cfg.data], flag="--out")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for value in values:
        run_cfg = dataclasses.replace(
            cfg, **{name: value}, out=str(root / f"{name}-{value}"), progress=False
        )
        run_cfg.validate()
        cfg_file = root / f".{name}-{value}.yaml"
        atomic_write_text(cfg_file, dump_yaml(run_cfg))
        cmd = [sys.executable, "-m", "trilora.cli", "train", "--config", str(cfg_file)]
        if overwrite:
            cmd.append("--overwrite")
        if device:
            cmd += ["--device", device]
        print(f"sweep {name}={value}: {run_cfg.out}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        cfg_file.unlink(missing_ok=True)
        if proc.returncode != 0:
            rows.append({name: value, "status": f"failed ({proc.returncode})", "time_s": wall})
            continue
        summary = json.loads((Path(run_cfg.out) / "summary.json").read_text())
        peak = summary["peak_memory"] if summary["device"] == "cuda" else usage.ru_maxrss * 1024
        rows.append(
            {
                name: value,
                "status": "ok",
                "eval_loss": summary["tuned"].get("eval_loss"),
                "base_eval_loss": summary["base"].get("eval_loss"),
                "trainable_params": summary["trainable_params"],
                "peak_memory": peak,
                "peak_memory_kind": "CUDA allocated" if summary["device"] == "cuda" else "RSS",
                "train_time_s": summary["train_time_s"],
                "time_s": wall,
            }
        )
    head = f"| {name} | held-out loss | trainable params | peak memory | train time | total time |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r[name]} | {r['status']} | | | | {r['time_s']:.1f} s |")
            continue
        loss = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        lines.append(
            f"| {r[name]} | {loss} | {r['trainable_params']:,} | "
            f"{human_bytes(r['peak_memory'])} ({r['peak_memory_kind']}) | "
            f"{r['train_time_s']:.1f} s | {r['time_s']:.1f} s |"
        )
    table = "\n".join(lines)
    print(table)
    atomic_write_text(root / "sweep.md", table + "\n")
    atomic_write_json(root / "sweep.json", rows)
    return 0 if all(r["status"] == "ok" for r in rows) else 1
