"""Optimizer level: step time and state memory of AdamW variants on LoRA-sized parameters.

The parameters are the LoRA factors of Llama-3.1-8B at r=32 on every linear layer (83.9M
fp32 elements in 448 tensors) on a GPU; on a CPU the same layout with dimensions divided by
8 and fewer layers. Each provider steps the same parameters with the same gradients:

* ``torch_fused``: ``torch.optim.AdamW(fused=True)`` (torch's fused kernel, CPU or CUDA);
* ``bnb_paged_8bit``: ``bitsandbytes.optim.PagedAdamW8bit`` (on a CPU bitsandbytes does not
  page: the row measures its unpaged 8-bit CPU path and says so);
* ``trilora_32`` / ``trilora_8``: :class:`trilora.optim.AdamW` with state resident;
* ``trilora_32_host`` / ``trilora_8_host``: state in pinned host memory streamed through two
  device page buffers; ``trilora_32_uvm`` / ``trilora_8_uvm``: CUDA managed memory;
* ``trilora_cpu_offload``: :class:`trilora.optim.CPUOffloadAdamW` (update on the CPU).

Metrics: ``step_time`` (seconds per ``optimizer.step()``, gradients in place), and
``state_device`` / ``state_host`` (bytes of optimizer state, plus page buffers and host
masters/gradients where the optimizer keeps them). Case ``host_paging_cost``: extra seconds
per GiB of state that host paging adds to a step, ``(t_host - t_resident) / state GiB``, at
32 and 8 bits. Rows that need a GPU (paging, managed memory) are ``skipped`` with the note
``unmeasured: needs a CUDA GPU`` on a CPU run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trilora.bench.harness import Stats, guarded, make_row, measure_interleaved, provider_status
from trilora.optim import AdamW, CPUOffloadAdamW

LEVEL = "optim"
GPU_ONLY = ("trilora_32_host", "trilora_8_host", "trilora_32_uvm", "trilora_8_uvm")
PROVIDERS = (
    "torch_fused",
    "bnb_paged_8bit",
    "trilora_32",
    "trilora_8",
    *GPU_ONLY,
    "trilora_cpu_offload",
)
UNMEASURED = "unmeasured: needs a CUDA GPU"

# Llama-3.1-8B (config.json): hidden 4096, intermediate 14336, 8 KV heads of 128, 32 layers.
_PROJ = {
    "q": (4096, 4096),
    "k": (4096, 1024),
    "v": (4096, 1024),
    "o": (4096, 4096),
    "gate": (4096, 14336),
    "up": (4096, 14336),
    "down": (14336, 4096),
}


def lora_shapes(layers: int = 32, rank: int = 32, scale: int = 1) -> list[tuple[int, int]]:
    """Shapes of the LoRA factors ``A [r, in]`` and ``B [out, r]`` of every projection."""
    out = []
    for _ in range(layers):
        for d_in, d_out in _PROJ.values():
            out += [(rank, d_in // scale), (d_out // scale, rank)]
    return out


@dataclass
class OptimPlan:
    shapes: list[tuple[int, int]]
    case: str
    budget_s: float
    repeats: int
    notes: list[str] = field(default_factory=list)


def default_plan(device: torch.device, quick: bool) -> OptimPlan:
    """Full LoRA of Llama-3.1-8B r=32 on a GPU; on a CPU dimensions / 8 and 2 (quick: 1) layers."""
    if device.type == "cuda":
        layers = 4 if quick else 32
        return OptimPlan(
            lora_shapes(layers),
            f"llama-3.1-8b-lora-r32-{layers}layers",
            0.5 if quick else 3.0,
            20 if quick else 50,
        )
    layers = 1 if quick else 2
    return OptimPlan(
        lora_shapes(layers, scale=8),
        f"llama-3.1-8b-lora-r32-{layers}layers-dim8",
        0.3 if quick else 2.0,
        5 if quick else 20,
        [
            "optim level on CPU: Llama-3.1-8B LoRA shapes with dimensions divided by 8; paging "
            "rows need a GPU and are unmeasured"
        ],
    )


def _state_bytes(opt, device: torch.device) -> tuple[int, int]:
    """(device, host) bytes of a torch-style optimizer's state tensors: "device" is where the
    parameters are (the CPU in a CPU run), as trilora's own accounting counts it."""
    dev = host = 0
    seen = set()  # bitsandbytes shares its quantization maps between parameters
    for entry in opt.state.values():
        for value in entry.values():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
            paged = getattr(value, "is_paged", False)  # bitsandbytes' managed tensors
            if value.device.type == device.type and not paged:
                dev += value.nbytes
            else:
                host += value.nbytes
    return dev, host


def _make(provider: str, params: list[torch.nn.Parameter]):

    hp = {"lr": 1e-4, "weight_decay": 0.01}
    if provider == "torch_fused":
        return torch.optim.AdamW(params, **hp, fused=True)
    if provider == "bnb_paged_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, **hp)
    if provider == "trilora_cpu_offload":
        return CPUOffloadAdamW(params, **hp)
    bits = 8 if "_8" in provider else 32
    paging = "host" if provider.endswith("_host") else "uvm" if provider.endswith("_uvm") else "off"
    return AdamW(params, **hp, state_bits=bits, paging=paging)


