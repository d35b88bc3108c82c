"""End-to-end level: QLoRA training steps of a Llama-architecture model.

Both providers start from the same checkpoint (a randomly initialized ``LlamaForCausalLM``
of the chosen preset, saved with ``save_pretrained`` to a temp dir: there is no model hub
here), loaded by transformers with bitsandbytes 4-bit NF4 + double quantization, prepared
with ``peft.prepare_model_for_kbit_training`` and wrapped with the same PEFT ``LoraConfig``
under the same seed, then trained on the same token batches with the same optimizer:

* ``bnb_peft``: that PEFT model as it is (transformers + bitsandbytes + PEFT).
* ``trilora``: the same PEFT model after ``trilora.patch`` (the drop-in backend), which
  swaps every bitsandbytes LoRA layer for trilora's fused one (same 4-bit bytes, same
  adapter parameters) and computes the loss with the fused linear cross-entropy.

Gradient checkpointing is on for both by default (the usual QLoRA recipe); the optimizer
is bitsandbytes' ``paged_adamw_8bit`` on CUDA and ``torch.optim.AdamW`` on a CPU, where
paged optimizers do not exist (noted in the report).

On CUDA the providers run one after the other, so ``max_memory_allocated`` is each one's
own peak. On a CPU they run interleaved step by step, so that the load of a shared machine
falls on both alike; the CPU's peak memory is a process-wide figure and is not reported
per provider.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trilora.bench.harness import (
    Stats,
    guarded,
    make_row,
    peak_memory_bytes,
    provider_status,
    reset_peak_memory,
    seeded,
    synchronize,
)

LEVEL = "e2e"
PROVIDERS = ("trilora", "bnb_peft")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama-architecture sizes; 1b/3b/8b follow Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "small": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192),
    "medium": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, num_attention_heads=16,
                   num_key_value_heads=8, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip


@dataclass
class E2EPlan:
    """What the end-to-end level runs."""

    preset: str
    batch: int
    seq_len: int
    steps: int
    warmup_steps: int
    dtype: torch.dtype
    rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 1e-3
    grad_ckpt: bool = True
    optim: str = "adamw"
    interleave: bool = False
    n_batches: int = 4
    seed: int = 0
    providers: tuple[str, ...] = PROVIDERS
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {list(PRESETS)}")
        if min(self.batch, self.seq_len, self.steps) < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"batch, seq_len and steps must be >= 1 and warmup_steps >= 0, got "
                f"{self.batch}, {self.seq_len}, {self.steps}, {self.warmup_steps}"
            )
        if self.optim not in ("adamw", "paged_adamw_8bit"):
            raise ValueError(f"optim must be 'adamw' or 'paged_adamw_8bit', got {self.optim!r}")


def default_plan(device: torch.device, quick: bool, preset: str | None = None) -> E2EPlan:
    """GPU: the 1B preset, 4 x 1024 tokens, bf16, paged_adamw_8bit. CPU: a small model in fp32,
    interleaved providers; ``quick`` shrinks it to a few steps of the tiny preset."""
    notes: list[str] = []
    if device.type == "cuda":
        optim = "paged_adamw_8bit" if provider_status("bnb_peft")[0] else "adamw"
        if optim == "adamw":
            notes.append(
                "paged_adamw_8bit skipped: bitsandbytes unavailable; torch AdamW used for both"
            )
        plan = E2EPlan(preset or ("tiny" if quick else "1b"), batch=4 if not quick else 2,
                       seq_len=1024 if not quick else 128, steps=20 if not quick else 4,
                       warmup_steps=3 if not quick else 1, dtype=torch.bfloat16, optim=optim)  # fmt: skip
    else:
        notes.append(
            "paged_adamw_8bit skipped: CUDA only; torch AdamW used for both providers on CPU"
        )
        plan = E2EPlan(preset or ("tiny" if quick else "small"), batch=2 if quick else 4,
                       seq_len=64 if quick else 256, steps=3 if quick else 8, warmup_steps=1,
                       dtype=torch.float32, optim="adamw", interleave=True)  # fmt: skip
    plan.notes.extend(notes)
    return plan


def build_checkpoint(plan: E2EPlan, directory: Path) -> Path:
    """Save a randomly initialized Llama of ``plan.preset`` (seeded) to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**PRESETS[plan.preset], max_position_embeddings=max(2048, plan.seq_len),
                      tie_word_embeddings=False, torch_dtype=plan.dtype)  # fmt: skip
    with seeded(plan.seed):
        model = LlamaForCausalLM(cfg).to(plan.dtype)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    return directory


