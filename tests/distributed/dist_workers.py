"""What the distributed tests run: a tiny training loop and the 2-rank scenarios.

The scenarios run in real processes started with ``torch.multiprocessing`` (spawn) over
gloo, all in one process group so that the interpreter and library start-up (most of the
cost on a 2-core machine) is paid once. Each returns plain Python data that the tests in
``test_training.py`` compare with a single-process run of the very same loop.

Kept side-effect free: spawned processes import this module by name.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch

VOCAB = 256
BATCH = 4  # global batch; each of the 2 ranks gets 2 rows
SEQ = 16
STEPS = 10
SAVE_AT = 5
LR = 1e-2
# Awkward on purpose: 3 heads of 10 over 1 KV head, and an odd MLP width, so the packed
# 4-bit MLP weights have an odd number of rows (30 * 43 / 2 = 645): 2 ranks do not divide
# them and FSDP2 pads.
MODEL = dict(
    hidden=30,
    layers=2,
    vocab=VOCAB,
    intermediate=43,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=10,
)

# The tiny Qwen3-MoE of the MoE scenario (saved by the test beside the dense model, in
# MOE_FOLDER): 3 experts, so 2 ranks do not divide the experts and FSDP2 pads; the expert
# matrices hold 30 * 54 / 2 = 810 and 30 * 27 / 2 = 405 packed bytes, so a 4-byte storage
# pads each expert too.
MOE_FOLDER = "moe"
MOE_MODEL = dict(
    arch="qwen3_moe", hidden=30, layers=2, vocab=VOCAB, intermediate=27, num_experts=3, head_dim=8
)
MOE_STEPS = 2
# The codes are stored as bf16 and FSDP2's parameters are fp32, so wrap_fsdp re-views each
# expert's bytes as fp32 (QuantizedExperts.set_storage) and all-gathers them untouched.
MOE_QUANT = {
    "quant_method": "bitsandbytes",
    "load_in_4bit": True,
    "bnb_4bit_quant_storage": "bfloat16",
}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=3, lora_alpha=6, target_modules="all-linear", lora_dropout=0.0)


def batches(seed: int, steps: int = STEPS) -> list[torch.Tensor]:
    """Two random global batches, alternating (so that training visibly lowers the loss)."""
    gen = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(2)]
    return [pool[i % 2] for i in range(steps)]


def fill_lora(model: torch.nn.Module, seed: int) -> None:
    """Deterministic non-zero LoRA factors (B too, so every factor trains from step 1).

    On a meta-device shell this is a no-op; rank 0's values reach the other ranks.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                value = 0.1 * torch.randn(p.shape, generator=gen)
                if not p.is_meta:
                    p.copy_(value)


def load_peft(path, seed: int, env=None, **kwargs):
    """The tiny model with LoRA, fp32 compute: loaded on rank 0 (or in a single process),
    a meta shell on the other ranks."""
    import trilora
    from trilora.distributed import load_pretrained

    kw = dict(compute_dtype=torch.float32, dtype=torch.float32)
    kw.update(kwargs)
    model = load_pretrained(path, env=env, **kw)
    peft_model = trilora.get_peft_model(model, lora_config(), compute_dtype=torch.float32)
    fill_lora(peft_model, seed)
    peft_model.train()
    return peft_model


