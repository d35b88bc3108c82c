"""Speed section: a short ``trilora bench`` kernels plan, and the measured crossover of
``trilora.config.fused_max_tokens``.

Units, each writing ``trilora bench`` rows (level ``kernels``, the usual CSV schema):

1. ``device peaks``: copy bandwidth and bf16 matmul rate (:mod:`trilora.bench.roofline`),
   cached in ``OUT/device_peaks.json``; every later row gets its ``floor`` and ``floor_frac``
   (fraction of the roofline) from them.
2. ``quantize`` and ``rms_norm``: :func:`trilora.bench.kernels.run_quant_cases` and
   :func:`~trilora.bench.kernels.run_norm_cases`.
3. One unit per Llama-3.1-8B projection class (q, k, gate, down) at M = 1, 16, 512, 4096,
   r = 16, bf16: :func:`trilora.bench.kernels.run_shape`, i.e. trilora, bitsandbytes + PEFT
   (when it imports) and a bf16 ``nn.Linear`` + PEFT LoRA (the speed of light), timed
   interleaved for fwd, bwd and fwd+bwd, plus peak memory; ratios filled by
   :func:`trilora.bench.report.add_ratios`.
4. ``crossover`` for q_proj and gate_proj: trilora's fwd+bwd with the fused kernels forced
   (``fused_max_tokens`` huge) and with the dequantize-to-scratch + cuBLAS path forced
   (``fused_max_tokens = 0``) at M = 512 ... 8192, interleaved; the crossover is where the
   fused/scratch time ratio passes 1 (log-linear interpolation between the two M around it).
   ``config.py`` chose 2048 from a bytes/FLOPs model; this measures it.

On the CPU (tests only; ``trilora selfcheck`` without ``--gpu`` skips this section) the plan
shrinks to one scaled-down projection, fp32, a few repeats.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trilora.bench.harness import (
    environment,
    make_row,
    measure_interleaved,
    provider_status,
    seeded,
)
from trilora.bench.report import add_ratios
from trilora.bench.roofline import load_or_measure
from trilora.config import config, override
from trilora.selfcheck.units import Context, Unit

RANK = 16
CROSSOVER_TOKENS_GPU = (512, 1024, 2048, 4096, 8192)
CROSSOVER_TOKENS_CPU = (8, 32)
LEVEL = "kernels"


def plan_for(ctx: Context):
    """The :class:`trilora.bench.kernels.KernelPlan` of this section."""

    from trilora.bench.kernels import KernelPlan, projection_shapes

    if ctx.gpu:
        return KernelPlan(
            shapes=projection_shapes(
                "llama-3.1-8b", 1, ("q_proj", "k_proj", "gate_proj", "down_proj")
            ),
            ranks=(RANK,),
            tokens=(1, 16, 512, 4096),
            quant_shapes=projection_shapes("llama-3.1-8b", 1, ("down_proj",)),
            dtype=torch.bfloat16,
            budget_s=0.1,
            repeats=40,
            warmup=2,
            max_sets=8,
        )
    return KernelPlan(
        shapes=projection_shapes("llama-3.1-8b", 64, ("q_proj",)),
        ranks=(RANK,),
        tokens=(1, 16),
        quant_shapes=projection_shapes("llama-3.1-8b", 64, ("down_proj",)),
        dtype=torch.float32,
        budget_s=0.02,
        repeats=3,
        warmup=1,
        max_sets=1,
    )


def _device(ctx: Context):

    return torch.device(ctx.device)


def _peaks(ctx: Context):
    """Measured device peaks, shared by the units of one worker (reloaded from
    ``OUT/device_peaks.json`` after a restart)."""
    if "peaks" not in ctx.cache:
        name = environment(_device(ctx))["device"]
        peaks, measured_now = load_or_measure(ctx.out_dir, _device(ctx), name)
        ctx.cache["peaks"] = peaks
        ctx.cache["peaks_measured_now"] = measured_now
    return ctx.cache["peaks"]


def _rows_result(rows: list[dict], info: dict | None = None) -> dict[str, Any]:

    add_ratios(rows)
    bad = [r for r in rows if r["status"] in ("error", "oom")]
    res: dict[str, Any] = {"status": "pass", "rows": rows, "info": info or {}}
    if bad:
        r = bad[0]
        res["status"] = "error"
        res["message"] = (
            f"{len(bad)} of {len(rows)} rows failed; first: {r['case']} {r['metric']} "
            f"{r['provider']}: {r['status']} {r['note']}"
        )
    return res


def _peaks_unit(ctx: Context) -> dict[str, Any]:
    peaks = _peaks(ctx)
    info = dict(peaks.__dict__)
    info["measured_now"] = ctx.cache.get("peaks_measured_now", False)
    return {"status": "pass", "info": info}


def _available(disabled: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    from trilora.bench.kernels import LAYER_PROVIDERS

    available, notes = [], []
    for provider in LAYER_PROVIDERS:
        ok, why = provider_status(provider, disabled)
        (available if ok else notes).append(provider if ok else why)
    return available, notes


def _shape_unit(shape):
    def run(ctx: Context) -> dict[str, Any]:
        from trilora.bench.kernels import run_shape

        plan = plan_for(ctx)
        available, notes = _available()
        rows = run_shape(shape, RANK, available, plan, _device(ctx), _peaks(ctx))
        return _rows_result(rows, {"providers": available, "skipped_providers": notes})

    return run


def _quant_unit(ctx: Context) -> dict[str, Any]:
    from trilora.bench.kernels import run_quant_cases

    rows = run_quant_cases(plan_for(ctx), _device(ctx), _peaks(ctx), (), lambda _: None)
    return _rows_result(rows)


def _norm_unit(ctx: Context) -> dict[str, Any]:
    from trilora.bench.kernels import run_norm_cases

    rows = run_norm_cases(plan_for(ctx), _device(ctx), _peaks(ctx), (), lambda _: None)
    return _rows_result(rows)


def crossover_point(ratios: dict[int, float]) -> dict[str, Any]:
    """Where ``t_fused / t_scratch`` passes 1, from ``{M: ratio}``.

    Returns ``{"tokens": float}`` (interpolated linearly in log2 M between the last M where
    fused was at least as fast and the first where it was slower), or ``{"tokens": None,
    "bound": "below" | "above", "at": M}`` when the ratio is on one side everywhere.
    """
    ms = sorted(ratios)
    if not ms:
        return {"tokens": None, "bound": None, "at": None}
    prev = None
    for m in ms:
        r = ratios[m]
        if r > 1.0:
            if prev is None:
                return {"tokens": None, "bound": "below", "at": m}
            r0 = ratios[prev]
            t = (1.0 - r0) / (r - r0) if r != r0 else 0.5
            lo, hi = math.log2(prev), math.log2(m)
            return {"tokens": 2 ** (lo + t * (hi - lo))}
        prev = m
    return {"tokens": None, "bound": "above", "at": ms[-1]}


def _crossover_unit(shape):
    def run(ctx: Context) -> dict[str, Any]:

        from trilora.bench.kernels import build_layer, layer_cost

        plan = plan_for(ctx)
        device = _device(ctx)
        peaks = _peaks(ctx)
        layer = build_layer("trilora", shape, RANK, plan.dtype, device, seed=0)
        params = [p for p in layer.parameters() if p.requires_grad]
        tokens = CROSSOVER_TOKENS_GPU if ctx.gpu else CROSSOVER_TOKENS_CPU
        rows, ratios = [], {}
        dtype_name = str(plan.dtype).removeprefix("torch.")
        for m in tokens:
            with seeded(4321 + m):
                x = torch.randn(m, shape.k_in, device=device, dtype=plan.dtype).requires_grad_()
                dy = torch.randn(m, shape.n_out, device=device, dtype=plan.dtype)

            def step(limit: int, x=x, dy=dy):
                def fn(_i: int) -> None:
                    x.grad = None
                    for p in params:
                        p.grad = None
                    with override(fused_max_tokens=limit):
                        layer(x).backward(dy)

                return fn

            fns = {"trilora_fused": step(1 << 40), "trilora_scratch": step(0)}
            stats = measure_interleaved(
                fns, device, warmup=plan.warmup, repeats=plan.repeats, budget_s=plan.budget_s
            )
            case = f"{shape.model}/{shape.layer}/r{RANK}/M{m}/crossover"
            nbytes, flops = layer_cost(
                "fwd_bwd", m, shape.n_out, shape.k_in, RANK, "trilora", plan.dtype
            )
            floor = peaks.floor_s(nbytes, flops)
            for provider, st in stats.items():
                row = make_row(
                    LEVEL,
                    case,
                    "fwd_bwd",
                    provider,
                    "s",
                    st,
                    model=shape.model,
                    layer=shape.layer,
                    n_out=shape.n_out,
                    k_in=shape.k_in,
                    rank=RANK,
                    tokens=m,
                    dtype=dtype_name,
                    note="fused kernels forced"
                    if provider.endswith("fused")
                    else "dequantize-to-scratch + cuBLAS forced",
                )
                row.update(floor=floor, floor_frac=floor / st.median)
                rows.append(row)
            ratios[m] = stats["trilora_fused"].median / stats["trilora_scratch"].median
        info = {
            "ratios_fused_over_scratch": {str(m): r for m, r in ratios.items()},
            "configured_fused_max_tokens": config.fused_max_tokens,
            "layer": shape.layer,
            **{f"crossover_{k}": v for k, v in crossover_point(ratios).items()},
        }
        return _rows_result(rows, info)

    return run


def units(ctx: Context) -> list[Unit]:
    plan = plan_for(ctx)
    dtype = str(plan.dtype).removeprefix("torch.")
    tokens = ",".join(str(m) for m in plan.tokens)
    gpu_s = 3.0 if ctx.gpu else 0.0
    out = [
        Unit("device peaks", _peaks_unit, kernel="roofline", config="copy bandwidth, matmul rate"),
        Unit(
            "quantize",
            _quant_unit,
            kernel="quantize/dequantize",
            config="nf4,bs64,dq",
            shape=" ".join(f"{s.n_out}x{s.k_in}" for s in plan.quant_shapes),
            dtype=dtype,
        ),
        Unit(
            "rms_norm",
            _norm_unit,
            kernel="rms_norm",
            config="fwd+bwd",
            shape=f"M={max(plan.tokens)}",
            dtype=dtype,
        ),
    ]
    for shape in plan.shapes:
        out.append(
            Unit(
                f"qlora_linear {shape.layer}",
                _shape_unit(shape),
                kernel="qlora_linear",
                config=f"r{RANK},fwd/bwd/fwd_bwd vs bnb_peft and bf16_peft",
                shape=f"{shape.model} {shape.layer} N={shape.n_out} K={shape.k_in} M={tokens}",
                dtype=dtype,
                min_s=gpu_s,
            )
        )
    by_layer = {s.layer: s for s in plan.shapes}
    for layer in ("q_proj", "gate_proj"):
        if layer in by_layer:
            shape = by_layer[layer]
            ms = CROSSOVER_TOKENS_GPU if ctx.gpu else CROSSOVER_TOKENS_CPU
            out.append(
                Unit(
                    f"crossover {layer}",
                    _crossover_unit(shape),
                    kernel="qlora_linear",
                    config=f"r{RANK},fused vs scratch",
                    shape=f"{shape.model} {layer} N={shape.n_out} K={shape.k_in} M={','.join(map(str, ms))}",
                    dtype=dtype,
                    min_s=gpu_s,
                )
            )
    return out


__all__ = ["crossover_point", "plan_for", "units"]
