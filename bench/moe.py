"""MoE level: LoRA training steps of a mixture-of-experts model, and one experts layer.

Both providers start from one checkpoint (a seeded random Qwen3-MoE of :data:`SHAPES`, saved
with ``save_pretrained``; no model hub), the same ``LoraConfig`` (``target_modules=
"all-linear"``, which on a transformers-5 MoE also puts LoRA on every experts tensor through
PEFT's ``target_parameters``), the same token batches, torch AdamW and gradient
checkpointing (non-reentrant):

* ``bnb_peft``: transformers + ``BitsAndBytesConfig(load_in_4bit=True)`` (NF4, double
  quantization) + ``peft.get_peft_model``. bitsandbytes quantizes ``nn.Linear`` layers only,
  so the experts stay 16-bit (the compute dtype), and PEFT's ``ParamWrapper`` adds each
  expert LoRA by materializing ``W + scale * B @ A`` (``[E, out, in]``) in every forward.
  Experts run through transformers' default experts implementation.
* ``trilora``: ``trilora.from_pretrained(quant_type="nf4")`` (every expert matrix 4-bit too)
  + ``trilora.peft.get_peft_model``: the grouped LoRA op, no materialized delta.

Cases (:class:`MoEPlan`):

* ``step``: forward + backward + optimizer step. On a CPU the providers run interleaved in
  one process, step by step, rotating which goes first, and the note gives the median of
  per-step trilora / bnb_peft ratios (a shared machine's load falls on both alike). On CUDA
  they run one after the other and ``peak_mem`` is ``torch.cuda.max_memory_allocated``.
* ``peak_mem`` / ``step_mem`` on a CPU: each provider in a fresh process of its own (the same
  imports for both), reading the kernel's resident-set high-water mark (``VmHWM``):
  ``peak_mem`` from after the imports through loading and the steps, ``step_mem`` from the
  loaded model and optimizer (the mark reset) through the steps.
* ``experts_layer``: the first layer's experts module (with its LoRA wrappers) alone,
  forward + backward, on the step's token count with a fixed top-k routing (the same for
  both), timed interleaved (:func:`trilora.bench.harness.measure_interleaved`).

Shapes: ``cpu`` (hidden 512, 2 layers, 16 experts, top-2, moe_intermediate 512: the experts
hold ~90% of the model's matrix FLOPs), ``tiny`` (``--quick``), ``qwen3-30b-a3b`` (CUDA:
Qwen3-30B-A3B's layer shapes, hidden 2048, 128 experts, top-8, moe_intermediate 768, 32 heads,
4 KV heads, its vocabulary, 4 of its 48 layers).

Standalone memory child: ``python -m trilora.bench.moe --memory-child ...`` (what the level
runs per provider).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trilora.bench.harness import (
    Stats,
    guarded,
    loss_final_row,
    make_row,
    measure_interleaved,
    paired_ratio_note,
    peak_memory_bytes,
    provider_status,
    reset_peak_memory,
    seeded,
    synchronize,
    train_interleaved,
)

LEVEL = "moe"
PROVIDERS = ("trilora", "bnb_peft")


@dataclass(frozen=True)
class MoEShape:
    """A Qwen3-MoE model size: ``layers`` MoE layers of ``experts`` experts, ``top_k`` per
    token, each expert ``gate_up [2 * moe_intermediate, hidden]``, ``down [hidden,
    moe_intermediate]``."""

    hidden: int
    layers: int
    experts: int
    top_k: int
    moe_intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int


SHAPES: dict[str, MoEShape] = {
    "tiny": MoEShape(64, 2, 4, 2, 48, 256, 4, 2, 16),
    "cpu": MoEShape(512, 2, 16, 2, 512, 2048, 8, 4, 64),
    # config.json of Qwen/Qwen3-30B-A3B, 4 of its 48 layers
    "qwen3-30b-a3b": MoEShape(2048, 4, 128, 8, 768, 151936, 32, 4, 128),
}


@dataclass
class MoEPlan:
    """What the MoE level runs (see the module docstring)."""

    shape: str
    batch: int
    seq_len: int
    steps: int
    warmup_steps: int
    dtype: torch.dtype
    rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 1e-3
    grad_ckpt: bool = True
    interleave: bool = True
    # CPU: each provider's peak memory in a process of its own (two model loads more)
    memory: bool = True
    memory_steps: int = 2
    layer_repeats: int = 10
    n_batches: int = 2
    seed: int = 0
    providers: tuple[str, ...] = PROVIDERS
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown MoE shape {self.shape!r}; valid shapes: {list(SHAPES)}")
        if min(self.batch, self.seq_len, self.steps, self.rank) < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"batch, seq_len, steps and rank must be >= 1 and warmup_steps >= 0, got "
                f"{self.batch}, {self.seq_len}, {self.steps}, {self.rank}, {self.warmup_steps}"
            )

    @property
    def tokens(self) -> int:
        """Tokens per training step."""
        return self.batch * self.seq_len


def default_plan(device: torch.device, quick: bool) -> MoEPlan:
    """CUDA: Qwen3-30B-A3B layer shapes, 4 x 1024 tokens, bf16, sequential providers. CPU:
    the ``cpu`` shape, 4 x 256 tokens, fp32, interleaved; ``quick``: the ``tiny`` shape."""
    if device.type == "cuda":
        return MoEPlan(
            "tiny" if quick else "qwen3-30b-a3b",
            batch=2 if quick else 4,
            seq_len=128 if quick else 1024,
            steps=3 if quick else 10,
            warmup_steps=1 if quick else 2,
            dtype=torch.bfloat16,
            interleave=False,
            memory=False,
            layer_repeats=10 if quick else 20,
        )
    return MoEPlan(
        "tiny" if quick else "cpu",
        batch=2 if quick else 4,
        seq_len=64 if quick else 256,
        steps=3 if quick else 8,
        warmup_steps=1,
        dtype=torch.float32,
        memory_steps=1 if quick else 2,
        layer_repeats=4 if quick else 8,
    )


def model_config(shape: MoEShape, max_positions: int = 4096):
    """The ``Qwen3MoeConfig`` of ``shape`` (every layer sparse, no tied embeddings)."""
    from trilora.train.tiny_model import tiny_config

    return tiny_config(
        "qwen3_moe",
        hidden=shape.hidden,
        layers=shape.layers,
        vocab=shape.vocab,
        intermediate=shape.moe_intermediate,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max_positions,
    )


def experts_shapes(shape: MoEShape) -> dict[str, tuple[int, ...]]:
    """The experts tensors of one layer as transformers builds them, by parameter name
    (built on the meta device: no memory, so the CUDA shapes are checkable anywhere)."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(shape)
    cfg.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    experts = model.model.layers[0].mlp.experts
    return {n: tuple(p.shape) for n, p in experts.named_parameters() if p.dim() == 3}


