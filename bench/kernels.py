"""Kernel level: 4-bit quantize/dequantize and the QLoRA linear at real projection shapes.

Providers of the QLoRA linear (one frozen 4-bit projection + a rank-``r`` LoRA adapter):

* ``trilora``: :class:`trilora.QLoraLinear` (fused Triton kernels on CUDA; the torch
  reference on CPU).
* ``bnb_peft``: ``bitsandbytes.nn.Linear4bit`` (NF4, double quantization) wrapped by PEFT
  LoRA, the stack a QLoRA user runs today.
* ``bf16_peft``: a float ``nn.Linear`` wrapped by PEFT LoRA: no dequantization at all, the
  speed-of-light a 4-bit layer can only approach.

Each is timed for ``fwd``, ``bwd`` and ``fwd_bwd`` (autograd on, as in training; the input
requires grad, as every layer but the first does in a model). Quantize/dequantize
throughput compares :func:`trilora.quantize` with ``bitsandbytes.functional``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from trilora.bench.harness import (
    Outcome,
    Stats,
    cache_bytes,
    guarded,
    make_row,
    measure,
    measure_interleaved,
    peak_memory_bytes,
    provider_status,
    reset_peak_memory,
    seeded,
)
from trilora.bench.roofline import DevicePeaks
from trilora.nn import QLoraLinear
from trilora.ops.rms_norm import rms_norm
from trilora.quant import quantize

LEVEL = "kernels"
LAYER_PROVIDERS = ("trilora", "bnb_peft", "bf16_peft")
QUANT_PROVIDERS = ("trilora", "bnb")
METRICS = ("fwd", "bwd", "fwd_bwd")
BLOCKSIZE = 64

# Published configurations (config.json of meta-llama/Llama-3.1-8B and Qwen/Qwen2.5-7B).
MODELS: dict[str, dict[str, int | bool]] = {
    "llama-3.1-8b": dict(
        hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, qkv_bias=False
    ),
    "qwen2.5-7b": dict(
        hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, qkv_bias=True
    ),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerShape:
    """One projection: ``out x in`` = ``n_out x k_in``."""

    model: str
    layer: str
    n_out: int
    k_in: int
    bias: bool = False


def projection_shapes(
    model: str, scale: int = 1, layers: tuple[str, ...] = PROJECTIONS
) -> list[LayerShape]:
    """The projections of ``model`` (a key of :data:`MODELS`), every dimension divided by
    ``scale`` (CPU runs use scaled-down shapes)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid models: {list(MODELS)}")
    unknown = set(layers) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown projection(s) {sorted(unknown)}; valid: {list(PROJECTIONS)}")
    c = MODELS[model]
    h, i = int(c["hidden"]) // scale, int(c["intermediate"]) // scale
    q, kv = (
        int(c["heads"]) * int(c["head_dim"]) // scale,
        int(c["kv_heads"]) * int(c["head_dim"]) // scale,
    )
    bias = bool(c["qkv_bias"])
    dims = {
        "q_proj": (q, h, bias),
        "k_proj": (kv, h, bias),
        "v_proj": (kv, h, bias),
        "o_proj": (h, q, False),
        "gate_proj": (i, h, False),
        "up_proj": (i, h, False),
        "down_proj": (h, i, False),
    }
    name = model if scale == 1 else f"{model}/{scale}"
    return [LayerShape(name, layer, *dims[layer]) for layer in layers]


@dataclass
class KernelPlan:
    """What the kernel level runs."""

    shapes: list[LayerShape]
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    quant_shapes: list[LayerShape]
    dtype: torch.dtype
    budget_s: float = 0.5
    repeats: int = 100
    warmup: int = 3
    max_sets: int = 16
    providers: tuple[str, ...] = LAYER_PROVIDERS
    notes: list[str] = field(default_factory=list)


