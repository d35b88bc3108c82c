"""``trilora bench --level moe``: a tiny run has both providers and their ratio in the
report, and the CUDA plan carries Qwen3-30B-A3B's layer shapes (checked on the meta device,
no GPU needed). Speed is never asserted here (bench/ owns the targets)."""

from __future__ import annotations

import argparse
import random
import re

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers.integrations.moe")

from trilora.bench import cli as bench_cli
from trilora.bench import moe, report
from trilora.bench.harness import ENV_FIELDS


def _tiny_plan(seed: int, memory: bool) -> moe.MoEPlan:
    rng = random.Random(seed)
    # awkward batch / length, so the experts' token groups are uneven
    return moe.MoEPlan(
        "tiny",
        batch=rng.randint(1, 3),
        seq_len=rng.choice([17, 23, 31]),
        steps=2,
        warmup_steps=1,
        dtype=torch.float32,
        rank=rng.choice([2, 4]),
        memory=memory,
        memory_steps=1,
        layer_repeats=2,
    )


def _meta():
    env = dict.fromkeys(ENV_FIELDS, "test")
    env["device_type"] = "cpu"
    return {
        "run_id": "t",
        "command": "trilora bench",
        "levels": ["moe"],
        "quick": True,
        "env": env,
        "wall_s": 1.0,
    }


def _check_both_sides(plan, rows, notes, metrics):
    cpu = torch.device("cpu")
    for metric in metrics:
        got = {r["provider"]: r for r in rows if r["metric"] == metric}
        assert set(got) == set(moe.PROVIDERS), metric
        for r in got.values():
            assert r["status"] == "ok", (metric, r["note"])
            assert r["median"] > 0
    assert {r["case"] for r in rows} >= {
        moe.case_name(plan, cpu),
        moe.case_name(plan, cpu, "experts_layer"),
    }
    report.add_ratios(rows)
    step = next(r for r in rows if r["metric"] == "step_time" and r["provider"] == "trilora")
    assert step["speedup_vs_bnb_peft"] > 0
    ratio = next(n for n in notes if "median of per-step ratios" in n)
    assert float(re.search(r"ratios ([0-9.]+)", ratio).group(1)) > 0
    md = report.render_markdown(_meta(), rows, notes, [])
    assert "## Mixture of experts" in md
    assert all(f"| {p} |" in md for p in moe.PROVIDERS)


def test_tiny_moe_level_reports_both_sides_and_a_ratio(seed, tmp_path):
    plan = _tiny_plan(seed, memory=False)
    rows, notes = moe.run(plan, torch.device("cpu"), log=lambda msg: None, workdir=tmp_path)
    _check_both_sides(plan, rows, notes, ("step_time", "tokens_per_s", "loss_final", "fwd_bwd"))
    skipped = [r for r in rows if r["metric"] in ("peak_mem", "step_mem")]
    assert skipped and all(r["status"] == "skipped" for r in skipped)


@pytest.mark.slow
def test_tiny_moe_level_measures_each_sides_memory(seed, tmp_path):
    plan = _tiny_plan(seed, memory=True)
    rows, notes = moe.run(plan, torch.device("cpu"), log=lambda msg: None, workdir=tmp_path)
    _check_both_sides(plan, rows, notes, ("step_time", "peak_mem", "step_mem", "fwd_bwd"))
    assert any("peak memory trilora" in n for n in notes)


def test_a_disabled_provider_is_skipped_not_failed(tmp_path):
    plan = _tiny_plan(0, memory=False)
    rows, notes = moe.run(
        plan, torch.device("cpu"), ("bnb_peft",), log=lambda msg: None, workdir=tmp_path
    )
    assert {r["status"] for r in rows if r["provider"] == "bnb_peft"} == {"skipped"}
    assert any("--skip-provider" in n for n in notes)


def test_cuda_plan_has_qwen3_30b_a3b_layer_shapes():
    """The CUDA plan, built without a GPU: its experts tensors are Qwen3-30B-A3B's (meta
    device), bf16, and --compute-dtype both gives one plan per dtype."""
    plan = moe.default_plan(torch.device("cuda"), quick=False)
    assert plan.dtype == torch.bfloat16 and not plan.interleave
    shape = moe.SHAPES[plan.shape]
    assert (shape.hidden, shape.experts, shape.top_k, shape.moe_intermediate) == (
        2048,
        128,
        8,
        768,
    )
    assert moe.experts_shapes(shape) == {
        "gate_up_proj": (128, 2 * 768, 2048),
        "down_proj": (128, 2048, 768),
    }
    sub = argparse.ArgumentParser().add_subparsers()
    parser = bench_cli.add_parser(sub)
    args = parser.parse_args(["--level", "moe", "--compute-dtype", "both", "--steps", "3"])
    plans = bench_cli.moe_plans(args, torch.device("cuda"))
    assert [p.dtype for p in plans] == [torch.float32, torch.bfloat16]
    assert all(p.steps == 3 and p.shape == "qwen3-30b-a3b" for p in plans)
    assert moe.case_name(plans[0], torch.device("cuda")).endswith("/fp32")
    with pytest.raises(ValueError, match="valid shapes"):
        moe.MoEPlan("qwen3-235b", 1, 1, 1, 0, torch.bfloat16)