def build_checkpoint(plan: MoEPlan, directory: Path) -> Path:
    """A seeded random model of ``plan.shape`` in ``plan.dtype``, saved to ``directory``."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(SHAPES[plan.shape], max(4096, plan.seq_len))
    with seeded(plan.seed):
        model = AutoModelForCausalLM.from_config(cfg, dtype=plan.dtype)
    model.save_pretrained(directory)
    del model
    return directory


def lora_config(plan: MoEPlan):
    """The ``LoraConfig`` both providers use: all linear layers and, through PEFT's
    ``target_parameters``, every experts tensor."""
    from peft import LoraConfig

    return LoraConfig(
        r=plan.rank, lora_alpha=plan.lora_alpha, lora_dropout=0.0, target_modules="all-linear"
    )


def load_provider(
    provider: str, plan: MoEPlan, path: Path, device: torch.device
) -> tuple[nn.Module, str]:
    """``provider``'s PEFT model of the checkpoint at ``path``, in training mode, and a
    description for the notes."""
    if provider == "bnb_peft":
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=plan.dtype,
        )
        device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
        base = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=qcfg, device_map=device_map, dtype=plan.dtype
        )
        _checkpointing(base, plan)
        with seeded(plan.seed + 1):
            model = get_peft_model(base, lora_config(plan))
        how = (
            "transformers + bitsandbytes 4-bit linears (experts 16-bit) + PEFT "
            "(target_parameters on the experts)"
        )
    elif provider == "trilora":
        import trilora.peft as tp
        from trilora.loading import from_pretrained

        base = from_pretrained(
            path, quant_type="nf4", compute_dtype=plan.dtype, device=device, dtype=plan.dtype
        )
        _checkpointing(base, plan)
        with seeded(plan.seed + 1):
            model = tp.get_peft_model(base, lora_config(plan), compute_dtype=plan.dtype)
        how = "trilora.from_pretrained (linears and experts 4-bit) + trilora.peft.get_peft_model"
    else:
        raise ValueError(f"unknown provider {provider!r}; valid: {PROVIDERS}")
    model.train()
    return model, how


def _checkpointing(model: nn.Module, plan: MoEPlan) -> None:
    if plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def random_batches(plan: MoEPlan, device: torch.device) -> list[torch.Tensor]:
    """``plan.n_batches`` seeded int64 ``[batch, seq_len]`` token batches (inputs = labels)."""
    vocab = SHAPES[plan.shape].vocab
    with seeded(plan.seed + 2):
        return [
            torch.randint(0, vocab, (plan.batch, plan.seq_len)).to(device)
            for _ in range(plan.n_batches)
        ]


class _Trainer:
    def __init__(self, model: nn.Module, plan: MoEPlan, batches: list[torch.Tensor]) -> None:
        self.model = model
        self.batches = batches
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=plan.lr)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, i: int, device: torch.device) -> float:
        ids = self.batches[i % len(self.batches)]
        synchronize(device)
        t = time.perf_counter()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())  # synchronizes
        dt = time.perf_counter() - t
        self.times.append(dt)
        self.losses.append(value)
        return dt


def experts_module(model: nn.Module) -> nn.Module:
    """The first layer's experts module of a PEFT model, with the LoRA wrappers around it."""
    return model.get_base_model().model.layers[0].mlp.experts


