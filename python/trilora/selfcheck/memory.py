"""Memory section: ``trilora mem --measure`` on a small model against its own prediction.

For each configuration of a Llama-3.2-1B-shaped model (the ``1b`` preset of
:mod:`trilora.bench.e2e`: hidden 2048, 16 layers, vocab 128,256, 8 KV heads; LoRA r=16 on
every linear layer, batch 1, bf16) the unit traces the training step on fake tensors
(:func:`trilora.memory.search.profile`, the prediction ``trilora mem`` prints as "traced
peak") and then runs the same step on the GPU (:func:`trilora.memory.measure.measure_cuda`,
``torch.cuda.max_memory_allocated`` over the second step). Both exclude the CUDA context
and allocator overheads, so they compare directly; the relative error is
``(measured - predicted) / measured``.

Configurations: trilora's defaults (checkpointing + activation offload + MLP chunks + fused
cross-entropy + fused RMSNorm) at 4,096 tokens; no checkpointing at 2,048 tokens (every
activation kept: tests the activation accounting); grouped attention with the CPU-offloaded
optimizer at 4,096 tokens.

On the CPU (tests only) the model is the ``tiny`` preset at 256 tokens: the prediction
runs, the measurement is reported as skipped.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from trilora.bench.e2e import PRESETS
from trilora.bench.harness import Stats, make_row
from trilora.memory.measure import measure_cuda
from trilora.memory.report import MemOptions
from trilora.memory.search import profile
from trilora.memory.trace import load_config
from trilora.selfcheck.units import Context, Unit

LEVEL = "mem"


def _model_config(ctx: Context):

    preset = "1b" if ctx.gpu else "tiny"
    raw = {
        "model_type": "llama",
        **PRESETS[preset],
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    }
    return preset, load_config(raw)


def configurations(ctx: Context) -> list[tuple[str, dict[str, Any]]]:
    """``(name, MemOptions fields)`` of each measured configuration."""
    long, short = (4096, 2048) if ctx.gpu else (256, 128)
    return [
        ("defaults", {"seq_len": long, "r": 16}),
        (
            "no checkpointing",
            {
                "seq_len": short,
                "r": 16,
                "checkpointing": False,
                "offload": False,
                "mlp_chunks": None,
            },
        ),
        (
            "grouped attention + adamw_cpu_offload",
            {"seq_len": long, "r": 16, "grouped_attention": True, "optimizer": "adamw_cpu_offload"},
        ),
    ]


def _unit(name: str, fields: dict[str, Any]):
    def run(ctx: Context) -> dict[str, Any]:

        preset, config = _model_config(ctx)
        opts = MemOptions(**fields)
        opts.validate()
        rep = profile(config, opts, "trilora", "full", preset)
        predicted = int(rep.traced_peak)
        case = f"{preset} r{opts.r} T={opts.seq_len} [{name}]"
        common = dict(
            model=preset,
            rank=opts.r,
            batch=opts.batch,
            seq_len=opts.seq_len,
            tokens=opts.batch * opts.seq_len,
            dtype=opts.dtype,
        )

        def row(metric: str, value: float, unit: str, note: str) -> dict:
            return make_row(
                LEVEL,
                case,
                metric,
                "trilora",
                unit,
                Stats(value, value, value, 1),
                note=note,
                **common,
            )

        rows = [row("predicted_peak", predicted, "bytes", "trilora mem traced peak (fake tensors)")]
        info: dict[str, Any] = {"predicted_bytes": predicted, "options": fields}
        if not ctx.gpu:
            return {
                "status": "skipped",
                "rows": rows,
                "info": info,
                "message": "measuring needs CUDA (--gpu); the prediction ran",
            }

        gc.collect()
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated()
        measured = int(measure_cuda(config, opts))
        rel = (measured - predicted) / measured
        rows.append(
            row(
                "measured_peak",
                measured,
                "bytes",
                "torch.cuda.max_memory_allocated over the second training step",
            )
        )
        rows.append(row("relative_error", rel, "ratio", "(measured - predicted) / measured"))
        info.update(measured_bytes=measured, relative_error=rel, resident_before_bytes=resident)
        return {"status": "pass", "rows": rows, "info": info}

    return run


def units(ctx: Context) -> list[Unit]:
    preset = "1b" if ctx.gpu else "tiny"
    return [
        Unit(
            f"mem {name}",
            _unit(name, fields),
            kernel="trilora mem --measure",
            config=name,
            shape=f"{preset} T={fields['seq_len']} r={fields['r']}",
            dtype="bf16",
            min_s=8.0 if ctx.gpu else 0.0,
        )
        for name, fields in configurations(ctx)
    ]


__all__ = ["configurations", "units"]
