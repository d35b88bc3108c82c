"""The contract between a quantized weight format and the rest of trilora.

A format is one folder under ``trilora/formats/`` (``nf4/``, ``int8/``): its weight type
(a frozen dataclass of tensors with the bitsandbytes layout), its quantizer, and a
:class:`WeightFormat` object registered in :mod:`trilora.formats`. Everything above
(``nn.QuantizedLinear``, loading, the PEFT backend, merging, ``trilora mem``, FSDP sharding,
the selfcheck) asks the format through this protocol and never tests for a class.

Layer storage convention (what FSDP and the memory model rely on): a quantized linear holds
its main codes as a frozen ``nn.Parameter`` named ``weight`` (sharded along dim 0 by FSDP)
and the rest of the state as buffers (replicated), named by :meth:`WeightFormat.layer_tensors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from trilora.formats.config import QuantConfig


@runtime_checkable
class QuantizedTensor(Protocol):
    """What every format's weight type offers (``QuantizedWeight``, ``Int8Weight``)."""

    format_name: str
    shape: torch.Size
    dtype: torch.dtype

    @property
    def device(self) -> torch.device: ...

    @property
    def nbytes(self) -> int: ...

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def kernel_args(self) -> Any: ...

    def to(self, device: torch.device | str) -> QuantizedTensor: ...

    def with_storage(self, storage: torch.dtype) -> QuantizedTensor: ...

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]: ...


class WeightFormat(Protocol):
    """One quantized weight format (see the module docstring)."""

    name: str
    storage_dtypes: tuple[torch.dtype, ...]
    """The dtypes the ``weight`` parameter (the codes) may be stored as, same bytes re-viewed
    (:meth:`QuantizedTensor.with_storage`); FSDP keeps one of them (a float one when its
    mixed precision would cast, an integer one only where FSDP2 holds integer parameters)."""

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        """``weight`` ``[out, in]`` float -> the format's weight, as bitsandbytes would."""
        ...

    def empty(
        self,
        shape: tuple[int, int],
        config: QuantConfig,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> QuantizedTensor:
        """Zero-filled state of the right shapes (shells on meta, FakeTensorMode)."""
        ...

    def owns_state_dict(self, keys: list[str], prefix: str = "weight") -> bool:
        """Whether the checkpoint keys under ``prefix`` hold this format's weight."""
        ...

    def from_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight"
    ) -> QuantizedTensor:
        """Read the weight under ``prefix`` (raises KeyError / ValueError)."""
        ...

    def layer_tensors(
        self, qw: QuantizedTensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], dict[str, Any]]:
        """``(weight_storage, buffers, attributes)`` a layer holds for ``qw``."""
        ...

    def from_layer_tensors(
        self,
        storage: torch.Tensor,
        buffers: Mapping[str, torch.Tensor | None],
        attributes: Mapping[str, Any],
        shape: torch.Size,
        dtype: torch.dtype,
    ) -> QuantizedTensor:
        """The inverse of :meth:`layer_tensors` (a view, no copy)."""
        ...

    def config_of(self, qw: QuantizedTensor, compute_dtype: torch.dtype | None) -> QuantConfig:
        """The :class:`QuantConfig` that describes ``qw``."""
        ...

    def nbytes(self, shape: tuple[int, int], config: QuantConfig) -> int:
        """Device bytes of one ``[out, in]`` weight and its state (memory model)."""
        ...

    def linear(
        self,
        x: torch.Tensor,
        qw: QuantizedTensor,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        scale: float,
        bias: torch.Tensor | None,
        dropout_p: float,
        training: bool,
    ) -> torch.Tensor:
        """``x @ W.T + scale * (drop(x) @ lora_a.T) @ lora_b.T + bias`` through the
        format's fused op (``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``)."""
        ...
