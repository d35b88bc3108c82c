"""trilora mem for each base weight format: int8's bytes against nf4's, through the memory model."""

import random

import pytest

from trilora.cli import main
from trilora.memory.report import MemOptions
from trilora.memory.trace import load_config, profile_trilora


def _config(rng: random.Random) -> dict:
    # Awkward sizes: odd row counts, a K that is no multiple of the 4-bit blocksize.
    heads, kv = 2, 1
    head_dim = 2 * rng.randint(9, 20)
    return dict(
        model_type="llama",
        hidden_size=heads * head_dim,
        intermediate_size=rng.randint(50, 140) | 1,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=97,
        max_position_embeddings=512,
    )


def _decoder_linears(cfg: dict) -> list[tuple[int, int]]:
    """``(out, in)`` of every decoder linear of a Llama config, from its definition."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    return per_layer * cfg["num_hidden_layers"]


def test_int8_report_holds_codes_and_row_scales():
    rng = random.Random()
    cfg = _config(rng)
    config = load_config(cfg)
    opts = MemOptions(seq_len=64, r=4, offload=False, mlp_chunks=None)
    int8 = profile_trilora(config, MemOptions(**{**opts.__dict__, "quant_type": "int8"}))
    nf4 = profile_trilora(config, opts)
    shapes = _decoder_linears(cfg)
    # int8: one byte per weight, one fp32 SCB per output row; nothing else
    assert int8.categories["base_weights"] == sum(n * k for n, k in shapes), cfg
    assert int8.categories["quant_state"] == sum(4 * n for n, _ in shapes), cfg
    # nf4: half a byte per weight (each layer's packed bytes rounded up)
    assert nf4.categories["base_weights"] == sum((n * k + 1) // 2 for n, k in shapes), cfg
    assert nf4.categories["quant_state"] != int8.categories["quant_state"]
    # the LoRA adapters and the rest of the model do not depend on the format
    for key in ("lora_params", "other_frozen", "optimizer_state"):
        assert int8.categories[key] == nf4.categories[key], key


def test_int8_fake_trace_matches_real_cpu_step():
    config = load_config(_config(random.Random()))
    opts = MemOptions(seq_len=96, batch=2, r=4, offload=False, mlp_chunks=2, quant_type="int8")
    predicted = profile_trilora(config, opts, fake=True)
    real = profile_trilora(config, opts, fake=False)
    assert abs(predicted.traced_peak - real.traced_peak) <= 0.05 * real.traced_peak
    assert predicted.categories["base_weights"] == real.categories["base_weights"]


def test_cli_quant_int8(tmp_path, capsys):
    assert main(["mem", "qwen2.5-0.5b", "--seq-len", "256", "--quant", "int8", "--baseline"]) == 2
    assert "--baseline" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quant_type"):
        MemOptions(quant_type="int4").validate()