def layer_inputs(plan: MoEPlan, device: torch.device, sets: int = 2) -> list[tuple]:
    """``sets`` seeded inputs of the experts layer: ``(hidden [T, H] requiring grad, top_k
    index [T, k] int64, top_k weights [T, k], dy [T, H])`` in ``plan.dtype``, with the
    top-k of random router logits (about balanced, as a trained router aims for)."""
    shape = SHAPES[plan.shape]
    out = []
    with seeded(plan.seed + 3):
        for _ in range(sets):
            x = torch.randn(plan.tokens, shape.hidden, dtype=plan.dtype, device=device)
            logits = torch.randn(plan.tokens, shape.experts, device=device)
            weights, index = torch.topk(logits.softmax(-1), shape.top_k, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).to(plan.dtype)
            dy = torch.randn_like(x)
            out.append((x.requires_grad_(), index, weights, dy))
    return out


def _layer_fn(layer: nn.Module, inputs: list[tuple]):
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd_bwd(i: int) -> None:
        x, index, weights, dy = inputs[i % len(inputs)]
        x.grad = None
        for p in params:
            p.grad = None
        layer(x, index, weights).backward(dy)

    return fwd_bwd


# --- memory in a process of its own ---------------------------------------------------


def _rss_bytes(field_name: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1]) * 1024
    return None


