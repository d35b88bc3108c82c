"""What a finished run reports: the model's parameter count (4-bit weights counted by their
logical shape), the loss curve (from the base model's held-out loss on), and the demo's
closing table (the held-out losses printed once)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.train.config import TrainConfig
from trilora.train.loop import train


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    # awkward widths: 3 heads of 10, MLP 43 wide, odd element counts in the 4-bit weights
    save_tiny_lm(
        root / "m",
        layers=2,
        hidden=30,
        intermediate=43,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=10,
        tie=True,
    )
    write_jsonl(root / "d.jsonl", sft_records(20, seed=3))
    return root


def _cfg(tiny, out, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny / "m"),
        data=str(tiny / "d.jsonl"),
        max_steps=4,
        batch_size=4,
        compare=0,
        save_every=0,
        progress=False,
        val_fraction=0.25,
        out=str(out),
        lr=1e-2,
        lora_r=4,
    )
    return TrainConfig(**{**base, **kw})


def _hf_parameter_count(folder) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return sum(p.numel() for p in model.parameters())  # tied weights once


@pytest.mark.parametrize("quant", ["nf4", "fp4", "none"])
def test_parameter_count_is_the_models_whatever_the_storage(tiny, tmp_path, capfd, quant):
    from trilora.train.model import load_model

    expected = _hf_parameter_count(tiny / "m")
    lm = load_model(_cfg(tiny, tmp_path, quant=quant), "cpu", log=lambda *_: None)
    assert lm.total_params == expected
    lora = lm.trainable_params
    plain = load_model(_cfg(tiny, tmp_path, quant="none"), "cpu", log=lambda *_: None)
    assert lora == plain.trainable_params > 0  # the same adapter on a 16-bit base
    s = train(_cfg(tiny, tmp_path / "run", quant=quant))
    assert (s["total_params"], s["trainable_params"]) == (expected, lora)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["total_params"] == expected
    line = next(x for x in capfd.readouterr().err.splitlines() if " parameters, " in x)
    assert f": {expected / 1e6:.1f}M parameters, {lora / 1e6:.2f}M trainable" in line


def test_full_fine_tuning_counts_every_weight_as_trainable(tiny, tmp_path):
    s = train(_cfg(tiny, tmp_path / "full", quant="none", finetune="full", max_steps=1))
    assert s["total_params"] == s["trainable_params"] == _hf_parameter_count(tiny / "m")


@pytest.mark.parametrize("eval_every", [0, 2])
def test_loss_curve_starts_at_the_base_models_held_out_loss(tiny, tmp_path, eval_every):
    from trilora.train.reporting import loss_curve_points

    out = tmp_path / "run"
    s = train(_cfg(tiny, out, eval_every=eval_every, max_steps=5))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    base = json.loads((out / "base.json").read_text())
    train_points, held_out = loss_curve_points(records, base)
    assert [st for st, _ in train_points] == [1, 2, 3, 4, 5]
    steps = [0, 2, 4, 5] if eval_every else [0, 5]
    assert [st for st, _ in held_out] == steps
    assert held_out[0][1] == s["base"]["eval_loss"] and held_out[-1][1] == s["tuned"]["eval_loss"]
    assert held_out[0][1] != held_out[-1][1]
    png = out / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and s["loss_curve"] == str(png)


def test_the_demo_prints_the_held_out_losses_once(tiny, tmp_path, capsys):
    from trilora.train.demo import run_demo

    # the demo's own table (loss, perplexity, style scores) over a tiny model's run
    cfg = _cfg(tiny, tmp_path / "demo", max_new_tokens=4, compare=2)
    assert run_demo(cfg) == 0
    out = capsys.readouterr().out
    loss_rows = [x for x in out.splitlines() if re.match(r"\s*(held-out )?loss\s", x)]
    ppl_rows = [x for x in out.splitlines() if re.match(r"\s*(held-out )?perplexity\s", x)]
    assert len(loss_rows) == 1 and len(ppl_rows) == 1, out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    base, tuned = summary["base"]["eval_loss"], summary["tuned"]["eval_loss"]
    assert loss_rows[0].split()[-2:] == [f"{base:.3f}", f"{tuned:.3f}"]
    assert "style score" in out


def test_phase_peaks_attribute_memory_to_the_phase_that_used_it():
    import time

    from trilora.train.reporting import PhasePeaks, current_memory_bytes, peak_memory_bytes

    n = (48 + torch.randint(0, 32, ()).item()) << 20  # 48-80 MiB, touched page by page
    before = peak_memory_bytes("cpu")
    idle = current_memory_bytes("cpu")
    mem = PhasePeaks("cpu", interval=0.002)
    with mem.phase("a"):
        big = bytearray(n)
        big[::4096] = b"\x01" * len(range(0, n, 4096))
        time.sleep(0.05)
        del big
    with mem.phase("b"):
        time.sleep(0.02)
    with mem.phase("a"), mem.phase("c"):
        pass
    out = mem.close()
    assert list(out) == ["a", "b", "c"]
    assert out["a"]["peak"] >= idle + 0.9 * n
    assert out["b"]["peak"] < out["a"]["peak"] - n // 2
    # What the process's peak rose by is the phases' (within what the lines between the
    # phases allocate).
    rise = peak_memory_bytes("cpu") - before
    assert abs(sum(v["raised"] for v in out.values()) - rise) <= 1 << 20
    assert all(0 <= v["raised"] <= v["peak"] for v in out.values())


def test_a_run_reports_the_peak_of_each_phase(tiny, tmp_path, capfd):
    s = train(_cfg(tiny, tmp_path / "run", save_every=2, eval_every=2, compare=1, max_new_tokens=2))
    phases = json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_by_phase"]
    assert phases == s["peak_memory_by_phase"]
    assert {"load", "evaluation", "generation", "steps", "save"} <= set(phases)
    assert max(v["peak"] for v in phases.values()) <= s["peak_memory"]
    assert all(v["peak"] > 0 for v in phases.values())
    assert "peak memory by phase: load " in capfd.readouterr().out
