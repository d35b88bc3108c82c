"""The same training step through transformers + bitsandbytes + PEFT, traced the same way.

The model is built from the config with bitsandbytes' own ``bnb.nn.Linear4bit`` (NF4,
double quantization, bf16 compute) in place of every ``nn.Linear`` but the head, wrapped by
PEFT's own LoRA layers (``get_peft_model``, ``target_modules="all-linear"`` by default,
adapters in fp32 as PEFT creates them for 4-bit bases), with transformers' gradient
checkpointing (``use_reentrant=True``, the Hugging Face default, with
``enable_input_require_grads``) or without it, and the stock ``lm_head`` +
``loss_function`` (full logits, upcast to fp32 inside the loss). bitsandbytes' real
``MatMul4Bit`` runs under FakeTensorMode through its registered fake kernels, so its full
size dequantized weight in every forward and backward is seen by the trace.

The 4-bit state that ``.cuda()`` would create by quantizing is built directly as a
``QuantState`` of the right shapes (fake tensors), which is what a loaded checkpoint holds.
Attention is the same causal flash attention as the trilora trace (see
:mod:`trilora.memory.attention`), so the comparison isolates everything else.
"""

from __future__ import annotations

import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from trilora.memory.moe import check_traceable
from trilora.memory.report import MemOptions, MemReport, compute_dtype
from trilora.memory.trace import (
    StepTrace,
    layer_progress,
    meta_causal_lm,
    provider_options,
    trace_training_step,
    trainable_itemsize,
)


def _bnb_quant_state(out_f: int, in_f: int, dtype: torch.dtype, blocksize: int, device):
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, get_4bit_type

    n = out_f * in_f
    nblocks = -(-n // blocksize)
    nested = QuantState(
        absmax=torch.zeros(-(-nblocks // 256), dtype=torch.float32, device=device),
        code=torch.zeros(256, dtype=torch.float32, device=device),
        blocksize=256,
        dtype=torch.float32,
    )
    del bnb
    return QuantState(
        absmax=torch.zeros(nblocks, dtype=torch.uint8, device=device),
        shape=torch.Size([out_f, in_f]),
        code=get_4bit_type("nf4", device=device),
        blocksize=blocksize,
        quant_type="nf4",
        dtype=dtype,
        offset=torch.zeros((), dtype=torch.float32, device=device),
        state2=nested,
    )


def _quantize_fake(model: nn.Module, dtype: torch.dtype, blocksize: int) -> None:
    """Give every bnb Linear4bit packed bytes and a QuantState (fake tensors)."""
    import bitsandbytes as bnb

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            out_f, in_f = mod.out_features, mod.in_features
            packed = torch.zeros(
                ((out_f * in_f + 1) // 2, 1), dtype=torch.uint8, device=mod.weight.device
            )
            qs = _bnb_quant_state(out_f, in_f, dtype, blocksize, packed.device)
            # A plain frozen Parameter carrying the state: Params4bit (a tensor subclass)
            # cannot wrap a FakeTensor, and bnb's forward only reads .quant_state from it.
            mod.weight = nn.Parameter(packed, requires_grad=False)
            mod.weight.quant_state = qs
            mod.weight.bnb_quantized = True
            mod.weight.quant_type = "nf4"
            mod.weight.blocksize = blocksize
            mod.weight.compress_statistics = True
            mod.weight.quant_storage = torch.uint8
            mod.weight.module = mod


def trace_bnb_peft(
    config,
    opts: MemOptions,
    num_layers: int | None = None,
    name: str = "",
    recorder=None,
    on_layer=None,
) -> StepTrace:
    """Trace one transformers + bitsandbytes + PEFT QLoRA step on fake tensors.

    ``recorder`` and ``on_layer`` as in :func:`trilora.memory.trace.trace_trilora`.
    """
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import FakeTensorMode

    opts.validate()
    check_traceable(config)
    if opts.quant_type not in ("nf4", "fp4"):
        raise ValueError(
            f"the bitsandbytes + PEFT baseline trace models 4-bit (nf4/fp4) bases only, "
            f"not quant_type={opts.quant_type!r}"
        )
    opts = provider_options("bnb_peft", opts)
    t0 = time.perf_counter()
    dt = compute_dtype(opts)

    def make(_name: str, child: nn.Linear, dtype: torch.dtype) -> nn.Module:
        return bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=dtype,
            quant_type="nf4",
            device="meta",
        )

    model = meta_causal_lm(config, opts, num_layers, make)
    layers = model.config.num_hidden_layers
    # PEFT wraps the layers on the meta device (its adapter moves fail on fake tensors);
    # the whole model is then materialized as fake CPU tensors and the 4-bit state rebuilt.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _quantize_fake(model, dt, opts.blocksize)
        for p in model.parameters():
            p.requires_grad_(False)
        model.is_loaded_in_4bit = (
            True  # what from_pretrained(load_in_4bit=True) sets; PEFT dispatches on it
        )
        targets = list(opts.targets) if opts.targets else "all-linear"
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=opts.r, lora_alpha=opts.lora_alpha, lora_dropout=0.0, target_modules=targets
            ),
        )
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.to_empty(device="cpu")
        _quantize_fake(peft_model, dt, opts.blocksize)
        if opts.checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": True}
            )
            model.enable_input_require_grads()
        peft_model.train()
        static = _static(peft_model)
        with layer_progress(peft_model, on_layer):
            cats, by_module, params = trace_training_step(peft_model, opts, recorder)
    return StepTrace(
        provider="bnb_peft",
        name=name,
        opts=opts,
        layers=layers,
        static=static,
        trainable_numels=tuple(p.numel() for p in params),
        trainable_itemsize=trainable_itemsize(params),
        host_embedding=0,
        host_pinned=0,
        linears=(),  # bitsandbytes dequantizes in its fake kernels: the trace sees it
        cats=cats,
        by_module=by_module,
        seconds=time.perf_counter() - t0,
    )


def profile_bnb_peft(
    config, opts: MemOptions, num_layers: int | None = None, name: str = ""
) -> MemReport:
    """The report of :func:`trace_bnb_peft`."""
    return trace_bnb_peft(config, opts, num_layers, name).report()


def _static(model: nn.Module) -> dict[str, int]:
    import bitsandbytes as bnb

    out = {"base_weights": 0, "quant_state": 0, "lora_params": 0, "other_frozen": 0}
    seen = set()
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = mod.weight
            out["base_weights"] += w.numel() * w.element_size()
            seen.add(id(w))
            qs = w.quant_state
            for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
                out["quant_state"] += t.numel() * t.element_size()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out["lora_params" if p.requires_grad else "other_frozen"] += (
                p.numel() * p.element_size()
            )
    return out
