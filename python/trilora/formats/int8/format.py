"""bitsandbytes' 8-bit (LLM.int8) weights as a :class:`WeightFormat`.

Its kernels: ``trilora::quantize_int8`` / ``dequantize_int8`` and the fused
``trilora::int8_lora_linear_*`` ops (``ops/int8_linear.py``), whose Triton path is the
shared QLoRA kernels of ``kernels/qlora_linear.py`` with ``WEIGHT_FORMAT=1`` (the codes
and row scales decoded tile by tile inside the K loop; ``kernels/int8.py`` holds the
``Weight8bit`` tuple and the gather).

Compute is weight-only: the matmul sees ``codes * SCB / 127`` in the compute dtype and the
activations are never quantized (bitsandbytes' ``Linear8bitLt`` quantizes them to int8 per
row, with fp16 outlier columns above ``llm_int8_threshold``); see docs/int8.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trilora.formats.config import QuantConfig
from trilora.formats.int8.weight import Int8Weight, quantize
from trilora.ops.int8_linear import int8_lora_linear


class FormatInt8:
    """bitsandbytes ``Int8Params`` bytes (see ``docs/architecture.md``, "Quantized formats")."""

    name = "int8"
    weight_type = Int8Weight
    # The codes are sharded by FSDP as int8 rows as they are: a float view would need an
    # even row length and would be cast by mixed precision.
    storage_dtypes = (torch.int8,)

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> Int8Weight:
        return quantize(weight)

    def empty(self, shape, config: QuantConfig, dtype, device) -> Int8Weight:
        n, k = shape
        return Int8Weight(
            codes=torch.zeros((n, k), dtype=torch.int8, device=device),
            scb=torch.zeros(n, dtype=torch.float32, device=device),
            dtype=dtype,
        )

    def owns_state_dict(self, keys, prefix: str = "weight") -> bool:
        module = prefix[: -len("weight")] if prefix.endswith("weight") else prefix + "."
        return f"{module}SCB" in set(keys)

    def from_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight"):
        return Int8Weight.from_state_dict(state_dict, prefix)

    def layer_tensors(self, qw: Int8Weight):
        return qw.codes, {"weight_scb": qw.scb}, {}

    def from_layer_tensors(
        self, storage, buffers: Mapping[str, Any], attributes: Mapping[str, Any], shape, dtype
    ) -> Int8Weight:
        return Int8Weight(codes=storage, scb=buffers["weight_scb"], dtype=dtype)

    def config_of(self, qw: Int8Weight, compute_dtype) -> QuantConfig:
        return QuantConfig(quant_type="int8", compute_dtype=compute_dtype)

    def nbytes(self, shape, config: QuantConfig) -> int:
        n, k = shape
        return n * k + 4 * n

    def linear(self, x, qw, lora_a, lora_b, scale, bias, dropout_p, training) -> torch.Tensor:
        return int8_lora_linear(
            x, qw.codes, qw.scb, lora_a, lora_b, scale, bias, dropout_p=dropout_p, training=training
        )


FORMAT = FormatInt8()
