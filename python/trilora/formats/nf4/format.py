"""The bitsandbytes 4-bit format (NF4 and FP4 share the layout) as a :class:`WeightFormat`.

Its kernels: ``trilora::quantize_4bit`` / ``dequantize_4bit`` (``ops/quantize.py``,
``kernels/quantize.py``) and the fused ``trilora::qlora_linear_*`` ops
(``ops/qlora_linear.py``, ``kernels/qlora_linear.py`` with ``WEIGHT_FORMAT=0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from trilora.formats.config import STORAGE_DTYPES, QuantConfig
from trilora.formats.nf4.weight import QuantizedWeight, code_table, pack_storage, quantize
from trilora.ops.qlora_linear import qlora_linear

# layer buffer name -> QuantizedWeight field
BUFFERS = {
    "weight_absmax": "absmax",
    "weight_quant_map": "code",
    "weight_nested_absmax": "nested_absmax",
    "weight_nested_quant_map": "nested_code",
    "weight_offset": "offset",
}
_QUANT_STATE = ".quant_state.bitsandbytes__"


class Format4bit:
    """bitsandbytes ``Params4bit`` bytes: see ``docs/architecture.md``, "Quantized formats"."""

    name = "4bit"
    weight_type = QuantizedWeight
    storage_dtypes = STORAGE_DTYPES

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
        return quantize(
            weight, config.quant_type, config.blocksize, config.double_quant, config.quant_storage
        )

    def empty(self, shape, config: QuantConfig, dtype, device) -> QuantizedWeight:
        n = math.prod(shape)
        nblocks = -(-n // config.blocksize)
        dq = config.double_quant
        return QuantizedWeight(
            packed=pack_storage(
                torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device), config.quant_storage
            ),
            absmax=torch.zeros(nblocks, dtype=torch.uint8 if dq else torch.float32, device=device),
            code=code_table(config.quant_type, device),
            quant_type=config.quant_type,
            blocksize=config.blocksize,
            shape=torch.Size(shape),
            dtype=dtype,
            nested_absmax=torch.zeros(-(-nblocks // 256), device=device) if dq else None,
            nested_code=torch.zeros(256, device=device) if dq else None,
            offset=torch.zeros((), device=device) if dq else None,
        )

    def owns_state_dict(self, keys, prefix: str = "weight") -> bool:
        return any(k.startswith(prefix + _QUANT_STATE) for k in keys)

    def from_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight"):
        return QuantizedWeight.from_state_dict(state_dict, prefix)

    def layer_tensors(self, qw: QuantizedWeight):
        buffers = {name: getattr(qw, field) for name, field in BUFFERS.items()}
        return qw.packed, buffers, {"quant_type": qw.quant_type, "blocksize": qw.blocksize}

    def from_layer_tensors(
        self, storage, buffers: Mapping[str, Any], attributes: Mapping[str, Any], shape, dtype
    ) -> QuantizedWeight:
        return QuantizedWeight(
            packed=storage,
            quant_type=attributes["quant_type"],
            blocksize=attributes["blocksize"],
            shape=torch.Size(shape),
            dtype=dtype,
            **{field: buffers[name] for name, field in BUFFERS.items()},
        )

    def config_of(self, qw: QuantizedWeight, compute_dtype) -> QuantConfig:
        return QuantConfig(
            quant_type=qw.quant_type,
            blocksize=qw.blocksize,
            double_quant=qw.double_quant,
            compute_dtype=compute_dtype,
            quant_storage=qw.packed.dtype,
        )

    def nbytes(self, shape, config: QuantConfig) -> int:
        n = math.prod(shape)
        nblocks = -(-n // config.blocksize)
        state = nblocks * (1 if config.double_quant else 4) + 16 * 4
        if config.double_quant:
            state += 4 * (-(-nblocks // 256)) + 256 * 4 + 4
        return (n + 1) // 2 + state

    def linear(self, x, qw, lora_a, lora_b, scale, bias, dropout_p, training) -> torch.Tensor:
        return qlora_linear(
            x, qw, lora_a, lora_b, scale, bias, dropout_p=dropout_p, training=training
        )


FORMAT = Format4bit()
