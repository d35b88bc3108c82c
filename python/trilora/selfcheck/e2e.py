"""End-to-end section: training steps of a small Llama at 2,048 tokens, trilora against
bitsandbytes + PEFT: tokens/s and peak memory.

The run is :func:`trilora.bench.e2e.run` on a plan derived from the bench's GPU plan: the
``1b`` preset (Llama-3.2-1B shape, random weights saved and loaded through transformers +
bitsandbytes 4-bit NF4 with double quantization, PEFT LoRA r=16 on the 7 projections,
gradient checkpointing, ``paged_adamw_8bit``), batch 1 x 2,048 tokens, 2 warm-up and 6
timed steps; ``bnb_peft`` trains that model, ``trilora`` the same model after
``trilora.patch``. Both need bitsandbytes (the trilora provider loads through it so both
start from the same bytes). Without bitsandbytes a second unit trains trilora alone, loaded
with :func:`trilora.from_pretrained` and :func:`trilora.get_peft_model`, so the run still
reports trilora's tokens/s and peak memory.

On the CPU (tests only) the plan is the bench's quick CPU plan (tiny preset, a few steps).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from trilora.bench import e2e
from trilora.bench.e2e import TARGET_MODULES, build_checkpoint
from trilora.bench.harness import (
    Stats,
    make_row,
    peak_memory_bytes,
    provider_status,
    reset_peak_memory,
    seeded,
    synchronize,
)
from trilora.bench.report import add_ratios
from trilora.loading import from_pretrained
from trilora.patches.activation_checkpointing import enable_checkpointing
from trilora.peft import get_peft_model
from trilora.selfcheck.units import Context, Unit

LEVEL = "e2e"


def plan_for(ctx: Context):

    device = torch.device(ctx.device)
    if ctx.gpu:
        plan = e2e.default_plan(device, quick=False, preset="1b")
        plan.batch, plan.seq_len, plan.steps, plan.warmup_steps = 1, 2048, 6, 2
    else:
        plan = e2e.default_plan(device, quick=True)
        plan.steps, plan.warmup_steps = 2, 1
    plan.__post_init__()
    return plan


def _bnb_available() -> tuple[bool, str]:

    return provider_status("bnb_peft")


def _bench_unit(ctx: Context) -> dict[str, Any]:

    plan = plan_for(ctx)
    rows, notes, curves = e2e.run(plan, torch.device(ctx.device), (), lambda line: None)

    add_ratios(rows)
    bad = [r for r in rows if r["status"] in ("error", "oom")]
    res: dict[str, Any] = {
        "status": "pass",
        "rows": rows,
        "info": {"notes": notes, "loss_curves": curves},
    }
    if bad:
        res["status"] = "error"
        res["message"] = (
            f"{bad[0]['provider']} {bad[0]['metric']}: {bad[0]['status']} {bad[0]['note']}"
        )
    return res


def _native_unit(ctx: Context) -> dict[str, Any]:
    """trilora alone (no bitsandbytes): its own loader, the same model and plan."""

    plan = plan_for(ctx)
    device = torch.device(ctx.device)
    case = f"{plan.preset}/b{plan.batch}xs{plan.seq_len}/r{plan.rank}"
    params = dict(
        model=plan.preset,
        rank=plan.rank,
        batch=plan.batch,
        seq_len=plan.seq_len,
        tokens=plan.batch * plan.seq_len,
        dtype=str(plan.dtype).removeprefix("torch."),
    )
    with tempfile.TemporaryDirectory(prefix="trilora-selfcheck-") as tmp:
        path = build_checkpoint(plan, Path(tmp) / "model")
        reset_peak_memory(device)
        model = from_pretrained(path, compute_dtype=plan.dtype, device=device, dtype=plan.dtype)
        lcfg = LoraConfig(
            r=plan.rank,
            lora_alpha=plan.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(TARGET_MODULES),
            task_type="CAUSAL_LM",
        )
        with seeded(plan.seed + 1):
            pm = get_peft_model(model, lcfg)
        if plan.grad_ckpt:
            enable_checkpointing(pm)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=plan.lr)
        vocab = pm.config.vocab_size
        with seeded(plan.seed + 2):
            batches = [
                torch.randint(0, vocab, (plan.batch, plan.seq_len)).to(device) for _ in range(2)
            ]
        pm.train()
        times, losses = [], []
        for i in range(plan.warmup_steps + plan.steps):
            ids = batches[i % 2]
            synchronize(device)
            t = time.perf_counter()
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - t)
        peak = peak_memory_bytes(device) if ctx.gpu else None
    stats = Stats.of(times[plan.warmup_steps :])
    tokens = plan.batch * plan.seq_len
    note = (
        f"trilora.from_pretrained + trilora.get_peft_model; torch AdamW; {plan.steps} timed steps"
    )
    rows = [
        make_row(LEVEL, case, "step_time", "trilora", "s", stats, note=note, **params),
        make_row(
            LEVEL,
            case,
            "tokens_per_s",
            "trilora",
            "tok/s",
            Stats(tokens / stats.median, tokens / stats.p80, tokens / stats.p20, stats.repeats),
            note=note,
            **params,
        ),
        make_row(
            LEVEL,
            case,
            "loss_final",
            "trilora",
            "loss",
            Stats(losses[-1], losses[-1], losses[-1], 1),
            note=f"first {losses[0]:.4f}",
            **params,
        ),
    ]
    if peak is not None:
        rows.append(
            make_row(
                LEVEL,
                case,
                "peak_mem",
                "trilora",
                "bytes",
                Stats(peak, peak, peak, 1),
                note="torch.cuda.max_memory_allocated from loading through the last step",
                **params,
            )
        )
    why = _bnb_available()[1]
    return {
        "status": "pass",
        "rows": rows,
        "info": {
            "loss_curves": {"trilora": losses},
            "notes": [f"{why}: trilora alone (carry the bitsandbytes wheel, docs/gpu-check.md)"],
        },
    }


def _run(ctx: Context) -> dict[str, Any]:
    return _bench_unit(ctx) if _bnb_available()[0] else _native_unit(ctx)


def _moe_unit(ctx: Context) -> dict[str, Any]:
    """The bench's MoE level: Qwen3-30B-A3B's layer shapes on the GPU (4 of its layers),
    trilora against bitsandbytes + PEFT (target_parameters) when bitsandbytes imports."""
    from trilora.bench import moe

    if not ctx.gpu:
        return {
            "status": "skipped",
            "message": "GPU only; on the CPU tests/bench/test_moe_level.py runs the level",
        }
    device = torch.device(ctx.device)
    plan = moe.default_plan(device, quick=False)
    plan.steps, plan.warmup_steps = 4, 1
    plan.__post_init__()
    disabled = () if _bnb_available()[0] else ("bnb_peft",)
    rows, notes = moe.run(plan, device, disabled, lambda line: None)
    add_ratios(rows)
    bad = [r for r in rows if r["status"] in ("error", "oom")]
    res: dict[str, Any] = {"status": "pass", "rows": rows, "info": {"notes": notes}}
    if bad:
        res["status"] = "error"
        res["message"] = (
            f"{bad[0]['provider']} {bad[0]['metric']}: {bad[0]['status']} {bad[0]['note']}"
        )
    return res


def units(ctx: Context) -> list[Unit]:
    return [
        Unit(
            "e2e",
            _run,
            kernel="training step",
            config="r16, gradient checkpointing; trilora.patch vs bitsandbytes + PEFT "
            "(trilora alone when bitsandbytes is missing)",
            shape="1b, batch 1 x 2048 tokens" if ctx.gpu else "tiny (CPU plan)",
            dtype="bf16" if ctx.gpu else "fp32",
            min_s=30.0 if ctx.gpu else 0.0,
        ),
        Unit(
            "moe",
            _moe_unit,
            kernel="MoE training step",
            config="r16 on all linears and the experts; trilora vs bitsandbytes + PEFT "
            "(target_parameters, 16-bit experts)",
            shape="qwen3-30b-a3b layer shapes, 4 layers" if ctx.gpu else "GPU only",
            dtype="bf16",
            min_s=30.0 if ctx.gpu else 0.0,
        ),
    ]


__all__ = ["plan_for", "units"]