def _memory(provider: str, opt, device: torch.device) -> tuple[int, int]:
    if provider.startswith("trilora"):
        return opt.device_bytes, opt.host_bytes
    return _state_bytes(opt, device)


def run(
    plan: OptimPlan, device: torch.device, disabled=(), log: Callable[[str], None] = print
) -> tuple[list[dict], list[str]]:
    """Rows for every provider; returns ``(rows, notes)``."""
    rows: list[dict] = []
    notes = list(plan.notes)
    n = sum(math.prod(s) for s in plan.shapes)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.01 for s in plan.shapes]
    grads = [torch.randn(s, generator=gen).to(device) * 1e-3 for s in plan.shapes]
    extra = {"model": "llama-3.1-8b", "rank": 32, "dtype": "fp32"}
    bnb_ok, bnb_note = provider_status("bnb_peft", disabled)
    fns, opts = {}, {}
    for provider in PROVIDERS:
        if device.type != "cuda" and provider in GPU_ONLY:
            for metric, unit in (
                ("step_time", "s"),
                ("state_device", "bytes"),
                ("state_host", "bytes"),
            ):
                rows.append(
                    make_row(
                        LEVEL,
                        plan.case,
                        metric,
                        provider,
                        unit,
                        status="skipped",
                        note=UNMEASURED,
                        **extra,
                    )
                )
            continue
        if provider == "bnb_paged_8bit" and not bnb_ok:
            rows.append(
                make_row(
                    LEVEL,
                    plan.case,
                    "step_time",
                    provider,
                    "s",
                    status="skipped",
                    note=bnb_note,
                    **extra,
                )
            )
            continue
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]

        def prepare(provider=provider, params=params):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bnb on CPU: "paged optimizers not supported"
                opt = _make(provider, params)
                for p, g in zip(params, grads):
                    p.grad = g
                if provider == "trilora_cpu_offload":
                    opt.clip_grad_norm(math.inf)  # (no clipping; says it was considered)
                opt.step()  # allocates the state
            return opt

        out = guarded(prepare, device)
        if out.status != "ok":
            rows.append(
                make_row(
                    LEVEL,
                    plan.case,
                    "step_time",
                    provider,
                    "s",
                    status=out.status,
                    note=out.note,
                    **extra,
                )
            )
            continue
        opts[provider] = (out.value, params)

        def step(_i, opt=out.value, params=params):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()

        fns[provider] = step
    log(f"  optim: {len(fns)} providers, {n / 1e6:.1f}M parameters in {len(plan.shapes)} tensors")
    timed = guarded(
        lambda: measure_interleaved(
            fns, device, warmup=2, repeats=plan.repeats, min_repeats=3, budget_s=plan.budget_s
        ),
        device,
    )
    if timed.status != "ok":
        notes.append(f"optim level timing failed: {timed.note}")
        return rows, notes
    for provider, stats in timed.value.items():
        opt, _ = opts[provider]
        note = ""
        if provider == "bnb_paged_8bit" and device.type != "cuda":
            note = "bitsandbytes pages only on CUDA: its unpaged 8-bit CPU path"
        rows.append(
            make_row(LEVEL, plan.case, "step_time", provider, "s", stats, note=note, **extra)
        )
        dev, host = _memory(provider, opt, device)
        for metric, value in (("state_device", dev), ("state_host", host)):
            rows.append(
                make_row(
                    LEVEL,
                    plan.case,
                    metric,
                    provider,
                    "bytes",
                    Stats(value, value, value, 1),
                    note=note,
                    **extra,
                )
            )
    rows += _paging_cost(plan, timed.value, opts, device, extra)
    return rows, notes


def _paging_cost(plan, stats, opts, device, extra) -> list[dict]:
    rows = []
    for bits in (32, 8):
        resident, host = f"trilora_{bits}", f"trilora_{bits}_host"
        metric = f"s_per_GiB_{bits}bit"
        if device.type != "cuda" or resident not in stats or host not in stats:
            rows.append(
                make_row(
                    LEVEL,
                    "host_paging_cost",
                    metric,
                    "trilora",
                    "s/GiB",
                    status="skipped",
                    note=UNMEASURED,
                    **extra,
                )
            )
            continue
        gib = opts[host][0].host_memory()["state"] / 2**30
        value = (stats[host].median - stats[resident].median) / gib
        rows.append(
            make_row(
                LEVEL,
                "host_paging_cost",
                metric,
                "trilora",
                "s/GiB",
                Stats(value, value, value, 1),
                **extra,
            )
        )
    return rows


def report_lines(rows: list[dict]) -> list[str]:
    """Markdown table of this level's rows (for ``report.md``)."""
    mine = [r for r in rows if r["level"] == LEVEL]
    if not mine:
        return []
    out = [
        "",
        "## Optimizers (step time, state memory)",
        "",
        "| case | metric | provider | median | unit | status | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in mine:
        value = r["median"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        out.append(
            f"| {r['case']} | {r['metric']} | {r['provider']} | {shown} | {r['unit']} | "
            f"{r['status']} | {r['note'][:100]} |"
        )
    return out


__all__ = ["LEVEL", "PROVIDERS", "OptimPlan", "default_plan", "lora_shapes", "report_lines", "run"]
