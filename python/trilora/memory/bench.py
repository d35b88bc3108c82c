"""Rows for ``trilora bench``: predicted peak memory of trilora and bitsandbytes + PEFT."""

from __future__ import annotations

from dataclasses import replace

from trilora.memory.report import GiB, MemOptions
from trilora.memory.search import profile
from trilora.memory.trace import load_config

QUICK_SEQ_LENS = (1024, 2048)
FULL_SEQ_LENS = (2048, 8192)


def bench_cases(quick: bool) -> list[dict]:
    """Rows ``{"case", "metric", "provider", "value", "unit", "seq_len", "model", "batch",
    "rank", "note"}`` of predicted peak device memory (GiB) and pinned host memory (GiB).

    Llama-3.1-8B, LoRA r=32 on all linear layers, batch 1, bf16, AdamW; providers
    ``trilora`` (checkpointing + offload + 8 MLP chunks + fused CE) and ``bnb_peft``
    (transformers + bitsandbytes + PEFT with gradient checkpointing), one row per provider,
    metric and sequence length so memory can be plotted against ``seq_len``.

    ``quick``: a 2-layer slice at 1,024 and 2,048 tokens (well under a minute on 2 cores).
    Otherwise full depth at 2,048 and 8,192 tokens, extrapolated from 3- and 4-layer
    traces (exact for identical layers; a few minutes on 2 cores).
    """
    config = load_config("llama-3.1-8b")
    if quick:
        config.num_hidden_layers = 2
        lens, depth, model = QUICK_SEQ_LENS, "full", "llama-3.1-8b[2 layers]"
    else:
        lens, depth, model = FULL_SEQ_LENS, "extrapolate", "llama-3.1-8b"
    note = "predicted by trilora mem (fake-tensor trace" + (
        ")" if depth == "full" else ", depth-extrapolated from 3 and 4 layers)"
    )
    rows = []
    for t in lens:
        opts = MemOptions(seq_len=t)
        base = replace(opts, offload=False, mlp_chunks=None, fused_ce=False, fused_norm=False)
        for provider, o in (("trilora", opts), ("bnb_peft", base)):
            rep = profile(config, o, provider, depth, "llama-3.1-8b")
            common = {
                "case": f"{model} r{o.r} T={t}",
                "provider": provider,
                "unit": "GiB",
                "seq_len": t,
                "model": model,
                "batch": o.batch,
                "rank": o.r,
                "note": note,
            }
            rows.append({**common, "metric": "peak_device_memory", "value": rep.total / GiB})
            if provider == "trilora":
                rows.append(
                    {**common, "metric": "pinned_host_memory", "value": rep.host_pinned / GiB}
                )
    return rows
