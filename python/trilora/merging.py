"""Merge LoRA adapters into their base weights, and the ``trilora merge`` command.

Merging dequantizes each 4-bit base weight to fp32, adds ``scale * B @ A`` of every active
adapter in fp32, and casts once to the output dtype: the only rounding is that last cast.
PEFT's 4-bit merge re-quantizes the sum instead, which adds the full NF4 error of the
whole weight; here re-quantized 4-bit output is an explicit option (``requantize=True``,
``--requantize``). See docs/peft.md for measured errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

__all__ = ["add_parser", "merge", "run"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dequantized_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    out = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
    )
    out.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return out


def _base_weight_fp32(layer: nn.Module) -> torch.Tensor:
    from trilora.nn import Linear4bit

    if isinstance(layer, Linear4bit):
        return layer.dequantized_weight(torch.float32)
    if type(layer) is nn.Linear:
        return layer.weight.detach().float()
    raise TypeError(
        f"cannot merge into a {type(layer).__name__}; patch the model with trilora.patch first"
    )


def merge(peft_model: nn.Module, dtype: torch.dtype = torch.bfloat16, requantize: bool = False,
          adapter_names: list[str] | None = None) -> nn.Module:  # fmt: skip
    """Fold the LoRA adapters into the base model and return the plain transformers model.

    Consumes ``peft_model`` (like PEFT's ``merge_and_unload``). Works on a model patched by
    :func:`trilora.patch` (bitsandbytes layers are patched here first).

    Args:
        peft_model: a ``PeftModel`` with LoRA adapters.
        dtype: dtype of the merged weights and of every other floating parameter
            (bf16, fp16, fp32; fp64 for references).
        requantize: re-quantize each merged weight into a trilora ``Linear4bit`` with the
            base layer's settings (what PEFT's 4-bit merge does; adds quantization error).
        adapter_names: adapters to merge (default: the active ones).

    Returns:
        The base model: ``nn.Linear`` layers with ``W = dequant(W4) + sum_a s_a B_a A_a``
        (``[out, in]``, ``dtype``), or ``Linear4bit`` layers with ``requantize=True``.
    """
    from trilora.nn import Linear4bit
    from trilora.peft import TriloraLoraLayer, patch
    from trilora.quant import quantize

    if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be bf16, fp16, fp32 or fp64, got {dtype}")
    patch(peft_model)
    root = peft_model.base_model.model
    for name, module in list(root.named_modules()):
        if not isinstance(module, TriloraLoraLayer):
            continue
        base = module.get_base_layer()
        names = module.active_adapters if adapter_names is None else adapter_names
        weight = _base_weight_fp32(base)
        for adapter in names:
            if adapter in module.lora_A:
                weight += module.get_delta_weight(adapter).to(weight.device)
        if not torch.isfinite(weight).all():
            raise ValueError(f"merged weight of {name} has NaN/Inf values")
        if requantize:
            qw = quantize(weight.to(base.weight_dtype), base.quant_type, base.blocksize,
                          base.weight_nested_absmax is not None, base.weight.dtype)  # fmt: skip
            merged = Linear4bit.from_quantized(qw, None, base.compute_dtype)
            merged.bias = base.bias
        else:
            merged = _dequantized_linear(base, weight, dtype)
        module.base_layer = merged
    model = peft_model.unload()
    if not requantize:
        for name, module in list(model.named_modules()):
            if isinstance(module, Linear4bit):
                model.set_submodule(
                    name,
                    _dequantized_linear(module, module.dequantized_weight(torch.float32), dtype),
                )
        # Cast parameters directly: transformers refuses .to(dtype) on bitsandbytes models,
        # and after the merge this is no longer one.
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for attr in ("is_loaded_in_4bit", "trilora_quantized_modules", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = dtype
    else:
        for _, p in model.named_parameters():
            if p.is_floating_point() and p.dtype != dtype and p.numel():
                p.data = p.data.to(dtype)
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    """Register ``trilora merge ADAPTER_DIR --base BASE --out DIR``."""
    p = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and write a standard checkpoint",
        description="Dequantize the 4-bit base, add the LoRA delta in fp32 and write safetensors "
        "that plain transformers loads (atomically). --requantize writes a bitsandbytes 4-bit "
        "checkpoint instead (adds quantization error, see docs/peft.md).",
    )
    p.add_argument("adapter_dir", help="directory written by PeftModel.save_pretrained")
    p.add_argument(
        "--base", required=True, help="base model directory or Hub id (full precision or bnb 4-bit)"
    )
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="merged weight dtype")
    p.add_argument(
        "--requantize", action="store_true", help="write a re-quantized 4-bit checkpoint"
    )
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4",
                   help="how the base was quantized during training (full-precision bases only)")  # fmt: skip
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``trilora merge``; returns the exit status."""
    from peft import PeftModel

    from trilora.loading import atomic_directory, from_pretrained, save_quantized

    dtype = _DTYPES[args.dtype]
    adapter = Path(args.adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter} has no adapter_config.json (expected a PEFT adapter directory)"
        )
    base = from_pretrained(
        args.base, quant_type=args.quant_type, blocksize=args.blocksize,
        double_quant=not args.no_double_quant, compute_dtype=torch.float32, device="cpu", dtype=dtype,
    )  # fmt: skip
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    model = merge(peft_model, dtype=dtype, requantize=args.requantize)
    if args.requantize:
        save_quantized(model, args.out)
    else:
        with atomic_directory(args.out) as tmp:
            model.save_pretrained(tmp)
    print(f"merged {adapter} into {args.base} -> {args.out}")
    return 0