def train(model, optimizer, data, env, start: int = 0, stop: int | None = None) -> list[float]:
    """Forward, loss, backward, step on ``data[start:stop]``; each rank takes its rows of the
    global batch. Returns the global mean loss of every step."""
    import torch.distributed as dist

    losses = []
    for ids in data[start:stop]:
        mine = ids.chunk(env.world_size)[env.rank] if env.distributed else ids
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if env.distributed:
            dist.all_reduce(value)
            value /= env.world_size
        losses.append(value.item())
    return losses


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def packed_weights(model) -> dict[str, torch.Tensor]:
    """uint8 view of every 4-bit weight's packed bytes (gathered when sharded)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, m in _named4bit(model):  # PEFT's names, as the plain model's
        w = m.weight
        w = w.full_tensor() if isinstance(w, DTensor) else w.detach()
        out[key] = w.reshape(-1).view(torch.uint8).clone()
    return out


def same_real_bytes(model, reference: dict[str, torch.Tensor]) -> bool:
    """Whether ``model``'s 4-bit weights (gathered when sharded) hold exactly the packed
    bytes of ``reference`` (:func:`packed_weights`). A float storage pads each weight to its
    item size (4 bytes for fp32, 2 for bf16), so only the real bytes are compared."""
    gathered = packed_weights(model)
    real = {name: (m.in_features * m.out_features + 1) // 2 for name, m in _named4bit(model)}
    return sorted(gathered) == sorted(reference) and all(
        torch.equal(gathered[k][: real[k]], reference[k][: real[k]]) for k in reference
    )


# ---------------------------------------------------------------------------------------
# the 2-rank scenarios
# ---------------------------------------------------------------------------------------


def _scenario_ddp(env, path, out, seed):
    from trilora.distributed import build_optimizer, save_adapter, wrap_ddp
    from trilora.optim import CPUOffloadAdamW

    model = wrap_ddp(load_peft(path, seed, env), env=env)
    opt = build_optimizer(model, CPUOffloadAdamW, lr=LR)
    losses = train(model, opt, batches(seed), env)
    save_adapter(model, out / "ddp_adapter")
    return {"losses": losses}


def _scenario_fsdp(env, path, out, seed):
    from torch.distributed.tensor import DTensor

    import trilora
    import trilora.patches.activation_checkpointing
    from trilora.distributed import (
        DistEnv,
        build_optimizer,
        match_storage,
        resident_bytes,
        save_adapter,
        wrap_fsdp,
    )

    reference = packed_weights(
        trilora.from_pretrained(
            path, compute_dtype=torch.float32, dtype=torch.float32, device="cpu"
        )
    )  # each rank's own copy, for the byte comparison only
    # what one process holds, its packed bytes stored as wrap_fsdp stores them on this torch
    # (re-viewed as a float dtype where FSDP2 cannot hold integer parameters)
    single = load_peft(path, seed, DistEnv())
    match_storage(single, None)
    full = resident_bytes(single)
    model = wrap_fsdp(load_peft(path, seed, env), env=env)
    mine = resident_bytes(model)
    layer0 = trilora.patches.activation_checkpointing.find_decoder_layers(model)[0]
    gathered_layer = []

    def count_gathered(module, args):
        # inside layer 0's forward, after FSDP gathered it: plain tensors of full size
        if not gathered_layer:
            gathered_layer.append(
                sum(p.numel() * p.element_size() for p in layer0.parameters())
                if not any(isinstance(p, DTensor) for p in layer0.parameters())
                else -1
            )

    hook = layer0.input_layernorm.register_forward_pre_hook(count_gathered)
    untouched = same_real_bytes(model, reference)
    odd_rows = sorted(
        n
        for n, m in model.named_modules()
        if isinstance(m, trilora.Linear4bit) and m.weight.shape[0] % env.world_size
    )
    opt = build_optimizer(model, torch.optim.AdamW, lr=LR)
    losses = train(model, opt, batches(seed), env)
    hook.remove()
    save_adapter(model, out / "fsdp_adapter")
    return {
        "losses": losses,
        "resident": mine,
        "resident_single": full,
        "gathered_layer0": gathered_layer[0],
        "bytes_untouched": untouched,
        "odd_row_layers": len(odd_rows),
    }


def _scenario_fsdp_int8(env, path, out, seed):
    """The int8 format under FSDP2: its codes sharded by rows as they are (int8 storage),
    SCB replicated; on a torch whose FSDP2 cannot hold integer parameters, the one-line
    refusal."""
    import trilora
    from trilora.distributed import (
        DistEnv,
        build_optimizer,
        fsdp_holds_integer_params,
        resident_bytes,
        save_adapter,
        wrap_fsdp,
    )
    from trilora.io import UserError
    from trilora.nn import Linear8bit

    reference = {
        name: m.weight.detach().clone()
        for name, m in trilora.from_pretrained(
            path, quant_type="int8", compute_dtype=torch.float32, dtype=torch.float32
        ).named_modules()
        if isinstance(m, Linear8bit)
    }
    full = resident_bytes(load_peft(path, seed, DistEnv(), quant_type="int8"))
    try:
        model = wrap_fsdp(load_peft(path, seed, env, quant_type="int8"), env=env)
    except UserError as e:
        return {"refused": str(e), "integer_params": fsdp_holds_integer_params()}
    mine = resident_bytes(model)
    opt = build_optimizer(model, torch.optim.AdamW, lr=LR)
    losses = train(model, opt, batches(seed), env)
    save_adapter(model, out / "fsdp_int8_adapter")
    gathered = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear8bit):
            w = m.weight
            w = w.full_tensor() if hasattr(w, "full_tensor") else w.detach()
            gathered[name.removeprefix("base_model.model.").removesuffix(".base_layer")] = w
    untouched = sorted(gathered) == sorted(reference) and all(
        w.dtype == torch.int8 and torch.equal(w, reference[k]) for k, w in gathered.items()
    )
    return {
        "losses": losses,
        "resident": mine,
        "resident_single": full,
        "codes_untouched": untouched,
        "integer_params": fsdp_holds_integer_params(),
    }


def _scenario_fsdp_moe(env, path, out, seed):
    """A mixture of experts under FSDP2: the 4-bit experts' codes sharded by experts (3 over
    2 ranks), re-viewed to fp32 storage, gathered for the experts forward and backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    from trilora.distributed import (
        DistEnv,
        build_optimizer,
        match_storage,
        resident_bytes,
        save_adapter,
        wrap_fsdp,
    )
    from trilora.moe import QuantizedExperts

    moe = path.parent / MOE_FOLDER
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    # what one process holds, its codes stored as wrap_fsdp stores them (fp32)
    single = load_peft(moe, seed, DistEnv(), quantization_config=MOE_QUANT)
    experts_bytes = {  # the real bytes of each expert, as loaded (bf16 storage)
        key: _expert_bytes(m, m.weight.detach()) for key, m in _named_experts(single)
    }
    match_storage(single, policy.param_dtype)
    resident_single = resident_bytes(single)
    del single
    model = wrap_fsdp(
        load_peft(moe, seed, env, quantization_config=MOE_QUANT), env=env, mixed_precision=policy
    )
    experts = dict(_named_experts(model))
    seen_in_forward = []

    def gathered(module, args):
        # what the experts forward is about to read: full, plain tensors
        for child in module.children():
            if isinstance(child, QuantizedExperts):
                w = child.weight
                seen_in_forward.append(not isinstance(w, DTensor) and w.shape[0] == 3)

    hooks = [
        parent.register_forward_pre_hook(gathered)
        for parent in model.modules()
        if any(isinstance(c, QuantizedExperts) for c in parent.children())
    ]
    local_experts = sorted({m.weight.to_local().shape[0] for m in experts.values()})
    storages = sorted({str(m.weight.dtype) for m in experts.values()})
    untouched = sorted(experts) == sorted(experts_bytes) and all(
        torch.equal(_expert_bytes(m, m.weight.full_tensor()), experts_bytes[k])
        for k, m in experts.items()
    )
    mine = resident_bytes(model)
    opt = build_optimizer(model, torch.optim.AdamW, lr=LR)
    losses = train(model, opt, batches(seed, MOE_STEPS), env)
    for hook in hooks:
        hook.remove()
    save_adapter(model, out / "fsdp_moe_adapter")
    return {
        "losses": losses,
        "experts_modules": len(experts),
        "local_experts": local_experts,
        "storages": storages,
        "bytes_untouched": untouched,
        "gathered_in_forward": seen_in_forward,
        "resident": mine,
        "resident_single": resident_single,
    }


