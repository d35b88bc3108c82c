"""trilora mem: fake-tensor traces against real CPU runs, extrapolation, search, CLI, errors.

Every trace here is of a tiny Llama (a few seconds each on 2 cores); full-size traces
belong in bench/results/mem, not in tests.
"""

import json
from dataclasses import replace

import pytest

from trilora.cli import main
from trilora.memory.depth import EXTRAPOLATE_LAYERS
from trilora.memory.report import MemOptions, extrapolate_depth
from trilora.memory.search import find_max, largest_fitting, profile
from trilora.memory.trace import load_config, preset_names, profile_trilora

TINY = dict(
    model_type="llama",
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=8192,
)


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY)


@pytest.mark.parametrize(
    "opts",
    [
        MemOptions(seq_len=256, batch=2, r=8, offload=False, mlp_chunks=2, offload_embeddings=True),
        MemOptions(seq_len=128, batch=1, r=4, checkpointing=False, offload=False, mlp_chunks=None),
    ],
)
def test_fake_trace_matches_real_cpu_step(tiny, opts):
    # The same step on real CPU tensors, tracked by MemTracker: within 5 %.
    predicted = profile_trilora(tiny, opts, fake=True)
    real = profile_trilora(tiny, opts, fake=False)
    assert abs(predicted.traced_peak - real.traced_peak) <= 0.05 * real.traced_peak
    assert predicted.categories["activations"] > 0 and predicted.categories["optimizer_state"] > 0
    assert predicted.host_embedding == real.host_embedding


@pytest.mark.slow  # a full-depth trace (~5 s); the same transformers code traced by test_fast.py's no-checkpointing lattice check
def test_depth_extrapolation_matches_full_trace(tiny):
    # Layers 3 and 4 are past the boundary effects of offload (the last layer is never
    # offloaded, the one before it has no prefetch); 5 layers checks the extrapolation.
    la, lb = EXTRAPOLATE_LAYERS
    opts = MemOptions(seq_len=1024, r=8, mlp_chunks=2)
    full = profile_trilora(tiny, opts, lb + 1)
    ext = extrapolate_depth(
        profile_trilora(tiny, opts, la), profile_trilora(tiny, opts, lb), lb + 1
    )
    # exact, category by category (tests/memory/test_fast.py checks it at full length too)
    assert ext.categories == full.categories and ext.total == full.total
    assert ext.host_pinned == full.host_pinned == lb * 1024 * TINY["hidden_size"] * 2


@pytest.mark.slow  # our own options over the same traces (~4 s); tracing the models: test_fake_trace_matches_real_cpu_step
def test_offload_chunks_and_fused_loss_reduce_memory(tiny):
    t, h, v = 512, TINY["hidden_size"], TINY["vocab_size"]
    best = profile_trilora(tiny, MemOptions(seq_len=t, r=8, mlp_chunks=4, offload_embeddings=True))
    # every layer input but the last sits in host memory (bf16), and so does the table
    assert best.host_pinned == (TINY["num_hidden_layers"] - 1) * t * h * 2
    assert best.host_embedding == v * h * 2
    no_offload = profile_trilora(tiny, MemOptions(seq_len=t, r=8, offload=False, mlp_chunks=4))
    plain = profile_trilora(
        tiny, MemOptions(seq_len=t, r=8, offload=False, mlp_chunks=None, fused_ce=False)
    )
    assert no_offload.host_pinned == 0 and no_offload.host_embedding == 0
    assert best.categories["other_frozen"] == no_offload.categories["other_frozen"] - v * h * 2
    # tiny model: the layer inputs are a small share of the peak, so offload only must not hurt
    assert best.traced_peak <= 1.02 * no_offload.traced_peak
    assert no_offload.traced_peak < plain.traced_peak
    base = profile(
        tiny, MemOptions(seq_len=t, r=8, offload=False, mlp_chunks=None, fused_ce=False), "bnb_peft"
    )
    assert base.traced_peak > plain.traced_peak * 0.9  # real bitsandbytes + PEFT code ran
    assert base.categories["lora_params"] == best.categories["lora_params"]


