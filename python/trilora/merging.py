"""Merge LoRA adapters into their base weights (the ``trilora merge`` command is
:mod:`trilora.commands.merge`).

Merging dequantizes each 4-bit base weight to fp32, adds ``scale * B @ A`` of every active
adapter in fp32, and casts once to the output dtype: the only rounding is that last cast.
PEFT's 4-bit merge re-quantizes the sum instead, which adds the full NF4 error of the
whole weight; here re-quantized 4-bit output is an explicit option (``requantize=True``,
``--requantize``). See docs/peft.md for measured errors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from transformers import AutoTokenizer

from trilora.io import UserError
from trilora.moe import QuantizedExperts, experts_tensors
from trilora.nn import QuantizedLinear
from trilora.ops.grouped_qlora import peft_expert_factors
from trilora.peft import TriloraExpertsLora, TriloraLoraLayer, patch

__all__ = ["merge", "save_tokenizer", "torch_dtype"]

# --dtype / merge(dtype=...) names -> torch dtype attribute
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` as a torch dtype: a torch dtype, or one of ``bf16``, ``fp16``, ``fp32``,
    ``fp64`` or a torch attribute name (``"bfloat16"``)."""
    if isinstance(dtype, str):
        name = _DTYPES.get(dtype, dtype)
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {name!r}"
            )
    return dtype


def _dequantized_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    out = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
    )
    out.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return out


def _base_weight_fp32(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, QuantizedLinear):
        return layer.dequantized_weight(torch.float32)
    if type(layer) is nn.Linear:
        return layer.weight.detach().float()
    raise TypeError(
        f"cannot merge into a {type(layer).__name__}; patch the model with trilora.patch first"
    )


def _experts_delta(wrapper: TriloraExpertsLora, adapter: str) -> torch.Tensor:
    """fp32 ``scale * B_e @ A_e`` of every expert, in the layout the experts tensor is
    stored in (``[E, out, in]``, or ``[E, in, out]`` when the module stores it transposed)."""
    a, b = peft_expert_factors(
        wrapper.lora_A[adapter].weight.float(),
        wrapper.lora_B[adapter].weight.float(),
        wrapper.num_experts,
    )
    delta = wrapper.scaling[adapter] * torch.bmm(b, a)
    return delta.transpose(1, 2) if wrapper.get_base_layer().is_transposed else delta


def _merge_experts(root: nn.Module, dtype, requantize: bool, adapter_names) -> None:
    """Fold the LoRA of every experts tensor into it (dequantized to fp32, the deltas added
    in fp32, one cast), in place on the experts modules."""
    by_tensor: dict[tuple[int, str], list[TriloraExpertsLora]] = {}
    for module in root.modules():
        if isinstance(module, TriloraExpertsLora):
            key = (id(module.get_base_layer()), module.parameter_name)
            by_tensor.setdefault(key, []).append(module)
    for wrappers in by_tensor.values():
        experts = wrappers[0].get_base_layer()
        name = wrappers[0].parameter_name
        base = getattr(experts, name)
        if isinstance(base, QuantizedExperts):
            weight = base.dequantize(torch.float32)
        else:
            weight = base.detach().float()
        for wrapper in wrappers:
            names = wrapper.active_adapters if adapter_names is None else adapter_names
            for adapter in names:
                if adapter in wrapper.lora_A:
                    weight += _experts_delta(wrapper, adapter).to(weight.device)
        if not torch.isfinite(weight).all():
            raise ValueError(f"merged experts {name} have NaN/Inf values")
        delattr(experts, name)
        if requantize and isinstance(base, QuantizedExperts):
            setattr(
                experts,
                name,
                QuantizedExperts.quantize(weight.to(base.dtype), base.quant_config()),
            )
        else:
            experts.register_parameter(name, nn.Parameter(weight.to(dtype), requires_grad=False))


def _merge_parameter_loras(root: nn.Module, adapter_names) -> None:
    """PEFT's own merge for LoRA on other parameters (an MoE router's weight), in fp32."""
    for module in list(root.modules()):
        if isinstance(module, ParamWrapper) and not isinstance(module, TriloraExpertsLora):
            param = module.get_param()
            param.data = param.data.float()
            module.merge(adapter_names=adapter_names)


