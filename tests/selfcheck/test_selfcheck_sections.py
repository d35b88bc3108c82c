"""The sections ``trilora selfcheck --gpu`` adds (speed, memory, e2e), run here on their CPU
plans: the same code as on the GPU except the CUDA-only calls, which have never run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trilora.bench.harness import CSV_FIELDS
from trilora.selfcheck import worker
from trilora.selfcheck.report import section_status, verdict
from trilora.selfcheck.speed import crossover_point
from trilora.selfcheck.units import Context


def _run(section: str, tmp_path: Path, seed: int) -> dict:
    ctx = Context("cpu", seed, tmp_path, log=lambda line: None)
    assert worker.run_units(section, ctx, tmp_path / f"{section}.json") == worker.EXIT_DONE
    state = worker.load_state(tmp_path / f"{section}.json")
    record = {"name": section, "units": [state["results"][u["id"]] for u in state["planned"]]}
    record["status"] = section_status(record)
    record["verdict"] = verdict(record)
    return record


def _check_rows(rows: list[dict]) -> None:
    assert rows
    for row in rows:
        assert set(CSV_FIELDS) <= set(row), set(CSV_FIELDS) - set(row)


@pytest.mark.slow  # times bnb + PEFT against trilora (~8 s of CPU); their parity: tests/test_peft_training.py
def test_speed_section_on_its_cpu_plan(tmp_path, seed):
    record = _run("speed", tmp_path, seed)
    assert record["status"] == "pass", [u.get("message") for u in record["units"]]
    ids = [u["id"] for u in record["units"]]
    assert ids == [
        "device peaks",
        "quantize",
        "rms_norm",
        "qlora_linear q_proj",
        "crossover q_proj",
    ]
    rows = [r for u in record["units"] for r in u.get("rows", [])]
    _check_rows(rows)
    assert (tmp_path / "device_peaks.json").exists()
    layer = [r for r in rows if r["case"].endswith("/M16") and r["metric"] == "fwd_bwd"]
    assert {r["provider"] for r in layer} == {"trilora", "bnb_peft", "bf16_peft"}
    trilora = next(r for r in layer if r["provider"] == "trilora")
    assert trilora["ratio_vs_bf16_peft"] > 0 and trilora["speedup_vs_bnb_peft"] > 0
    assert trilora["floor_frac"] > 0
    cross = record["units"][-1]["info"]
    assert set(cross["ratios_fused_over_scratch"]) == {"8", "32"}
    assert "crossover_tokens" in cross
    for part in (
        "the time of bf16 LoRA",
        "faster than bitsandbytes + PEFT",
        "of the roofline",
        "crossover",
    ):
        assert part in record["verdict"], record["verdict"]


@pytest.mark.slow  # our own report over the memory model (~3 s); the model's traces: tests/memory
def test_memory_section_predicts_on_the_cpu(tmp_path, seed):
    record = _run("memory", tmp_path, seed)
    units = record["units"]
    assert [u["config"] for u in units] == [
        "defaults",
        "no checkpointing",
        "grouped attention + adamw_cpu_offload",
    ]
    for u in units:
        assert u["status"] == "skipped" and "needs CUDA" in u["message"]
        assert u["info"]["predicted_bytes"] > 0
        _check_rows(u["rows"])
    assert "not measured" in record["verdict"]


def test_e2e_section_on_its_cpu_plan(tmp_path, seed):
    record = _run("e2e", tmp_path, seed)
    unit, moe = record["units"]
    assert moe["status"] == "skipped" and "GPU only" in moe["message"]
    assert unit["status"] == "pass", unit.get("message")
    _check_rows(unit["rows"])
    tps = {
        r["provider"] for r in unit["rows"] if r["metric"] == "tokens_per_s" and r["status"] == "ok"
    }
    assert tps == {"trilora", "bnb_peft"}
    assert "tok/s" in record["verdict"]


def test_e2e_without_bitsandbytes_trains_trilora_alone(tmp_path, seed, monkeypatch):
    # Hidden from imports, bitsandbytes fails exactly as it would on a machine without it.
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    record = _run("e2e", tmp_path, seed)
    unit, _ = record["units"]
    assert unit["status"] == "pass", unit.get("message")
    providers = {r["provider"] for r in unit["rows"]}
    assert providers == {"trilora"}
    losses = unit["info"]["loss_curves"]["trilora"]
    assert len(losses) == 3 and all(x == x for x in losses)
    assert "trilora alone" in record["verdict"]


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ({512: 0.5, 1024: 0.8, 2048: 1.2, 4096: 1.5}, {"tokens": 2 ** (10 + 0.5)}),
        ({512: 1.1, 1024: 1.2}, {"tokens": None, "bound": "below", "at": 512}),
        ({512: 0.5, 8192: 0.9}, {"tokens": None, "bound": "above", "at": 8192}),
    ],
)
def test_crossover_point(ratios, expected):
    got = crossover_point(ratios)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value)


def test_bitsandbytes_cross_check_counts_differences(seed):
    # On the GPU this compares bitsandbytes' CUDA quantizer with its own CPU path when our
    # bytes disagree with it; here both sides are the CPU path, so it must count nothing,
    # and one flipped byte must be counted.
    import torch

    bnbf = pytest.importorskip("bitsandbytes.functional")
    from trilora.selfcheck.cases import _bnb_cuda_vs_cpu

    w = torch.randn(40, 96)
    packed, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert "in 0 packed bytes and 0 absmax values" in _bnb_cuda_vs_cpu(
        bnbf, w, 64, True, "nf4", packed, st
    )
    packed = packed.clone()
    packed.view(-1)[3] ^= 0xFF
    assert "in 1 packed bytes" in _bnb_cuda_vs_cpu(bnbf, w, 64, True, "nf4", packed, st)