def _scenario_ddp_moe(env, path, out, seed):
    """A mixture of experts under DDP: the shell's quantized experts filled from rank 0."""
    from trilora.distributed import build_optimizer, save_adapter, wrap_ddp

    model = load_peft(path.parent / MOE_FOLDER, seed, env, quantization_config=MOE_QUANT)
    model = wrap_ddp(model, env=env)
    opt = build_optimizer(model, torch.optim.AdamW, lr=LR)
    losses = train(model, opt, batches(seed, MOE_STEPS), env)
    save_adapter(model, out / "ddp_moe_adapter")
    return {"losses": losses}


def _named_experts(model):
    """``(name, QuantizedExperts)`` under the plain model's names (PEFT's wrappers dropped)."""
    from trilora.moe import QuantizedExperts

    return [
        (name.removeprefix("base_model.model.").replace(".base_layer", ""), m)
        for name, m in model.named_modules()
        if isinstance(m, QuantizedExperts)
    ]


def _expert_bytes(experts, codes: torch.Tensor) -> torch.Tensor:
    """``[E, packed bytes]`` uint8: each expert's real 4-bit bytes out of ``codes`` (the
    experts' ``weight``, any storage dtype; the padding of a wider storage dropped)."""
    real = (experts.rows * experts.cols + 1) // 2
    return codes.reshape(experts.num_experts, -1).view(torch.uint8)[:, :real].clone()