def _dequantize_experts(model: nn.Module, dtype) -> None:
    for module in list(model.modules()):
        for name, t in list(experts_tensors(module)):
            if isinstance(t, QuantizedExperts):
                delattr(module, name)
                module.register_parameter(
                    name, nn.Parameter(t.dequantize(torch.float32).to(dtype), requires_grad=False)
                )


def merge(
    peft_model: nn.Module,
    dtype: torch.dtype | str = "bf16",
    requantize: bool = False,
    adapter_names: list[str] | None = None,
) -> nn.Module:
    """Fold the LoRA adapters into the base model and return the plain transformers model.

    Consumes ``peft_model`` (like PEFT's ``merge_and_unload``). Works on a model patched by
    :func:`trilora.patch` (bitsandbytes layers are patched here first).

    Args:
        peft_model: a ``PeftModel`` with LoRA adapters.
        dtype: dtype of the merged weights and of every other floating parameter: a torch
            dtype or its name (``"bf16"``, ``"fp16"``, ``"fp32"``; fp64 for references).
        requantize: re-quantize each merged 4-bit weight into a trilora ``Linear4bit`` with
            the base layer's settings (what PEFT's 4-bit merge does; adds quantization
            error). Layers whose base is 16-bit (an output head) stay 16-bit.
        adapter_names: adapters to merge (default: the active ones).

    Returns:
        The base model: ``nn.Linear`` layers with ``W = dequant(W4) + sum_a s_a B_a A_a``
        (``[out, in]``, ``dtype``), or ``Linear4bit`` layers with ``requantize=True``.
    """
    dtype = torch_dtype(dtype)
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
        if requantize and isinstance(base, QuantizedLinear):
            # The same format and settings as the base (its QuantConfig), asked of the format.
            qw = base.format.quantize(weight.to(base.weight_dtype), base.quant_config)
            merged = QuantizedLinear.from_quantized(qw, None, base.compute_dtype)
            merged.bias = base.bias
        else:
            merged = _dequantized_linear(base, weight, dtype)
        module.base_layer = merged
    _merge_experts(root, dtype, requantize, adapter_names)
    _merge_parameter_loras(root, adapter_names)
    model = peft_model.unload()
    if not requantize:
        _dequantize_experts(model, dtype)
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                model.set_submodule(
                    name,
                    _dequantized_linear(module, module.dequantized_weight(torch.float32), dtype),
                )
        # Cast parameters directly: transformers refuses .to(dtype) on bitsandbytes models,
        # and after the merge this is no longer one.
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for attr in (
            "is_loaded_in_4bit",
            "trilora_quantized_modules",
            "trilora_quantized_experts",
            "quantization_method",
        ):
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


# Files that mark a folder as holding a tokenizer (fast, SentencePiece or BPE vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def save_tokenizer(sources: list[str | Path | None], target: str | Path) -> str | None:
    """Write the tokenizer of the first of ``sources`` that has one into ``target``, so that
    a merged folder loads alone (``AutoTokenizer.from_pretrained(target)``); return that
    source, or None when none has a tokenizer.

    A source is a local folder (used when it holds tokenizer files: a Hugging Face folder,
    one converted from GGUF, an adapter folder ``trilora train`` wrote) or a Hub id. The
    tokenizer is loaded and saved by transformers rather than copied file by file, so the
    folder gets exactly the files ``AutoTokenizer`` reads back (chat template included),
    whatever kind of tokenizer it is. Both ``trilora merge`` and ``trilora train --merge``
    write their tokenizer here.

    Raises:
        trilora.io.UserError: a local folder holds tokenizer files that cannot be read.
    """
    for source in sources:
        if source is None:
            continue
        path = Path(source)
        local = path.exists()
        if local and not any((path / f).is_file() for f in _TOKENIZER_FILES):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as exc:
            if not local:
                continue  # a Hub id that is not reachable: try the next source
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the tokenizer in {source} cannot be read ({first})") from exc
        tokenizer.save_pretrained(str(target))
        return str(source)
    return None