def default_plan(device: torch.device, quick: bool) -> KernelPlan:
    """The GPU plan is the full issue matrix; the CPU plans are scaled down to fit its time limit."""
    if device.type == "cuda":
        shapes = [s for m in MODELS for s in projection_shapes(m)]
        return KernelPlan(
            shapes=shapes
            if not quick
            else projection_shapes("llama-3.1-8b", 1, ("q_proj", "down_proj")),
            ranks=(16, 64) if not quick else (16,),
            tokens=(1, 4, 16, 512, 4096, 16384) if not quick else (1, 16, 4096),
            quant_shapes=[projection_shapes(m, 1, ("down_proj",))[0] for m in MODELS],
            dtype=torch.bfloat16,
            budget_s=1.0 if not quick else 0.2,
            max_sets=16,
        )
    # CPU: fp32 compute (bf16 matmul is not the fast path on most CPUs), dimensions divided
    # by 4 (8 in quick mode), and projections whose shape repeats another (v = k, up = gate)
    # left out, since they would only measure the same thing twice.
    distinct = ("q_proj", "k_proj", "gate_proj", "down_proj")
    note = (
        "CPU plan (smaller than the GPU plan): Llama-3.1-8B dimensions scaled down, one model, "
        "v_proj/o_proj/up_proj omitted (same shapes as k_proj/q_proj/gate_proj), fp32 compute"
    )
    if quick:
        return KernelPlan(
            shapes=projection_shapes("llama-3.1-8b", 8, distinct),
            ranks=(16,),
            tokens=(1, 16, 128),
            quant_shapes=projection_shapes("llama-3.1-8b", 8, ("down_proj",)),
            dtype=torch.float32,
            budget_s=0.08,
            repeats=20,
            warmup=2,
            max_sets=2,
            notes=[note],
        )
    return KernelPlan(
        shapes=projection_shapes("llama-3.1-8b", 4, distinct),
        ranks=(16, 64),
        tokens=(1, 16, 256),
        quant_shapes=projection_shapes("llama-3.1-8b", 4, ("down_proj",)),
        dtype=torch.float32,
        budget_s=0.15,
        repeats=40,
        warmup=1,
        max_sets=2,
        notes=[note],
    )


# --- analytical floors ------------------------------------------------------------------


def weight_bytes(n_out: int, k_in: int, provider: str, dtype: torch.dtype) -> float:
    """Bytes of the base weight a provider must read: 4-bit codes plus one uint8 absmax per
    block (double quantization) for the 4-bit providers; the float weight for ``bf16_peft``."""
    n = n_out * k_in
    if provider == "bf16_peft":
        return n * _itemsize(dtype)
    return n / 2 + n / BLOCKSIZE