@pytest.mark.slow  # our own options over the same traces (~4 s); tracing the models: test_fake_trace_matches_real_cpu_step
def test_fused_norm_grouped_attention_and_optimizer_offload(tiny):
    t = 1024
    base = MemOptions(seq_len=t, r=8, offload=False, mlp_chunks=4, fused_norm=False)
    plain = profile_trilora(tiny, base)
    norm = profile_trilora(tiny, replace(base, fused_norm=True))
    grouped = profile_trilora(tiny, replace(base, fused_norm=True, grouped_attention=True))
    # eager RMSNorm keeps fp32 copies of [t, hidden] per norm; the op keeps none
    assert norm.traced_peak < plain.traced_peak
    assert grouped.traced_peak <= norm.traced_peak
    offloaded = profile_trilora(
        tiny, replace(base, fused_norm=True, grouped_attention=True, optimizer="adamw_cpu_offload")
    )
    n = offloaded.categories["lora_params"] // 4  # fp32 LoRA parameters
    assert offloaded.categories["optimizer_state"] == 0
    assert offloaded.categories["gradients"] < grouped.categories["gradients"] or (
        grouped.categories["gradients"] == 0
    )
    # CPUOffloadAdamW's host memory per fp32 LoRA parameter: two fp32 moments, an fp32
    # master, an fp32 gradient accumulator and a pinned staging copy of the gradient
    assert offloaded.host_optimizer == (2 * 4 + 4 + 4 + 4) * n
    assert offloaded.total < grouped.total


@pytest.mark.parametrize("guess", [1, 40, 97, 5000])
@pytest.mark.parametrize("curve", ["affine", "convex", "steps"])
def test_largest_fitting_is_exact(curve, guess):
    # Pure search logic on closed-form curves of the shapes traces have.
    fn = {
        "affine": lambda x: 1000 + 37 * x,
        "convex": lambda x: 1000 + 3 * x + x * x // 50,
        "steps": lambda x: 1000 + 30 * x + (5000 if x > 64 else 0),
    }[curve]
    budget = 9000
    calls = []
    v, seen = largest_fitting(lambda x: calls.append(x) or fn(x), budget, 8, guess)
    brute = max(x for x in range(8, 10000, 8) if fn(x) <= budget)
    assert v == brute and v + 8 in seen and len(calls) <= 24
    assert largest_fitting(fn, 10, 8, guess)[0] == 0


@pytest.mark.slow  # our search logic; its traces (~20 s of CPU) are the ones tested above
def test_budget_search(tiny):
    opts = MemOptions(seq_len=1024, r=8, offload_embeddings=True)
    budget = profile(tiny, opts).total + 1
    lines = []
    value, rep = find_max(tiny, opts, budget, multiple=512, progress=lines.append)
    info = rep.options["search"]
    # below the fast model's lattice (8,192 tokens): traced at the precision asked for
    assert value >= 1024 and rep.total <= budget and rep.options["seq_len"] == value
    assert info["precision"] == 512 and info["method"] == "fast"
    assert info["next_value"] == value + 512 and info["next_total"] > budget
    # one progress line per evaluated length, naming the verdict of the answer and the next
    assert any(f"seq_len={value:,} " in s and "fits" in s for s in lines)
    assert any(f"seq_len={value + 512:,} " in s and "exceeds" in s for s in lines)
    # --confirm: the same answer from full-depth traces (2 layers: full depth already)
    confirmed, crep = find_max(tiny, opts, budget, multiple=512, confirm=True)
    cinfo = crep.options["search"]
    assert confirmed == value and cinfo["method"] == "full" and cinfo["fast_answer"] == value
    assert cinfo["next_total"] > budget >= crep.total
    with pytest.raises(ValueError, match="minimum budget"):
        find_max(tiny, opts, 1000)
    with pytest.raises(ValueError, match="'seq_len' or 'batch'"):
        find_max(tiny, opts, budget, search="tokens")


def test_bad_inputs(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"known presets: .*llama-3\.1-8b"):
        load_config("llama-9")
    bad = dict(TINY)
    del bad["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'intermediate_size'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "config.json")
    assert {"llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "mistral-7b"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.num_hidden_layers > 0
    with pytest.raises(ValueError, match="provider must be one of"):
        profile(tiny, MemOptions(), "bnb+peft")
    with pytest.raises(ValueError, match="seq_len >= 2"):
        profile(tiny, MemOptions(seq_len=1))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        profile(tiny, MemOptions(optimizer="sgd"))


@pytest.mark.slow  # a full `trilora mem` run (~5 s); the same code path: tests/test_cli_outputs.py::test_mem_json_refuses_an_existing_file
def test_cli(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "r.json"
    argv = ["mem", str(cfg), "--seq-len", "64", "-r", "8", "--baseline", "--offload-embeddings"]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bnb_peft" in text and "pinned host memory" in text and "host embedding table" in text
    data = json.loads(out.read_text())
    assert [r["provider"] for r in data["reports"]] == ["trilora", "bnb_peft", "bnb_peft"]
    assert data["reports"][0]["host_embedding"] == TINY["vocab_size"] * TINY["hidden_size"] * 2
    # (--sweep --plot and a budget under the minimum: tests/test_cli_outputs.py)
    assert main(["mem", "no-such-model"]) == 2
    assert "known presets" in capsys.readouterr().err
    # every preset is named in --help
    with pytest.raises(SystemExit):
        main(["mem", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert all(name in helptext for name in preset_names()) and "--confirm" in helptext