def _scenario_fsdp_checkpointing(env, path, out, seed):
    import trilora
    from trilora.distributed import (
        ShardedOptimizer,
        load_state,
        save_adapter,
        save_state,
        wrap_fsdp,
    )
    from trilora.optim import CPUOffloadAdamW

    def sharded_offload_adamw(m, lr):
        # CPUOffloadAdamW treating each rank's shard as a plain tensor: the adapter's path
        trainable = [p for p in m.parameters() if p.requires_grad]
        return ShardedOptimizer(trainable, CPUOffloadAdamW, lr=lr, offload_gradients=False)

    model = wrap_fsdp(load_peft(path, seed, env), env=env)
    # offload is plain checkpointing on CPU tensors; mlp_chunks adds nested checkpoints
    trilora.enable_checkpointing(model, offload=True, mlp_chunks=2)
    opt = sharded_offload_adamw(model, LR)
    data = batches(seed)
    losses = train(model, opt, data, env, 0, SAVE_AT)
    save_state(out / "state", model, opt, extra={"step": SAVE_AT, "rng": torch.arange(3)})
    losses += train(model, opt, data, env, SAVE_AT)
    save_adapter(model, out / "fsdp_ckpt_adapter")
    # resume on the same 2 ranks into a fresh model (other LoRA values, other lr): the
    # DTensor state goes back into the ShardedOptimizer's local shards
    again = wrap_fsdp(load_peft(path, seed + 1, env), env=env)
    trilora.enable_checkpointing(again, offload=True, mlp_chunks=2)
    again_opt = sharded_offload_adamw(again, 0.5)
    step = load_state(out / "state", again, again_opt)["step"]
    resumed = train(again, again_opt, data, env, step)
    return {
        "losses": losses,
        "sharded_optimizer": isinstance(opt, ShardedOptimizer),
        "resumed_losses": resumed,
    }


def _scenario_trilora_optim(env, path, out, seed):
    """trilora.optim's own DTensor support under FSDP2: CPUOffloadAdamW as a user builds it
    (offloaded gradients: its hooks never fire on FSDP's sharded gradients, step() takes
    them), and 8-bit AdamW, whose blockwise state resumes on the same 2 ranks exactly."""
    from trilora.distributed import build_optimizer, load_state, save_state, wrap_fsdp
    from trilora.optim import AdamW8bit, CPUOffloadAdamW

    model = wrap_fsdp(load_peft(path, seed, env), env=env)
    opt = build_optimizer(model, CPUOffloadAdamW, lr=LR)
    kind = type(opt).__name__
    losses = train(model, opt, batches(seed), env)

    data = batches(seed, 4)

    def eight_bit(lora_seed):
        m = wrap_fsdp(load_peft(path, lora_seed, env), env=env)
        return m, build_optimizer(m, AdamW8bit, lr=LR, min_8bit_size=64)

    model, opt = eight_bit(seed)
    first = train(model, opt, data, env, 0, 2)
    save_state(out / "state8", model, opt, extra={"step": 2})
    rest = train(model, opt, data, env, 2)
    model, opt = eight_bit(seed + 1)
    step = load_state(out / "state8", model, opt)["step"]
    resumed = train(model, opt, data, env, step)
    return {
        "losses": losses,
        "optimizer": kind,
        "eight_bit": first + rest,
        "eight_bit_resumed": resumed,
    }


def _scenario_fsdp_bf16(env, path, out, seed):
    """fp32-stored packed bytes under a bf16 mixed-precision policy: re-viewed as bf16."""
    from trilora.distributed import DistEnv, build_optimizer, wrap_fsdp

    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_storage": "float32"}
    reference = packed_weights(load_peft(path, seed, DistEnv(), quantization_config=qc))
    model = wrap_fsdp(
        load_peft(path, seed, env, quantization_config=qc), env=env, mixed_precision=torch.bfloat16
    )
    storages = sorted({str(m.weight.dtype) for m in _linear4bit(model)})
    untouched = same_real_bytes(model, reference)
    opt = build_optimizer(model, torch.optim.AdamW, lr=LR)
    losses = train(model, opt, batches(seed, 3), env)
    return {"losses": losses, "storages": storages, "bytes_untouched": untouched}


