"""The optimizer bench level on CPU: every provider yields a row, GPU rows are unmeasured."""

from __future__ import annotations

import itertools
import math

import torch

from trilora.bench import optim, report
from trilora.bench.harness import CSV_FIELDS, bad_rows, environment


def test_optim_level_rows(seed):
    plan = optim.OptimPlan(optim.lora_shapes(layers=1, rank=4, scale=64)[:6], "tiny", 0.05, 3)
    rows, _ = optim.run(plan, torch.device("cpu"), log=lambda _: None)
    assert not bad_rows(rows)
    assert all(set(r) == set(CSV_FIELDS) for r in rows)
    by = {(r["provider"], r["metric"]): r for r in rows if r["case"] == "tiny"}
    for provider in ("torch_fused", "trilora_32", "trilora_8", "trilora_cpu_offload"):
        assert by[(provider, "step_time")]["status"] == "ok"
        assert math.isfinite(by[(provider, "step_time")]["median"])
    for provider in optim.GPU_ONLY:
        assert by[(provider, "step_time")]["status"] == "skipped"
        assert by[(provider, "step_time")]["note"] == optim.UNMEASURED
    n = sum(math.prod(s) for s in plan.shapes)
    # torch's fp32 state and ours: 8 bytes per element, where the parameters are.
    assert by[("torch_fused", "state_device")]["median"] == 8 * n
    assert by[("trilora_32", "state_device")]["median"] == 8 * n
    assert by[("trilora_8", "state_device")]["median"] <= 8 * n
    assert by[("trilora_cpu_offload", "state_device")]["median"] == 0
    cost = [r for r in rows if r["case"] == "host_paging_cost"]
    assert len(cost) == 2 and all(r["status"] == "skipped" for r in cost)
    assert optim.report_lines(rows)[1].startswith("## Optimizers")
    # report.md renders the level: its section, one table line per row
    meta = {
        "run_id": "t",
        "command": "trilora bench --level optim",
        "levels": ["optim"],
        "quick": True,
        "env": environment(torch.device("cpu")),
        "wall_s": 1.0,
    }
    md = report.render_markdown(meta, rows, [], []).splitlines()
    start = md.index("## Optimizers (step time, state memory)")
    sep = next(i for i in range(start, len(md)) if md[i].startswith("|---"))
    table = list(itertools.takewhile(lambda line: line.startswith("| "), md[sep + 1 :]))
    assert len(table) == len(rows)
    assert any("| trilora_8 |" in line and "| ok |" in line for line in table)
    gpu_only = [line for line in table if line.split(" | ")[2] in optim.GPU_ONLY]
    assert len(gpu_only) == 3 * len(optim.GPU_ONLY)
    assert all(optim.UNMEASURED in line for line in gpu_only)