def memory_child(argv: list[str]) -> dict:
    """Run in a fresh process: load ``provider``, train ``steps`` steps, return the resident
    set figures (bytes): ``peak`` (high-water mark above the RSS after the imports, loading
    included) and ``step`` (high-water mark of the steps above the RSS with the model and
    optimizer loaded)."""
    p = argparse.ArgumentParser()
    p.add_argument("--path", type=Path, required=True)
    p.add_argument("--provider", choices=PROVIDERS, required=True)
    p.add_argument("--plan", required=True, help="the plan's fields as JSON")
    args = p.parse_args(argv)
    fields = json.loads(args.plan)
    fields["dtype"] = getattr(torch, fields["dtype"])
    plan = MoEPlan(**fields)
    # Both stacks' libraries imported in both processes, so neither pays for the other's.
    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import trilora.loading
    import trilora.peft  # noqa: F401

    cpu = torch.device("cpu")
    base = _rss_bytes("VmRSS")
    reset_peak_memory(cpu)
    model, _ = load_provider(args.provider, plan, args.path, cpu)
    trainer = _Trainer(model, plan, random_batches(plan, cpu))
    loaded = _rss_bytes("VmRSS")
    peak_load = peak_memory_bytes(cpu)
    reset_peak_memory(cpu)
    for i in range(plan.memory_steps):
        trainer.step(i, cpu)
    peak_steps = peak_memory_bytes(cpu)
    if None in (base, loaded, peak_load, peak_steps):
        return {"error": "/proc/self/status has no VmRSS/VmHWM here"}
    return {
        "peak": max(peak_load, peak_steps) - base,
        "step": peak_steps - loaded,
        "loaded": loaded - base,
        "loss": trainer.losses[-1],
    }


def _plan_json(plan: MoEPlan) -> str:
    fields = {k: v for k, v in plan.__dict__.items() if k not in ("notes", "providers", "dtype")}
    fields["dtype"] = str(plan.dtype).removeprefix("torch.")
    return json.dumps(fields)