def layer_cost(
    metric: str, m: int, n_out: int, k_in: int, r: int, provider: str, dtype: torch.dtype
) -> tuple[float, float]:
    """``(bytes, flops)`` an ideal implementation moves/does for one call of ``metric``.

    Forward: base GEMM ``2MNK`` plus the LoRA pair ``2Mr(K+N)``; reads the weight, ``x``
    and the factors, writes ``y``. Backward: ``dx = dy W`` (``2MNK``) plus ``dy B``,
    ``(dy B) A``, ``dA`` and ``dB`` (``4Mr(K+N)``); reads the weight, ``dy``, ``x``, ``xa``
    and the factors, writes ``dx`` and the two factor gradients.
    """
    e = _itemsize(dtype)
    w = weight_bytes(n_out, k_in, provider, dtype)
    lora = r * (k_in + n_out) * 4
    fwd = (
        w + m * k_in * e + m * n_out * e + lora + m * r * 4,
        2 * m * n_out * k_in + 2 * m * r * (k_in + n_out),
    )
    bwd = (
        w + m * n_out * e + 2 * m * k_in * e + m * r * 4 + 2 * lora,
        2 * m * n_out * k_in + 4 * m * r * (k_in + n_out),
    )
    if metric == "fwd":
        return fwd
    if metric == "bwd":
        return bwd
    if metric == "fwd_bwd":
        return fwd[0] + bwd[0], fwd[1] + bwd[1]
    raise ValueError(f"unknown metric {metric!r}; valid: {METRICS}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- providers --------------------------------------------------------------------------


class _Holder(nn.Module):
    """A one-layer model so that PEFT can wrap a single projection by name."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _float_linear(
    shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int
) -> nn.Linear:
    with seeded(seed):
        lin = nn.Linear(shape.k_in, shape.n_out, bias=shape.bias, device=device, dtype=dtype)
        nn.init.normal_(lin.weight, std=0.02)
    return lin.requires_grad_(False)


def _peft_wrap(base: nn.Module, r: int) -> nn.Module:

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"], bias="none")
    return get_peft_model(_Holder(base), cfg)


def build_layer(
    provider: str,
    shape: LayerShape,
    r: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> nn.Module:
    """One QLoRA projection of ``provider`` with the same float weight for every provider
    (same ``seed``), LoRA alpha ``2r``, fp32 LoRA factors, and a non-zero ``lora_B`` so the
    adapter's math is not trivially zero."""
    lin = _float_linear(shape, dtype, device, seed)
    if provider == "trilora":
        layer: nn.Module = QLoraLinear.from_linear(
            lin,
            r=r,
            lora_alpha=2 * r,
            blocksize=BLOCKSIZE,
            compute_dtype=dtype,
            lora_dtype=torch.float32,
        )
    elif provider == "bnb_peft":
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(
            shape.k_in,
            shape.n_out,
            bias=shape.bias,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        base.weight = bnb.nn.Params4bit(
            lin.weight.data.clone(),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=True,
            blocksize=BLOCKSIZE,
        )
        if shape.bias:
            base.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        # Moving a Params4bit to its device is what quantizes it (also on CPU).
        base = base.to(device)
        layer = _peft_wrap(base, r)
    elif provider == "bf16_peft":
        layer = _peft_wrap(lin, r)
    else:
        raise ValueError(f"unknown provider {provider!r}; valid: {LAYER_PROVIDERS}")
    with seeded(seed + 1), torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad and ("lora_B" in name):
                p.normal_(std=0.02)
    layer.train()
    return layer


def _trainable(layer: nn.Module) -> list[torch.Tensor]:
    return [p for p in layer.parameters() if p.requires_grad]


# --- running ----------------------------------------------------------------------------

Log = Callable[[str], None]


def _case_name(shape: LayerShape, r: int, m: int) -> str:
    return f"{shape.model}/{shape.layer}/r{r}/M{m}"


def _quant_case(shape: LayerShape, op: str) -> str:
    return f"{shape.model}/{shape.layer}/{op}"


class _Prepared:
    """One provider's layers and inputs at one M, with a timing callable per metric."""

    def __init__(
        self,
        layers: list[nn.Module],
        m: int,
        shape: LayerShape,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers = layers
        self.n = len(layers)
        with seeded(1234 + m):
            self.xs = [
                torch.randn(m, shape.k_in, device=device, dtype=dtype).requires_grad_(True)
                for _ in layers
            ]
            self.dys = [torch.randn(m, shape.n_out, device=device, dtype=dtype) for _ in layers]
        self.params = [_trainable(layer) for layer in layers]
        self.ys: list[torch.Tensor] | None = None

    def clear(self, j: int) -> None:
        self.xs[j].grad = None
        for p in self.params[j]:
            p.grad = None

    def fwd(self, i: int) -> None:
        j = i % self.n
        self.layers[j](self.xs[j])

    def fwd_bwd(self, i: int) -> None:
        j = i % self.n
        self.clear(j)
        self.layers[j](self.xs[j]).backward(self.dys[j])

    def bwd(self, i: int) -> None:
        # Backward alone: one graph per set, built once and replayed with retain_graph.
        if self.ys is None:
            self.ys = [self.layers[j](self.xs[j]) for j in range(self.n)]
        j = i % self.n
        self.clear(j)
        self.ys[j].backward(self.dys[j], retain_graph=True)

    def fn(self, metric: str) -> Callable[[int], None]:
        return {"fwd": self.fwd, "bwd": self.bwd, "fwd_bwd": self.fwd_bwd}[metric]

    def peak_fwd_bwd(self, device: torch.device) -> float:
        """Peak bytes allocated above the resting state during one fwd+bwd (CUDA)."""
        self.ys = None
        self.clear(0)
        reset_peak_memory(device)
        base = torch.cuda.memory_allocated(device)
        self.layers[0](self.xs[0]).backward(self.dys[0])
        return float(peak_memory_bytes(device) - base)


def run_shape(
    shape: LayerShape,
    r: int,
    providers: list[str],
    plan: KernelPlan,
    device: torch.device,
    peaks: DevicePeaks | None,
) -> list[dict]:
    """All rows of one (shape, r): every provider, M and metric, plus peak memory on CUDA.

    The providers are timed interleaved (:func:`measure_interleaved`), so their ratios hold
    even on a machine whose load changes during the run.
    """
    rows: list[dict] = []
    params = dict(
        model=shape.model,
        layer=shape.layer,
        n_out=shape.n_out,
        k_in=shape.k_in,
        rank=r,
        dtype=str(plan.dtype).removeprefix("torch."),
    )
    e = _itemsize(plan.dtype)

    def fail(provider: str, m: int, metrics, outcome: Outcome, what: str) -> None:
        for metric in metrics:
            rows.append(
                make_row(
                    LEVEL,
                    _case_name(shape, r, m),
                    metric,
                    provider,
                    "s",
                    status=outcome.status,
                    note=f"{what}: {outcome.note}",
                    tokens=m,
                    **params,
                )
            )

    # Rotate through enough (layer, input) sets that one pass over them exceeds twice the
    # last-level cache: a small projection would otherwise be timed from a hot cache.
    built: dict[str, list[nn.Module]] = {}
    for provider in providers:
        w_bytes = weight_bytes(shape.n_out, shape.k_in, provider, plan.dtype)
        sets = min(plan.max_sets, max(1, math.ceil(2 * cache_bytes(device) / w_bytes)))
        out = guarded(
            lambda p=provider, sets=sets: [
                build_layer(p, shape, r, plan.dtype, device, seed=0) for _ in range(sets)
            ],
            device,
        )
        if out.status == "ok":
            built[provider] = out.value
        else:
            for m in plan.tokens:
                fail(provider, m, METRICS, out, "building the layer failed")
    kw = dict(warmup=plan.warmup, repeats=plan.repeats, budget_s=plan.budget_s)
    for m in plan.tokens:
        prepared: dict[str, _Prepared] = {}
        for provider, layers in built.items():
            w_bytes = weight_bytes(shape.n_out, shape.k_in, provider, plan.dtype)
            io_bytes = m * (shape.k_in + shape.n_out) * e
            n_sets = min(
                len(layers), max(1, math.ceil(2 * cache_bytes(device) / (w_bytes + io_bytes)))
            )
            out = guarded(
                lambda layers=layers, n_sets=n_sets, m=m: _Prepared(
                    layers[:n_sets], m, shape, plan.dtype, device
                ),
                device,
            )
            if out.status == "ok":
                prepared[provider] = out.value
            else:
                fail(provider, m, METRICS, out, "allocating inputs failed")
        case = _case_name(shape, r, m)
        for metric in METRICS:
            fns = {p: prep.fn(metric) for p, prep in prepared.items()}
            together = guarded(lambda fns=fns: measure_interleaved(fns, device, **kw), device)
            if together.status == "ok":
                results = {p: Outcome("ok", st) for p, st in together.value.items()}
            else:
                # Find out which provider failed (e.g. which one ran out of memory).
                results = {
                    p: guarded(lambda f=f: measure(f, device, **kw), device) for p, f in fns.items()
                }
            for provider, res in results.items():
                if res.status != "ok":
                    fail(provider, m, (metric,), res, "timing failed")
                    continue
                stats = res.value
                row = make_row(LEVEL, case, metric, provider, "s", stats, tokens=m, **params)
                if peaks is not None:
                    nbytes, flops = layer_cost(
                        metric, m, shape.n_out, shape.k_in, r, provider, plan.dtype
                    )
                    floor = peaks.floor_s(nbytes, flops)
                    row.update(floor=floor, floor_frac=floor / stats.median)
                rows.append(row)
        if device.type == "cuda":
            for provider, prep in prepared.items():
                out = guarded(lambda prep=prep: prep.peak_fwd_bwd(device), device)
                stats = Stats(out.value, out.value, out.value, 1) if out.status == "ok" else None
                note = (
                    out.note
                    or "torch.cuda.max_memory_allocated over one fwd+bwd, stats reset before"
                )
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "peak_mem",
                        provider,
                        "bytes",
                        stats,
                        status=out.status,
                        note=note,
                        tokens=m,
                        **params,
                    )
                )
        del prepared
    del built
    return rows


def run_quant_cases(
    plan: KernelPlan,
    device: torch.device,
    peaks: DevicePeaks | None,
    disabled: tuple[str, ...],
    log: Log,
) -> list[dict]:
    """Quantize and dequantize throughput: trilora against ``bitsandbytes.functional``."""
    rows: list[dict] = []
    for shape in plan.quant_shapes:
        params = dict(
            model=shape.model,
            layer=shape.layer,
            n_out=shape.n_out,
            k_in=shape.k_in,
            dtype=str(plan.dtype).removeprefix("torch."),
        )
        n = shape.n_out * shape.k_in
        e = _itemsize(plan.dtype)
        packed_bytes = n / 2 + n / BLOCKSIZE
        costs = {"quantize": n * e + packed_bytes, "dequantize": packed_bytes + n * e}
        for provider in QUANT_PROVIDERS:
            ok, why = provider_status("bnb_peft" if provider == "bnb" else provider, disabled)
            if provider == "bnb" and not ok:
                ok, why = _bnb_only_status(disabled)
            if not ok:
                for op in costs:
                    rows.append(
                        make_row(
                            LEVEL,
                            _quant_case(shape, op),
                            "time",
                            provider,
                            "s",
                            status="skipped",
                            note=why,
                            **params,
                        )
                    )
                continue
            log(f"  {provider} quantize/dequantize {shape.n_out}x{shape.k_in}")
            outcome = guarded(
                lambda provider=provider, shape=shape: _time_quant(provider, shape, plan, device),
                device,
            )
            for op, nbytes in costs.items():
                case = _quant_case(shape, op)
                if outcome.status != "ok":
                    rows.append(
                        make_row(
                            LEVEL,
                            case,
                            "time",
                            provider,
                            "s",
                            status=outcome.status,
                            note=outcome.note,
                            **params,
                        )
                    )
                    continue
                stats = outcome.value[op]
                rows.append(_memory_bound_time_row(case, provider, stats, nbytes, peaks, **params))
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "throughput",
                        provider,
                        "GB/s",
                        _rate(stats, nbytes / 1e9),
                        note="bytes moved / time",
                        **params,
                    )
                )
    return rows