def _scenario_cpu_offload(env, path, out, seed):
    from trilora.distributed import build_optimizer, wrap_fsdp

    model = wrap_fsdp(load_peft(path, seed, env), env=env, cpu_offload=True)
    opt = build_optimizer(model, torch.optim.AdamW, lr=LR)
    return {"losses": train(model, opt, batches(seed, 3), env)}


def _scenario_missing_checkpoint(env, path, out, seed):
    from trilora.distributed import load_pretrained
    from trilora.io import UserError

    try:
        load_pretrained(out / "no_such_model", env=env)
    except UserError as exc:
        return {"error": str(exc)}
    return {"error": None}


def _scenario_mixed_storage(env, path, out, seed):
    from trilora.distributed import wrap_fsdp
    from trilora.io import UserError

    storage = "uint8" if env.rank == 0 else "bfloat16"
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_storage": storage}
    import trilora

    # Every rank loads by itself here (the mistake: two different load settings).
    model = trilora.get_peft_model(
        trilora.from_pretrained(
            path,
            compute_dtype=torch.float32,
            dtype=torch.float32,
            device="cpu",
            quantization_config=qc,
        ),
        lora_config(),
        compute_dtype=torch.float32,
    )
    try:
        wrap_fsdp(model, env=env)
    except UserError as exc:
        return {"error": str(exc)}
    return {"error": None}


