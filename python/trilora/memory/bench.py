"""Rows for ``trilora bench``: predicted peak memory of trilora and bitsandbytes + PEFT."""

from __future__ import annotations

from dataclasses import replace

from trilora.memory.profiler import GiB, MemOptions, load_config, profile


def bench_cases(quick: bool) -> list[dict]:
    """``{"case", "metric", "provider", "value", "unit"}`` rows of predicted peak memory.

    ``quick``: a 2-layer Llama-3.1-8B slice at 2,048 tokens (seconds on 2 cores). Otherwise
    full-depth Llama-3.1-8B at 8,192 tokens, trilora and bitsandbytes + PEFT (with
    gradient checkpointing), r=32 on all linear layers, batch 1, bf16.
    """
    config = load_config("llama-3.1-8b")
    rows = []
    if quick:
        config.num_hidden_layers = 2
        opts = MemOptions(seq_len=2048)
        case = "llama-3.1-8b[2 layers] r32 T=2048"
    else:
        opts = MemOptions(seq_len=8192)
        case = "llama-3.1-8b r32 T=8192"
    for provider, o in (
        ("trilora", opts),
        ("bnb+peft", replace(opts, offload=False, mlp_chunks=None, fused_ce=False)),
    ):
        rep = profile(config, o, provider, "full", "llama-3.1-8b")
        rows.append(
            {
                "case": case,
                "metric": "peak_device_memory",
                "provider": provider,
                "value": rep.total / GiB,
                "unit": "GiB",
            }
        )
        if provider == "trilora":
            rows.append(
                {
                    "case": case,
                    "metric": "pinned_host_memory",
                    "provider": provider,
                    "value": rep.host_pinned / GiB,
                    "unit": "GiB",
                }
            )
    return rows