def run_norm_cases(
    plan: KernelPlan,
    device: torch.device,
    peaks: DevicePeaks | None,
    disabled: tuple[str, ...],
    log: Log,
) -> list[dict]:
    """RMSNorm forward + backward at the plan's largest token count: trilora's op against the
    transformers ``LlamaRMSNorm`` that bitsandbytes + PEFT runs (provider ``bnb_peft``).

    Rows: ``time`` (s) and, on CUDA, ``peak_mem`` (bytes above the inputs), which is what
    the op is for: eager autograd keeps fp32 copies of the rows for backward.
    """

    rows: list[dict] = []
    m = max(plan.tokens)
    hidden = {s.model: s.k_in for s in plan.shapes if s.layer == "q_proj"}
    for model, h in hidden.items():
        case = f"{model}/rms_norm/M{m}"
        params = dict(
            model=model,
            layer="rms_norm",
            k_in=h,
            tokens=m,
            dtype=str(plan.dtype).removeprefix("torch."),
        )
        # forward reads x, writes y; backward reads dy and x, writes dx
        nbytes = 5 * m * h * _itemsize(plan.dtype)
        norm = LlamaRMSNorm(h, eps=1e-5).to(device=device, dtype=plan.dtype)
        norm.weight.requires_grad_(False)  # frozen, as in QLoRA
        fns = {
            "trilora": lambda x, norm=norm: rms_norm(x, norm.weight, norm.variance_epsilon),
            "bnb_peft": norm,
        }
        for provider, fn in fns.items():
            if provider not in plan.providers:
                continue
            ok, why = provider_status(provider, disabled)
            if not ok:
                rows.append(
                    make_row(
                        LEVEL, case, "time", provider, "s", status="skipped", note=why, **params
                    )
                )
                continue
            log(f"  {provider} rms_norm {m}x{h}")
            outcome = guarded(lambda fn=fn, h=h: _time_norm(fn, m, h, plan, device), device)
            if outcome.status != "ok":
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "time",
                        provider,
                        "s",
                        status=outcome.status,
                        note=outcome.note,
                        **params,
                    )
                )
                continue
            stats, peak = outcome.value
            rows.append(
                _memory_bound_time_row(
                    case, provider, stats, nbytes, peaks, note="forward + backward", **params
                )
            )
            if peak is not None:
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "peak_mem",
                        provider,
                        "bytes",
                        Stats(peak, peak, peak, 1),
                        note="forward + backward, above the inputs",
                        **params,
                    )
                )
    return rows


