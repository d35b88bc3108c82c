"""trilora mem on mixture-of-experts models: presets, the analytical model, the CLI.

The analytical model (trilora.memory.moe) builds the model on the meta device (a fraction of
a second even for Qwen3-235B) and counts bytes: every test here is well under a second but
the CLI ones (transformers/PEFT imports).
"""

import warnings
from dataclasses import replace

import pytest
import torch

from trilora.formats import QuantConfig, get_format
from trilora.memory.moe import (
    find_max_moe,
    is_moe,
    minimum_moe_bytes,
    moe_layout,
    moe_report,
    static_bytes,
)
from trilora.memory.report import MemOptions
from trilora.memory.trace import load_config

# (total, active) parameters as the model cards publish them, in billions, and where:
# a typo in a preset's sizes moves its counts by more than the 1.5% allowed for rounding.
# gpt-oss's card counts active parameters without the embedding table (its 3.6B / 5.1B
# exclude 201,088 x 2,880 = 579M); the others count every parameter a token touches.
PUBLISHED_MOE = {
    # huggingface.co/Qwen/Qwen3-30B-A3B: "30.5B in total and 3.3B activated"
    "qwen3-30b-a3b": (30.5, 3.3),
    # huggingface.co/Qwen/Qwen3-235B-A22B: "235B in total and 22B activated"
    "qwen3-235b-a22b": (235.0, 22.0),
    # openai.com gpt-oss model card, table 1: 20.91B total, 3.61B active
    "gpt-oss-20b": (20.9, 3.6),
    # the same table: 116.83B total, 5.13B active
    "gpt-oss-120b": (116.8, 5.1),
    # mistral.ai "Mixtral of experts": 46.7B total, 12.9B per token
    "mixtral-8x7b": (46.7, 12.9),
    # arxiv 2409.02060 (OLMoE): 6.9B total, 1.3B active
    "olmoe-1b-7b": (6.9, 1.3),
}
ACTIVE_WITHOUT_EMBEDDING = {"gpt-oss-20b", "gpt-oss-120b"}


def _counts(name: str) -> tuple[float, float]:
    """(total, active) parameters of preset ``name``, in billions, from the meta model."""
    from transformers import AutoModelForCausalLM

    config = load_config(name)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layout = moe_layout(config)
    experts = layout.layer_experts()[0].experts
    active = total - layout.expert_numel() * (experts - layout.top_k) / experts
    if name in ACTIVE_WITHOUT_EMBEDDING:
        active -= layout.embedding_numel
    return total / 1e9, active / 1e9


@pytest.mark.parametrize("name", sorted(PUBLISHED_MOE))
def test_moe_preset_matches_its_published_counts(name):
    total, active = _counts(name)
    want_total, want_active = PUBLISHED_MOE[name]
    # 1.5%, or one unit of the figure's last digit (cards truncate: Qwen3-30B-A3B's 3.35B
    # active is "3.3B")
    assert abs(total - want_total) <= max(0.015 * want_total, 0.1), name
    assert abs(active - want_active) <= max(0.015 * want_active, 0.1), name
    assert is_moe(load_config(name))


def test_every_moe_preset_is_counted():
    from trilora.presets import names

    assert {n for n in names() if is_moe(load_config(n))} == set(PUBLISHED_MOE)


def _tiny_moe(rng, experts=None) -> dict:
    """A small Qwen3-MoE config of awkward random sizes."""
    heads = int(rng.integers(2, 5))
    return dict(
        model_type="qwen3_moe",
        hidden_size=int(rng.integers(3, 9)) * 16 + 8,
        intermediate_size=96,
        moe_intermediate_size=int(rng.integers(5, 40)) * 4 + 4,
        num_hidden_layers=int(rng.integers(2, 5)),
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=24,
        num_experts=experts or int(rng.integers(3, 12)),
        num_experts_per_tok=2,
        vocab_size=int(rng.integers(200, 400)),
    )


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_expert_bytes_are_experts_times_one_matrix(rng, quant):
    raw = _tiny_moe(rng)
    config = load_config(raw)
    layout = moe_layout(config)
    q = QuantConfig(quant, 64, True)
    fmt = get_format(q)
    e, h, i = raw["num_experts"], raw["hidden_size"], raw["moe_intermediate_size"]
    per_layer = e * (fmt.nbytes((2 * i, h), q) + fmt.nbytes((h, i), q))
    opts = MemOptions(quant_type=quant, r=4)
    static = static_bytes(layout, opts, "trilora")
    assert static["expert_weights"] == raw["num_hidden_layers"] * per_layer
    # bitsandbytes + PEFT keeps them 16-bit
    base = static_bytes(layout, opts, "bnb_peft")
    assert base["expert_weights"] == raw["num_hidden_layers"] * e * 3 * i * h * 2