class BlockwiseSGD(torch.optim.Optimizer):
    """SGD that keeps a statistic per block of each parameter, shaped unlike the parameter:
    it stands in for 8-bit optimizers, whose blockwise state cannot be resharded."""

    def __init__(self, params, lr: float = 1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["block_stats"] = torch.stack([p.grad.abs().sum(), p.grad.sum()])
                    p.add_(p.grad, alpha=-group["lr"])


def _scenario_blockwise_state(env, path, out, seed):
    from trilora.distributed import build_optimizer, save_state, wrap_fsdp

    model = wrap_fsdp(load_peft(path, seed, env), env=env)
    opt = build_optimizer(model, BlockwiseSGD, lr=LR)
    train(model, opt, batches(seed, 1), env)
    save_state(out / "blockwise", model, opt)
    return {"optimizer": type(opt).__name__}


def _scenario_ulysses(env, path, out, seed):
    """Sequence-parallel attention and a whole model on 2 ranks against one process.

    Every rank draws the same full tensors, runs its half of the sequence through Ulysses
    and compares with single-process attention on the whole sequence: outputs and the
    gradients of its own slice (which receive contributions from the other rank's
    queries through the all-to-all's backward)."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import trilora
    from trilora.distributed.ulysses import enable_ulysses, shard_sequence, ulysses_attention

    r, p = env.rank, env.world_size
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for kv in (2, 1):  # 2 key/value heads split over 2 ranks; 1 repeated up to the queries
        b, h, t, d = 2, 4, 12, 8
        q, k, v = (torch.randn(b, n, t, d, generator=gen) for n in (h, kv, kv))
        w = torch.randn(b, t, h, d, generator=gen)
        full = [x.clone().requires_grad_(True) for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(
            full[0], *(x.repeat_interleave(h // kv, dim=1) for x in full[1:]), is_causal=True
        ).transpose(1, 2)
        (ref * w).sum().backward()
        sl = slice(r * t // p, (r + 1) * t // p)
        local = [x[:, :, sl].clone().requires_grad_(True) for x in (q, k, v)]
        module = torch.nn.Module()
        module.is_causal, module.num_key_value_groups = True, h // kv
        got, _ = ulysses_attention(module, *local, None, inner=sdpa_attention_forward)
        (got * w[:, sl]).sum().backward()
        errors[f"kv{kv}_out"] = (got - ref[:, sl]).abs().max().item()
        for name, a, f in zip("qkv", local, full):
            errors[f"kv{kv}_grad_{name}"] = (a.grad - f.grad[:, :, sl]).abs().max().item()

    # a tiny model with LoRA on every linear layer (4 heads, 2 KV heads): logits and a
    # LoRA gradient
    from helpers_models import save_tiny_model

    path = out / "ulysses_model"
    if r == 0:
        save_tiny_model(path, seed=seed, vocab=VOCAB)
    torch.distributed.barrier()
    kw = dict(
        compute_dtype=torch.float32, dtype=torch.float32, device="cpu", attn_implementation="sdpa"
    )
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    w = torch.randn(2, SEQ, VOCAB, generator=gen)

    def lora_model():
        m = trilora.get_peft_model(
            trilora.from_pretrained(path, **kw), lora_config(), compute_dtype=torch.float32
        )
        fill_lora(m, seed)
        return m

    def lora_grad(m):
        return next(
            p.grad for n, p in m.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n
        )

    ref_model = lora_model()
    ref_logits = ref_model(input_ids=ids).logits
    (ref_logits * w).sum().backward()
    model = lora_model()
    inner = enable_ulysses(model)
    part = shard_sequence(ids, ids)
    logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"]).logits
    n = SEQ // p
    (logits * w[:, r * n : (r + 1) * n]).sum().backward()
    grad = lora_grad(model).clone()
    torch.distributed.all_reduce(grad)  # each rank holds its tokens' share
    errors["model_logits"] = (logits - ref_logits[:, r * n : (r + 1) * n]).abs().max().item()
    errors["model_lora_grad"] = (grad - lora_grad(ref_model)).abs().max().item()
    errors["shift_labels_ok"] = bool(
        torch.equal(part["shift_labels"][:, :-1], ids[:, r * n + 1 : (r + 1) * n])
    )
    return {
        "errors": errors,
        "inner": inner,
        "scale": ref_logits.abs().max().item(),
        "grad_scale": lora_grad(ref_model).abs().max().item(),
    }


def _scenario_fully_shard_bf16(env, path, out, seed):
    """torch's ``fully_shard`` called directly (as a user of plain FSDP2 would) on a
    QLoraLinear whose packed bytes are stored as bf16, under a bf16 mixed-precision policy:
    shards along dim 0, bytes untouched, outputs and LoRA gradients of the unsharded layer.
    (Formerly tests/test_fsdp.py, with a spawned pair of its own.)"""
    import gc

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import trilora

    torch.manual_seed(seed)  # same weights and inputs on every rank
    layer = trilora.QLoraLinear.from_linear(
        torch.nn.Linear(128, 64),
        r=4,
        lora_alpha=8,
        compute_dtype=torch.float32,
        quant_storage=torch.bfloat16,
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    packed = layer.weight.detach().clone()
    x = torch.randn(5, 128)
    ref = layer(x).detach()
    layer(x).sum().backward()
    ref_grad = layer.lora_A.grad.clone()
    layer.lora_A.grad = None

    model = torch.nn.Sequential(layer)
    fully_shard(
        model,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    shard = model[0].weight.to_local()
    y = model(x)
    y.sum().backward()
    grad = model[0].lora_A.grad.full_tensor()
    full_packed = model[0].weight.full_tensor()
    row = {
        "shard_rows": shard.shape[0],
        "total_rows": packed.shape[0],
        "bytes_untouched": torch.equal(full_packed.view(torch.uint8), packed.view(torch.uint8)),
        # LoRA runs in bf16 under the policy; the base path is unchanged
        "y_err": ((y.float() - ref).abs().max() / ref.abs().max()).item(),
        "grad_err": ((grad.float() - ref_grad).abs().max() / ref_grad.abs().max()).item(),
    }
    # the FSDP module graph is cyclic garbage that holds the process group: free it while
    # the group is alive (gloo aborts at exit under torch 2.11 otherwise)
    del model, layer, shard, y, grad, full_packed
    gc.collect()
    return row


# trilora.optim's AdamW flavours through torch's own distributed checkpoint API (formerly
# tests/optim/test_fsdp_resume.py, with a spawned pair of its own). bitsandbytes #1381: a
# paged AdamW broke FSDP checkpoint resume (its ``step`` is an ``int`` that the checkpoint
# code calls ``.cpu()`` on, and its quantization state is not sharded like the parameters).
OPTIM_DCP_KINDS = {
    "32": ({}, "auto"),
    "8": ({"state_bits": 8, "min_8bit_size": 1024}, "auto"),
    "8-paged": (
        {"state_bits": 8, "min_8bit_size": 1024, "paging": "host", "page_bytes": 8192},
        "triton",
    ),
}


def _scenario_optim_dcp_resume(env, path, out, seed):
    """Every AdamW flavour saves mid-run through ``get_state_dict`` +
    ``torch.distributed.checkpoint.save``, loads into a fresh model and optimizer, and must
    continue bit for bit like an uninterrupted run; a per-rank ``torch.save`` of
    ``optimizer.state_dict()`` must round-trip too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from trilora.config import override
    from trilora.optim import AdamW

    rank = env.rank
    rows = {}
    for kind, (settings, backend) in OPTIM_DCP_KINDS.items():
        tmp = out / "optim_dcp" / kind
        if rank == 0:
            tmp.mkdir(parents=True)
        torch.distributed.barrier()

        def build(init_seed: int, settings=settings):
            torch.manual_seed(init_seed)
            model = torch.nn.Sequential(
                torch.nn.Linear(40, 67), torch.nn.Tanh(), torch.nn.Linear(67, 33)
            )
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
            return model, AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, **settings)

        def train_steps(model, opt, steps, backend=backend):
            with override(backend=backend):
                for t in steps:
                    gen = torch.Generator().manual_seed(seed + 100 * t + rank)
                    model(torch.randn(6, 40, generator=gen)).square().mean().backward()
                    opt.step()
                    opt.zero_grad()

        def full(model):
            return [p.full_tensor().detach().clone() for p in model.parameters()]

        model, opt = build(seed)
        train_steps(model, opt, range(6))
        want = full(model)

        model, opt = build(seed)
        train_steps(model, opt, range(3))
        msd, osd = get_state_dict(model, opt)
        step_types = sorted({type(e["step"]).__name__ for e in osd["state"].values()})
        bits = sorted({8 if "state1" in e else 32 for e in osd["state"].values()})
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        torch.save(opt.state_dict(), tmp / f"rank{rank}.pt")

        model, opt = build(seed + 1)  # other weights: everything must come from the checkpoint
        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        train_steps(model, opt, range(3, 6))
        dcp_ok = all(torch.equal(a, b) for a, b in zip(full(model), want))

        # Per-rank torch.save / torch.load of the optimizer's own (sharded) state dict.
        _, opt2 = build(seed + 2)
        saved = torch.load(tmp / f"rank{rank}.pt", weights_only=False)
        opt2.load_state_dict(saved)

        def local(t):
            return t.to_local() if hasattr(t, "to_local") else t

        local_ok = all(
            torch.equal(local(a), local(b))
            for e1, e2 in zip(saved["state"].values(), opt2.state_dict()["state"].values())
            for a, b in zip(e1.values(), e2.values())
        )
        rows[kind] = {"dcp_ok": dcp_ok, "local_ok": local_ok, "steps": step_types, "bits": bits}
    return {"kinds": rows}