def _load_peft_model(plan: E2EPlan, path: Path, device: torch.device) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=plan.dtype)  # fmt: skip
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qcfg, device_map=device_map, dtype=plan.dtype
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.grad_ckpt)
    if plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=plan.rank, lora_alpha=plan.lora_alpha, lora_dropout=0.0,
                      target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")  # fmt: skip
    with seeded(plan.seed + 1):
        return get_peft_model(model, lcfg)


def _make_provider(
    provider: str, plan: E2EPlan, path: Path, device: torch.device
) -> tuple[nn.Module, str]:
    model = _load_peft_model(plan, path, device)
    if provider == "bnb_peft":
        return model, "transformers + bitsandbytes 4-bit + PEFT"
    import trilora

    # trilora's drop-in path: the same PEFT model, its LoRA layers swapped in place (same
    # 4-bit bytes, same adapter parameters), fused cross-entropy on.
    return trilora.patch(model), "trilora.patch(peft_model)"


def _optimizer(plan: E2EPlan, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if plan.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=plan.lr)
    return torch.optim.AdamW(params, lr=plan.lr)


class _Trainer:
    def __init__(self, model: nn.Module, plan: E2EPlan, batches: list[torch.Tensor]) -> None:
        self.model = model
        self.batches = batches
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _optimizer(plan, self.params)
        self.losses: list[float] = []
        self.times: list[float] = []
        model.train()

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
        self.losses.append(value)
        self.times.append(dt)
        return dt


Log = Callable[[str], None]