def _time_norm(fn, m: int, h: int, plan: KernelPlan, device: torch.device):
    with seeded(11):
        xs = [torch.randn(m, h, device=device, dtype=plan.dtype).requires_grad_() for _ in range(2)]
        dy = torch.randn(m, h, device=device, dtype=plan.dtype)

    def step(i: int) -> None:
        x = xs[i % 2]
        x.grad = None
        fn(x).backward(dy)

    stats = measure(step, device, warmup=plan.warmup, repeats=plan.repeats, budget_s=plan.budget_s)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(0)
        torch.cuda.synchronize(device)
        peak = float(torch.cuda.max_memory_allocated(device) - base)
    return stats, peak


def _memory_bound_time_row(
    case: str, provider: str, stats, nbytes: float, peaks: DevicePeaks | None, **params
) -> dict:
    """A ``time`` row with its bandwidth floor (``nbytes`` moved, no FLOPs counted)."""
    row = make_row(LEVEL, case, "time", provider, "s", stats, **params)
    if peaks is not None:
        floor = peaks.floor_s(nbytes, 0.0)
        row.update(floor=floor, floor_frac=floor / stats.median)
    return row


def _bnb_only_status(disabled: tuple[str, ...]) -> tuple[bool, str]:
    # The quantizer baseline needs bitsandbytes only, not PEFT.
    if "bnb_peft" in disabled or "bnb" in disabled:
        return False, "bnb skipped: disabled with --skip-provider"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return False, f"bnb skipped: cannot import bitsandbytes ({type(exc).__name__}: {exc})"
    return True, ""