def _linear4bit(model):
    return [m for _, m in _named4bit(model)]


def _named4bit(model):
    from trilora.nn import Linear4bit

    return [
        (name.removeprefix("base_model.model.").removesuffix(".base_layer"), m)
        for name, m in model.named_modules()
        if isinstance(m, Linear4bit)
    ]


SCENARIOS = {
    "ddp": _scenario_ddp,
    "fsdp": _scenario_fsdp,
    "fsdp_int8": _scenario_fsdp_int8,
    "fsdp_moe": _scenario_fsdp_moe,
    "ddp_moe": _scenario_ddp_moe,
    "fsdp_checkpointing": _scenario_fsdp_checkpointing,
    "trilora_optim": _scenario_trilora_optim,
    "fsdp_bf16": _scenario_fsdp_bf16,
    "cpu_offload": _scenario_cpu_offload,
    "mixed_storage": _scenario_mixed_storage,
    "missing_checkpoint": _scenario_missing_checkpoint,
    "blockwise_state": _scenario_blockwise_state,
    "ulysses": _scenario_ulysses,
    "fully_shard_bf16": _scenario_fully_shard_bf16,
    "optim_dcp_resume": _scenario_optim_dcp_resume,
}


def worker(rank: int, world: int, init_file: str, path: str, out: str, seed: int, names, results):
    """One rank: join the group, run every scenario in ``names``, put ``(rank, results)``."""
    import time

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # A bounded timeout: a rank that fails inside a collective makes the other raise
    # instead of waiting forever.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    from trilora.distributed import current_env

    env = current_env()
    report = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                report[name] = SCENARIOS[name](env, Path(path), Path(out), seed)
            except Exception:
                report[name] = {"crash": traceback.format_exc()}
            report[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        results.put((rank, report))
        dist.destroy_process_group()