def run(
    plan: E2EPlan,
    device: torch.device,
    disabled: tuple[str, ...] = (),
    log: Log = print,
    workdir: Path | None = None,
) -> tuple[list[dict], list[str], dict]:
    """Run the end-to-end level; returns ``(rows, notes, curves)`` where ``curves`` maps
    provider -> per-step losses (for the loss plot)."""
    notes = list(plan.notes)
    case = f"{plan.preset}/b{plan.batch}xs{plan.seq_len}/r{plan.rank}"
    params = dict(model=plan.preset, rank=plan.rank, batch=plan.batch, seq_len=plan.seq_len,
                  tokens=plan.batch * plan.seq_len, dtype=str(plan.dtype).removeprefix("torch."))  # fmt: skip
    setting = f"grad_ckpt={'on' if plan.grad_ckpt else 'off'}, optim={plan.optim}, {plan.steps} timed steps after {plan.warmup_steps} warm-up"
    rows: list[dict] = []
    metrics = (
        ("step_time", "s"),
        ("tokens_per_s", "tok/s"),
        ("peak_mem", "bytes"),
        ("loss_final", "loss"),
    )

    def fail(provider: str, status: str, note: str) -> None:
        for metric, unit in metrics:
            rows.append(
                make_row(LEVEL, case, metric, provider, unit, status=status, note=note, **params)
            )

    available = []
    for provider in plan.providers:
        ok, why = provider_status(provider, disabled)
        # Both providers load through transformers + bitsandbytes + PEFT (same checkpoint,
        # same quantized bytes), so the trilora provider needs them as well.
        if ok and provider == "trilora":
            ok, why = provider_status("bnb_peft", disabled)
            why = why.replace(
                "bnb_peft skipped", "trilora e2e skipped (it loads through bitsandbytes + PEFT)"
            )
        if ok:
            available.append(provider)
        else:
            notes.append(why)
            fail(provider, "skipped", why)
    if not available:
        return rows, notes, {}

    with tempfile.TemporaryDirectory(prefix="trilora-bench-", dir=workdir) as tmp:
        log(f"  building {plan.preset} checkpoint")
        built = guarded(lambda: build_checkpoint(plan, Path(tmp) / "model"), device)
        if built.status != "ok":
            for provider in available:
                fail(provider, built.status, f"building the checkpoint failed: {built.note}")
            return rows, notes, {}
        with seeded(plan.seed + 2):
            vocab = PRESETS[plan.preset]["vocab_size"]
            batches = [
                torch.randint(0, vocab, (plan.batch, plan.seq_len)).to(device)
                for _ in range(plan.n_batches)
            ]
        trainers: dict[str, _Trainer] = {}
        how: dict[str, str] = {}
        peaks: dict[str, float | None] = {}
        errors: dict[str, tuple[str, str]] = {}
        total = plan.warmup_steps + plan.steps

        def load(provider: str) -> None:
            model, desc = _make_provider(provider, plan, built.value, device)
            trainers[provider] = _Trainer(model, plan, batches)
            how[provider] = desc

        if plan.interleave:
            for provider in available:
                log(f"  loading {provider}")
                out = guarded(lambda p=provider: load(p), device)
                if out.status != "ok":
                    errors[provider] = (out.status, f"loading failed: {out.note}")
            live = [p for p in available if p in trainers]
            for i in range(total):
                # Rotate the order each step so neither provider always runs first.
                order = live[i % len(live) :] + live[: i % len(live)] if live else []
                for provider in order:
                    if provider in errors:
                        continue
                    out = guarded(lambda p=provider, i=i: trainers[p].step(i, device), device)
                    if out.status != "ok":
                        errors[provider] = (out.status, f"training step {i} failed: {out.note}")
                log(
                    f"  step {i + 1}/{total}: "
                    + ", ".join(
                        f"{p} {trainers[p].times[-1]:.3f}s" for p in live if p not in errors
                    )
                )
            for p in live:
                peaks[p] = None
        else:
            for provider in available:
                log(f"  loading and training {provider}")
                reset_peak_memory(device)

                def train(p: str = provider) -> None:
                    load(p)
                    for i in range(total):
                        trainers[p].step(i, device)

                out = guarded(train, device)
                if out.status != "ok":
                    errors[provider] = (out.status, out.note)
                peaks[provider] = peak_memory_bytes(device)
                if provider in trainers:
                    # Keep the numbers, free the model before the next provider loads.
                    trainers[provider].model = None
                    trainers[provider].opt = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        curves: dict[str, list[float]] = {}
        for provider in available:
            if provider in errors:
                fail(provider, *errors[provider])
                continue
            tr = trainers[provider]
            timed = tr.times[plan.warmup_steps :]
            stats = Stats.of(timed)
            tokens = plan.batch * plan.seq_len
            note = f"{how[provider]}; {setting}"
            rows.append(
                make_row(LEVEL, case, "step_time", provider, "s", stats, note=note, **params)
            )
            tps = Stats(
                tokens / stats.median, tokens / stats.p80, tokens / stats.p20, stats.repeats
            )
            rows.append(
                make_row(LEVEL, case, "tokens_per_s", provider, "tok/s", tps, note=note, **params)
            )
            peak = peaks.get(provider)
            if peak is None:
                rows.append(make_row(LEVEL, case, "peak_mem", provider, "bytes", status="skipped",
                                     note="CPU: providers run interleaved in one process, so peak memory is not per provider", **params))  # fmt: skip
            else:
                what = (
                    "torch.cuda.max_memory_allocated"
                    if device.type == "cuda"
                    else "process peak RSS"
                )
                rows.append(make_row(LEVEL, case, "peak_mem", provider, "bytes", Stats(peak, peak, peak, 1),
                                     note=f"{what} from loading through the last step", **params))  # fmt: skip
            final = tr.losses[-1]
            rows.append(make_row(LEVEL, case, "loss_final", provider, "loss", Stats(final, final, final, 1),
                                 note=f"loss after {len(tr.losses)} steps (first {tr.losses[0]:.4f})", **params))  # fmt: skip
            curves[provider] = list(tr.losses)
            if not all(math.isfinite(v) for v in tr.losses):
                notes.append(f"{provider}: non-finite loss in the curve {tr.losses}")
        trainers.clear()
    return rows, notes, curves
