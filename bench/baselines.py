"""The bitsandbytes + PEFT counterparts of trilora layers, on the very same 4-bit bytes.

The demo, the tests and the benchmarks compare trilora with what users run today; this
module builds that baseline from a trilora layer so both sides share the packed weight and
the LoRA factors exactly. Imports bitsandbytes and PEFT lazily: they are baseline
dependencies, never runtime ones.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from trilora.nn import Linear4bit, QLoraLinear


def bnb_linear4bit(layer: Linear4bit, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``layer``'s packed bytes and state (no
    re-quantization) and a copy of its bias."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    qw = layer.quantized_weight()
    sd = qw.to_state_dict("weight")
    state = QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}, device=qw.device
    )
    base = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        compute_dtype=compute_dtype if compute_dtype is not None else layer.compute_dtype,
        quant_type=qw.quant_type,
        quant_storage=qw.packed.dtype,
        device=qw.device,
    )
    base.weight = bnb.nn.Params4bit(
        qw.packed,
        requires_grad=False,
        quant_state=state,
        bnb_quantized=True,
        quant_type=qw.quant_type,
        blocksize=qw.blocksize,
        quant_storage=qw.packed.dtype,
    )
    if layer.bias is not None:
        base.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return base


def peft_lora_over_bnb(layer: QLoraLinear, compute_dtype: torch.dtype | None = None):
    """PEFT's LoRA layer over :func:`bnb_linear4bit` with ``layer``'s LoRA factors copied.

    Returns ``(peft_model, lora_layer)``: a one-module ``PeftModel`` and its LoRA layer
    (``lora_layer.lora_A["default"].weight`` etc.).
    """

    model = nn.Sequential()
    model.add_module("proj", bnb_linear4bit(layer, compute_dtype))
    config = LoraConfig(
        r=layer.r,
        lora_alpha=layer.lora_alpha,
        lora_dropout=layer.lora_dropout,
        use_rslora=layer.use_rslora,
        target_modules=["proj"],
    )
    peft_model = get_peft_model(model, config)
    lora = peft_model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.lora_A)
        lora.lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model, lora