def measure_memory(plan: MoEPlan, path: Path, provider: str, timeout_s: float = 1800) -> dict:
    """:func:`memory_child` for ``provider`` in a fresh Python process; raises RuntimeError
    with the child's last error line when it fails."""
    cmd = [
        sys.executable,
        "-m",
        "trilora.bench.moe",
        "--memory-child",
        "--path",
        str(path),
        "--provider",
        provider,
        "--plan",
        _plan_json(plan),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory process for {provider} exited {proc.returncode}: {last}")
    got = json.loads(lines[-1])
    if "error" in got:
        raise RuntimeError(got["error"])
    return got


# --- the level -------------------------------------------------------------------------


def case_name(plan: MoEPlan, device: torch.device, what: str = "") -> str:
    """``cpu/b4xs256/r16`` (+ ``/experts_layer``, + ``/bf16`` off the device's default
    dtype)."""
    name = f"{plan.shape}/b{plan.batch}xs{plan.seq_len}/r{plan.rank}"
    if what:
        name += f"/{what}"
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    if plan.dtype != default:
        name += "/" + {torch.float32: "fp32", torch.bfloat16: "bf16"}[plan.dtype]
    return name


def run(
    plan: MoEPlan,
    device: torch.device,
    disabled: tuple[str, ...] = (),
    log=print,
    workdir: Path | None = None,
) -> tuple[list[dict], list[str]]:
    """Run the MoE level; returns ``(rows, notes)``."""
    notes = list(plan.notes)
    shape = SHAPES[plan.shape]
    case = case_name(plan, device)
    layer_case = case_name(plan, device, "experts_layer")
    params = dict(
        model=f"qwen3_moe:{plan.shape}",
        rank=plan.rank,
        batch=plan.batch,
        seq_len=plan.seq_len,
        tokens=plan.tokens,
        dtype=str(plan.dtype).removeprefix("torch."),
    )
    layer_params = dict(
        params,
        layer="experts",
        n_out=shape.hidden,
        k_in=shape.hidden,
    )
    desc = (
        f"Qwen3-MoE hidden {shape.hidden}, {shape.layers} layers, {shape.experts} experts, "
        f"top-{shape.top_k}, moe_intermediate {shape.moe_intermediate}, vocab {shape.vocab}; "
        f"LoRA r={plan.rank} all-linear + experts; grad_ckpt={'on' if plan.grad_ckpt else 'off'}, "
        f"AdamW, {plan.steps} timed steps after {plan.warmup_steps} warm-up"
    )
    metrics = [("step_time", "s", case, params), ("tokens_per_s", "tok/s", case, params)]
    metrics += [("peak_mem", "bytes", case, params), ("loss_final", "loss", case, params)]
    if device.type != "cuda":
        metrics.append(("step_mem", "bytes", case, params))
    metrics.append(("fwd_bwd", "s", layer_case, layer_params))
    rows: list[dict] = []

    def fail(provider: str, status: str, note: str, only: tuple[str, ...] = ()) -> None:
        for metric, unit, c, ps in metrics:
            if not only or metric in only:
                rows.append(
                    make_row(LEVEL, c, metric, provider, unit, status=status, note=note, **ps)
                )

    available = []
    for provider in plan.providers:
        # Both sides compare against PEFT's own experts LoRA; trilora needs PEFT as well.
        ok, why = provider_status("bnb_peft" if provider == "bnb_peft" else "trilora", disabled)
        if ok and provider == "trilora":
            ok, why = provider_status("bf16_peft")
            why = why.replace("bf16_peft", "trilora moe")
        if ok:
            available.append(provider)
        else:
            notes.append(why)
            fail(provider, "skipped", why)
    if not available:
        return rows, notes

    with tempfile.TemporaryDirectory(prefix="trilora-bench-moe-", dir=workdir) as tmp:
        log(f"  building the {plan.shape} MoE checkpoint")
        built = guarded(lambda: build_checkpoint(plan, Path(tmp) / "model"), device)
        if built.status != "ok":
            for provider in available:
                fail(provider, built.status, f"building the checkpoint failed: {built.note}")
            return rows, notes
        path = built.value
        batches = random_batches(plan, device)
        trainers: dict[str, _Trainer] = {}
        how: dict[str, str] = {}
        errors: dict[str, tuple[str, str]] = {}
        peaks: dict[str, float] = {}
        layer_stats: dict[str, Stats] = {}
        total = plan.warmup_steps + plan.steps

        def load(provider: str) -> None:
            model, desc_p = load_provider(provider, plan, path, device)
            trainers[provider] = _Trainer(model, plan, batches)
            how[provider] = desc_p

        if plan.interleave:
            live = train_interleaved(available, load, trainers, total, device, errors, log)
            ok_live = [p for p in live if p not in errors]
            inputs = layer_inputs(plan, device)
            fns = {p: _layer_fn(experts_module(trainers[p].model), inputs) for p in ok_live}
            log("  experts layer forward + backward")
            out = guarded(
                lambda: measure_interleaved(
                    fns,
                    device,
                    warmup=1,
                    repeats=plan.layer_repeats,
                    min_repeats=plan.layer_repeats,
                    rounds=min(plan.layer_repeats, 4),
                ),
                device,
            )
            if out.status == "ok":
                layer_stats.update(out.value)
            else:
                for p in ok_live:
                    fail(p, out.status, f"experts layer: {out.note}", only=("fwd_bwd",))
        else:
            for provider in available:
                log(f"  loading and training {provider}")
                reset_peak_memory(device)

                def train(p: str = provider) -> None:
                    load(p)
                    for i in range(total):
                        trainers[p].step(i, device)
                    inputs = layer_inputs(plan, device)
                    fn = {p: _layer_fn(experts_module(trainers[p].model), inputs)}
                    layer_stats[p] = measure_interleaved(
                        fn, device, warmup=2, repeats=plan.layer_repeats, rounds=1
                    )[p]

                out = guarded(train, device)
                if out.status != "ok":
                    errors[provider] = (out.status, out.note)
                peaks[provider] = peak_memory_bytes(device)
                if provider in trainers:
                    trainers[provider].model = None
                    trainers[provider].opt = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        if plan.interleave and all(p in trainers and p not in errors for p in PROVIDERS):
            notes.append(
                paired_ratio_note(
                    f"moe {case}",
                    trainers["trilora"].times,
                    trainers["bnb_peft"].times,
                    plan.warmup_steps,
                )
            )
        if all(p in layer_stats for p in PROVIDERS):
            ratio = layer_stats["trilora"].median / layer_stats["bnb_peft"].median
            notes.append(
                f"moe {layer_case}: trilora / bnb_peft experts layer forward + backward, "
                f"ratio of medians {ratio:.3f}"
            )

        for provider in available:
            if provider in errors:
                fail(provider, *errors[provider])
                continue
            tr = trainers[provider]
            note = f"{how[provider]}; {desc}"
            stats = Stats.of(tr.times[plan.warmup_steps :])
            rows.append(
                make_row(LEVEL, case, "step_time", provider, "s", stats, note=note, **params)
            )
            tps = Stats(
                plan.tokens / stats.median,
                plan.tokens / stats.p80,
                plan.tokens / stats.p20,
                stats.repeats,
            )
            rows.append(
                make_row(LEVEL, case, "tokens_per_s", provider, "tok/s", tps, note=note, **params)
            )
            rows.append(loss_final_row(LEVEL, case, provider, tr.losses, **params))
            if provider in layer_stats:
                rows.append(
                    make_row(
                        LEVEL,
                        layer_case,
                        "fwd_bwd",
                        provider,
                        "s",
                        layer_stats[provider],
                        note=f"{how[provider]}; layer 0 experts with their LoRA, "
                        f"{plan.tokens} tokens, fixed top-{shape.top_k} routing",
                        **layer_params,
                    )
                )
            if device.type == "cuda":
                peak = peaks.get(provider)
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "peak_mem",
                        provider,
                        "bytes",
                        Stats(peak, peak, peak, 1),
                        note="torch.cuda.max_memory_allocated from loading through the last step",
                        **params,
                    )
                )
        trainers.clear()

        if device.type != "cuda":
            if not plan.memory:
                fail_note = "memory not measured (MoEPlan.memory is off)"
                for p in available:
                    fail(p, "skipped", fail_note, only=("peak_mem", "step_mem"))
            else:
                for provider in available:
                    log(f"  peak memory of {provider} (a process of its own)")
                    out = guarded(lambda p=provider: measure_memory(plan, path, p), device)
                    if out.status != "ok":
                        fail(provider, out.status, out.note, only=("peak_mem", "step_mem"))
                        continue
                    got = out.value
                    for metric, key, what in (
                        (
                            "peak_mem",
                            "peak",
                            "from after the imports through loading and the steps",
                        ),
                        (
                            "step_mem",
                            "step",
                            "during the steps, above the loaded model and optimizer",
                        ),
                    ):
                        v = float(got[key])
                        rows.append(
                            make_row(
                                LEVEL,
                                case,
                                metric,
                                provider,
                                "bytes",
                                Stats(v, v, v, 1),
                                note=f"peak RSS {what} ({plan.memory_steps} steps, fresh process "
                                f"per provider, same imports); loaded model + optimizer "
                                f"{got['loaded'] / 2**20:.0f} MiB",
                                **params,
                            )
                        )
                if all(
                    any(
                        r["metric"] == "peak_mem" and r["provider"] == p and r["status"] == "ok"
                        for r in rows
                    )
                    for p in PROVIDERS
                ):
                    peak = {
                        r["provider"]: r["median"]
                        for r in rows
                        if r["metric"] == "peak_mem" and r["status"] == "ok"
                    }
                    notes.append(
                        f"moe {case}: peak memory trilora {peak['trilora'] / 2**20:.0f} MiB, "
                        f"bnb_peft {peak['bnb_peft'] / 2**20:.0f} MiB (ratio "
                        f"{peak['trilora'] / peak['bnb_peft']:.3f})"
                    )
    for row in rows:
        if (
            row["metric"] == "loss_final"
            and row["status"] == "ok"
            and not math.isfinite(row["median"])
        ):
            notes.append(f"{row['provider']}: non-finite MoE loss")
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    """``python -m trilora.bench.moe --memory-child ...``: one provider's memory figures as
    a JSON line (what :func:`measure_memory` runs)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "--memory-child":
        print(
            "usage: python -m trilora.bench.moe --memory-child --path DIR --provider P --plan JSON"
        )
        print("(the MoE level itself runs as: trilora bench --level moe)")
        return 2
    print(json.dumps(memory_child(argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