def _rate(stats, amount: float):
    # The 20th percentile of time is the 80th of the rate and vice versa.
    return Stats(amount / stats.median, amount / stats.p80, amount / stats.p20, stats.repeats)


def _time_quant(provider: str, shape: LayerShape, plan: KernelPlan, device: torch.device) -> dict:
    with seeded(7):
        ws = [
            torch.randn(shape.n_out, shape.k_in, device=device, dtype=plan.dtype) * 0.02
            for _ in range(2)
        ]
    kw = dict(warmup=plan.warmup, repeats=plan.repeats, budget_s=plan.budget_s)
    if provider == "trilora":
        qws = [quantize(w, "nf4", BLOCKSIZE, True) for w in ws]
        return {
            "quantize": measure(
                lambda i: quantize(ws[i % 2], "nf4", BLOCKSIZE, True), device, **kw
            ),
            "dequantize": measure(lambda i: qws[i % 2].dequantize(plan.dtype), device, **kw),
        }
    import bitsandbytes.functional as bf

    def q(i: int):
        return bf.quantize_4bit(
            ws[i % 2], blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )

    qs = [q(i) for i in range(2)]
    return {
        "quantize": measure(q, device, **kw),
        "dequantize": measure(
            lambda i: bf.dequantize_4bit(qs[i % 2][0], qs[i % 2][1]), device, **kw
        ),
    }


def run(
    plan: KernelPlan,
    device: torch.device,
    peaks: DevicePeaks | None,
    disabled: tuple[str, ...] = (),
    log: Log = print,
) -> tuple[list[dict], list[str]]:
    """Run the kernel level; returns ``(rows, notes)``."""
    notes = list(plan.notes)
    rows = run_quant_cases(plan, device, peaks, disabled, log)
    rows += run_norm_cases(plan, device, peaks, disabled, log)
    available: list[str] = []
    for provider in plan.providers:
        ok, why = provider_status(provider, disabled)
        if ok:
            available.append(provider)
        else:
            notes.append(why)
    for shape in plan.shapes:
        for r in plan.ranks:
            for provider in plan.providers:
                if provider in available:
                    continue
                for m in plan.tokens:
                    for metric in METRICS:
                        rows.append(
                            make_row(
                                LEVEL,
                                _case_name(shape, r, m),
                                metric,
                                provider,
                                "s",
                                status="skipped",
                                note=provider_status(provider, disabled)[1],
                                model=shape.model,
                                layer=shape.layer,
                                n_out=shape.n_out,
                                k_in=shape.k_in,
                                rank=r,
                                tokens=m,
                            )
                        )
            log(
                f"  {shape.model} {shape.layer} {shape.n_out}x{shape.k_in} r={r}: {', '.join(available)}"
            )
            rows.extend(run_shape(shape, r, available, plan, device, peaks))
    return rows, notes


__all__ = [
    "LAYER_PROVIDERS",
    "MODELS",
    "PROJECTIONS",
    "KernelPlan",
    "LayerShape",
    "build_layer",
    "default_plan",
    "layer_cost",
    "projection_shapes",
    "run",
]