def test_doubling_the_experts_adds_their_bytes(rng):
    raw = _tiny_moe(rng)
    opts = MemOptions(seq_len=256, r=int(rng.integers(2, 9)))
    q = QuantConfig("nf4", 64, True)
    fmt = get_format(q)
    one = moe_report(load_config(raw), opts)
    two = moe_report(load_config({**raw, "num_experts": 2 * raw["num_experts"]}), opts)
    e, h, i, layers = (
        raw[k] for k in ("num_experts", "hidden_size", "moe_intermediate_size", "num_hidden_layers")
    )

    def weights(rep):
        c = rep.categories
        return c["base_weights"] + c["quant_state"]

    # E more expert matrices per layer, each quantized separately; E more router rows (16-bit)
    added = layers * e * (fmt.nbytes((2 * i, h), q) + fmt.nbytes((h, i), q))
    assert weights(two) - weights(one) == added
    assert two.categories["other_frozen"] - one.categories["other_frozen"] == layers * e * h * 2
    # rank per expert: A [rank*E, in], B [out, rank*E] for gate_up and down, fp32, with the
    # ranks PEFT gives a real model of this config (all-linear: 2r on the fused gate_up_proj)
    import peft
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        real = AutoModelForCausalLM.from_config(load_config(raw))
    wrapped = peft.get_peft_model(
        real, peft.LoraConfig(r=opts.r, target_modules="all-linear"), low_cpu_mem_usage=True
    )
    rank = {
        m.parameter_name: m.lora_A["default"].out_features // e
        for m in wrapped.modules()
        if type(m).__name__ == "ParamWrapper" and m.parameter_name.endswith("_proj")
    }
    assert rank["gate_up_proj"] == 2 * opts.r and rank["down_proj"] == opts.r
    lora = two.categories["lora_params"] - one.categories["lora_params"]
    assert (
        lora == layers * e * (rank["gate_up_proj"] * (h + 2 * i) + rank["down_proj"] * (i + h)) * 4
    )
    assert two.categories["activations"] >= one.categories["activations"]  # router logits


@pytest.mark.parametrize("name", sorted(PUBLISHED_MOE))
def test_every_moe_preset_answers_and_beats_the_baseline(name):
    config = load_config(name)
    opts = MemOptions(r=4, seq_len=1024)
    # a budget where the baseline fits a little: its floor plus 4 GiB
    budget = minimum_moe_bytes(config, opts, "bnb_peft") + 4 * 1024**3
    ours, rep = find_max_moe(config, opts, budget, name=name)
    theirs, base = find_max_moe(config, opts, budget, provider="bnb_peft", name=name)
    assert rep is not None and rep.total <= budget < rep.options["search"]["next_total"]
    assert ours > theirs and (base is None or base.total <= budget)
    # at one length, trilora's step is smaller, and its experts are the 4-bit bytes
    at = replace(opts, seq_len=max(1024, theirs))
    a, b = moe_report(config, at), moe_report(config, at, "bnb_peft")
    assert a.total < b.total
    assert a.options["moe"]["expert_weights"] * 3 < b.options["moe"]["expert_weights"]


def test_more_tokens_need_more_memory(rng):
    config = load_config(_tiny_moe(rng))
    for provider in ("trilora", "bnb_peft"):
        for ckpt in (True, False):
            opts = MemOptions(r=4, checkpointing=ckpt)
            totals = [
                moe_report(config, replace(opts, seq_len=t), provider).total
                for t in (512, 2048, 8192)
            ]
            assert totals == sorted(totals) and totals[0] < totals[-1]


def test_traced_paths_refuse_moe_in_one_line(rng):
    from trilora.memory.search import find_max, profile
    from trilora.memory.trace import trace_trilora

    config = load_config(_tiny_moe(rng))
    opts = MemOptions(seq_len=64, r=4)
    for call in (
        lambda: profile(config, opts, depth="full"),
        lambda: profile(config, opts, "bnb_peft", depth="extrapolate"),
        lambda: trace_trilora(config, opts),
        lambda: find_max(config, opts, 10**12, confirm=True),
    ):
        with pytest.raises(ValueError, match="mixture-of-experts") as err:
            call()
        assert "\n" not in str(err.value)
    # the default depth answers from the analytical model
    assert profile(config, opts, depth="fast").method == "analytical"


def test_cli_budget_with_the_baseline(capsys):
    from trilora.cli import main

    argv = ["mem", "olmoe-1b-7b", "--budget", "16GB", "-r", "8", "--baseline"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "largest seq_len within" in out and "experts: " in out
    assert "bitsandbytes + PEFT: " in out and "balanced routing" in out
    assert main(["mem", "olmoe-1b-7b", "--confirm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixture-of-experts" in err and len(err.splitlines()) == 1
