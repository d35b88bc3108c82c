"""bitsandbytes' 8-bit (LLM.int8) weight, byte for byte.

An :class:`Int8Weight` is what ``bitsandbytes.nn.Int8Params`` holds after quantization and
what ``Linear8bitLt`` serializes:

* ``codes``: int8 ``[N, K]``, row-major: ``round(w16[n, k] * (127 / SCB[n]))`` where
  ``w16`` is the weight cast to fp16 (bitsandbytes quantizes through fp16) and the
  product is taken in fp32, rounded half to even;
* ``scb``: fp32 ``[N]``, the absmax of each fp16 row (``SCB``).

Serialized keys for a module prefix ``p``: ``p.weight`` (the codes), ``p.SCB`` and
``p.weight_format`` (uint8 0-d tensor, 0 = "row", the only layout bitsandbytes still
writes or reads). Dequantized value: ``(codes * SCB[row]) * (1/127)`` in fp32, then one
cast, equal to ``bitsandbytes.functional.int8_vectorwise_dequant``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from trilora.formats.config import check_choice
from trilora.ops.int8_linear import dequantize_int8, kernel_weight_int8, quantize_int8

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROW_FORMAT = 0
"""``weight_format`` value of the row-major layout (bitsandbytes' ``"row"``)."""


def _module_prefix(prefix: str) -> str:
    # bitsandbytes stores SCB beside the weight: "<module>.SCB", not "<module>.weight.SCB".
    return prefix[: -len("weight")] if prefix.endswith("weight") else prefix + "."


@dataclass(frozen=True)
class Int8Weight:
    """One ``[N, K]`` weight in bitsandbytes' 8-bit format (see the module docstring).

    Attributes:
        codes: int8 ``[N, K]``.
        scb: fp32 ``[N]``, the row absmax.
        dtype: dtype of the original weight (the default dequantization dtype).
    """

    codes: torch.Tensor
    scb: torch.Tensor
    dtype: torch.dtype = torch.bfloat16

    format_name = "int8"
    """The :mod:`trilora.formats` registry key of this layout."""

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.int8 or self.codes.dim() != 2:
            raise ValueError(
                f"int8 codes must be an int8 [out, in] tensor, got {self.codes.dtype} "
                f"{tuple(self.codes.shape)}"
            )
        if self.scb.dtype != torch.float32 or tuple(self.scb.shape) != (self.codes.shape[0],):
            raise ValueError(
                f"SCB must be float32 [{self.codes.shape[0]}] (one absmax per row), got "
                f"{self.scb.dtype} {tuple(self.scb.shape)}"
            )
        check_choice("dtype", self.dtype, FLOAT_DTYPES)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: one per code plus four per row."""
        return self.codes.numel() + 4 * self.scb.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[N, K]`` in ``dtype`` (default: the original dtype); equal to
        ``bitsandbytes.functional.int8_vectorwise_dequant(codes, SCB).to(dtype)``. float64
        computes ``codes * SCB / 127`` exactly (the reference in tests)."""
        dtype = self.dtype if dtype is None else dtype
        check_choice("dtype", dtype, (*FLOAT_DTYPES, torch.float64))
        return dequantize_int8(self.codes, self.scb, dtype)

    def kernel_args(self):
        """The ``trilora.kernels.int8.Weight8bit`` the Triton launchers take."""
        return kernel_weight_int8(self.codes, self.scb)

    def to(self, device: torch.device | str) -> Int8Weight:
        return replace(self, codes=self.codes.to(device), scb=self.scb.to(device))

    def with_storage(self, storage: torch.dtype) -> Int8Weight:
        """Only int8 storage exists for this format (FSDP shards the int8 rows)."""
        if storage != torch.int8:
            raise ValueError(f"int8 weights are stored as int8, not {storage}")
        return self

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """``Linear8bitLt``'s keys: ``prefix`` (codes), ``<module>.SCB``, ``<module>.weight_format``."""
        module = _module_prefix(prefix)
        return {
            prefix: self.codes,
            f"{module}SCB": self.scb,
            f"{module}weight_format": torch.tensor(ROW_FORMAT, dtype=torch.uint8),
        }

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        prefix: str = "weight",
        dtype: torch.dtype = torch.bfloat16,
    ) -> Int8Weight:
        """Read ``Linear8bitLt`` keys (``weight_format`` optional, must be row-major).

        Raises:
            KeyError: the codes or SCB are missing.
            ValueError: a non-row ``weight_format``, or inconsistent shapes/dtypes.
        """
        module = _module_prefix(prefix)
        missing = [k for k in (prefix, f"{module}SCB") if k not in state_dict]
        if missing:
            raise KeyError(f"8-bit state dict is missing {missing}")
        fmt = state_dict.get(f"{module}weight_format")
        if fmt is not None:
            value = int(fmt.item()) if isinstance(fmt, torch.Tensor) else fmt
            if value not in (ROW_FORMAT, "row"):
                raise ValueError(
                    f"{module}weight_format is {value!r}; only the row-major layout (0) exists "
                    "in bitsandbytes >= 0.45 checkpoints"
                )
        return cls(
            codes=state_dict[prefix].view(torch.int8),
            scb=state_dict[f"{module}SCB"].float(),
            dtype=dtype,
        )

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> Int8Weight:
        """Wrap a quantized ``bitsandbytes.nn.Int8Params`` (codes in ``.data``, ``.SCB``)
        without copying."""
        scb = getattr(weight, "SCB", None)
        if scb is None or weight.dtype != torch.int8:
            raise ValueError(
                "bitsandbytes Int8Params is not quantized (no SCB); move the layer to its "
                "device first, as bitsandbytes quantizes on .to()/.cuda()"
            )
        return cls(codes=weight.data, scb=scb, dtype=dtype)


def quantize(weight: torch.Tensor) -> Int8Weight:
    """Quantize ``[N, K]`` ``weight`` as ``bitsandbytes.nn.Int8Params`` does: same codes,
    same SCB (see the module docstring).

    Raises:
        TypeError: not an fp32/fp16/bf16 tensor.
        ValueError: not 2-D, empty, or non-finite once cast to fp16.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"int8 quantization needs a non-empty 2-D weight, got {tuple(weight.shape)}"
        )
    codes, scb = quantize_int8(weight.detach())
    if weight.device.type != "meta" and not bool(torch.isfinite(scb).all()):
        raise ValueError(
            "weight has values that are NaN/Inf in float16 (|w| > 65504); bitsandbytes' 8-bit "
            "quantization goes through float16"
        )
    return Int8Weight(codes=codes, scb=scb, dtype=weight.dtype)
