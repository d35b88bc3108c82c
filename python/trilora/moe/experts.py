"""One experts tensor of a mixture-of-experts layer, quantized expert by expert.

transformers 5 keeps an MoE layer's experts as fused 3-D parameters, ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (gpt-oss stores each matrix transposed). A
:class:`QuantizedExperts` replaces one of them: expert ``e``'s matrix ``[rows, cols]`` (as
the 3-D parameter stores it) is quantized on its own, so its codes and state are exactly
what ``bitsandbytes.functional.quantize_4bit`` (or bitsandbytes' LLM.int8 quantizer) gives
for that matrix. The E weights are stacked along a leading experts dimension:

* the codes are the frozen ``nn.Parameter`` ``weight`` ``[E, *storage]`` (FSDP shards it
  along the experts, as it shards a linear's rows);
* the rest of each expert's state is a buffer ``[E, *state]`` with the format's buffer name;
* :meth:`expert` returns expert ``e``'s weight object, a view (no copy).

``state_dict()`` writes each expert as bitsandbytes writes a linear layer named
``<param>.<e>``: ``<param>.<e>.weight``, ``<param>.<e>.weight.absmax``, ... (4-bit) or
``<param>.<e>.weight`` / ``.SCB`` / ``.weight_format`` (int8), so every expert matrix can
be read back (and checked) with bitsandbytes' own deserializer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from trilora.formats import (
    QuantConfig,
    QuantizedTensor,
    format_for_state_dict,
    format_of,
    get_format,
)
from trilora.nn import restore_quantized_dtypes

__all__ = ["QuantizedExperts"]


class QuantizedExperts(nn.Module):
    """E quantized matrices ``[rows, cols]``: one 3-D experts parameter ``[E, rows, cols]``.

    The module stands where the 3-D parameter stood (``experts.gate_up_proj``), so code that
    reads the parameter's geometry (PEFT's ``target_parameters``) finds :attr:`shape`,
    :attr:`ndim` and :attr:`dtype` as it would on the tensor. It has no forward: the MoE
    layer's experts implementation (:mod:`trilora.moe.forward`) multiplies by it through
    :func:`trilora.ops.grouped_qlora.grouped_lora_linear`.
    """

    def __init__(self, experts: list[QuantizedTensor]) -> None:
        super().__init__()
        self._set_experts(experts)

    def _set_experts(self, experts: list[QuantizedTensor]) -> None:
        if not experts:
            raise ValueError("QuantizedExperts needs at least one expert")
        fmt = format_of(experts[0])
        shape = tuple(experts[0].shape)
        if len(shape) != 2:
            raise ValueError(f"each expert must be a 2-D matrix, got shape {shape}")
        for e, qw in enumerate(experts):
            if format_of(qw) is not fmt or tuple(qw.shape) != shape:
                raise ValueError(
                    f"expert {e} is a {qw.format_name} {tuple(qw.shape)} weight; expert 0 is "
                    f"a {fmt.name} {shape} weight"
                )
        self.format_name = fmt.name
        self.num_experts = len(experts)
        self.rows, self.cols = shape
        self.weight_dtype = experts[0].dtype
        parts = [fmt.layer_tensors(qw) for qw in experts]
        self._format_attributes = dict(parts[0][2])
        self.weight = nn.Parameter(torch.stack([p[0] for p in parts]), requires_grad=False)
        self._buffers.clear()
        for name in parts[0][1]:
            values = [p[1][name] for p in parts]
            self.register_buffer(name, None if values[0] is None else torch.stack(values))

    # --- construction -------------------------------------------------------------------

    @classmethod
    def quantize(cls, weight: torch.Tensor, config: QuantConfig) -> QuantizedExperts:
        """Quantize a float ``[E, rows, cols]`` experts tensor, expert by expert, in
        ``config``'s format (one expert's float temporaries at a time)."""
        if weight.dim() != 3:
            raise ValueError(f"an experts tensor is 3-D [E, rows, cols], got {tuple(weight.shape)}")
        fmt = get_format(config)
        return cls([fmt.quantize(weight[e].detach(), config) for e in range(weight.shape[0])])

    @classmethod
    def shell(
        cls,
        num_experts: int,
        rows: int,
        cols: int,
        config: QuantConfig,
        weight_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> QuantizedExperts:
        """Zero-filled state of the right shapes (for loading, the meta device, tracing)."""
        fmt = get_format(config)
        one = fmt.empty((rows, cols), config, weight_dtype, device)
        return cls([one] * num_experts)

    # --- geometry, as the 3-D parameter had it -------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """``[E, rows, cols]``, the shape of the experts parameter this module replaced."""
        return torch.Size([self.num_experts, self.rows, self.cols])

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the experts were quantized from (what dequantization returns)."""
        return self.weight_dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def format(self):
        """This tensor's :class:`~trilora.formats.base.WeightFormat`."""
        return get_format(self.format_name)

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes and all quantization state of the E experts."""
        return sum(t.numel() * t.element_size() for _, t in self._quantized_tensors())

    # --- access -------------------------------------------------------------------------

    def expert(self, e: int) -> QuantizedTensor:
        """Expert ``e``'s weight ``[rows, cols]`` as its format's weight object (a view)."""
        buffers = {name: (None if t is None else t[e]) for name, t in self._buffers.items()}
        return self.format.from_layer_tensors(
            self.weight.data[e],
            buffers,
            self._format_attributes,
            torch.Size([self.rows, self.cols]),
            self.weight_dtype,
        )

    def grouped_operands(self) -> tuple[str, list[torch.Tensor | None], int]:
        """What :func:`trilora.ops.grouped_qlora.grouped_lora_linear` takes (views, no copy):
        ``("4bit", [codes, absmax, quant_map, nested_absmax, nested_quant_map, offset],
        blocksize)`` or ``("int8", [codes, SCB], 0)``, each tensor ``[E, ...]``."""
        b = self._buffers
        if self.format_name == "4bit":
            names = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
            state = [b.get(f"weight_{n}") for n in names]
            return "4bit", [self.weight.data, *state], int(self._format_attributes["blocksize"])
        if self.format_name == "int8":
            return "int8", [self.weight.data, b["weight_scb"]], 0
        raise ValueError(f"no grouped product for {self.format_name} experts")

    def experts(self) -> Iterator[QuantizedTensor]:
        """Every expert's weight object, in order."""
        return (self.expert(e) for e in range(self.num_experts))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full ``[E, rows, cols]`` tensor (merging, references: never on the hot path)."""
        return torch.stack([qw.dequantize(dtype) for qw in self.experts()])

    def quant_config(self, compute_dtype: torch.dtype | None = None) -> QuantConfig:
        """The :class:`~trilora.formats.QuantConfig` of the experts."""
        return self.format.config_of(self.expert(0), compute_dtype)

    def set_storage(self, storage: torch.dtype) -> None:
        """Re-view every expert's codes as ``storage`` (one of the format's
        ``storage_dtypes``), in place: the same bytes, no arithmetic, as
        :meth:`QuantizedTensor.with_storage <trilora.formats.base.QuantizedTensor.with_storage>`
        does for one expert. ``weight`` becomes ``[E, *one expert's storage in storage]``
        (4-bit: ``[ceil(bytes / itemsize), 1]``, padded per expert); the state buffers are
        unchanged. FSDP2 uses it to store the codes in its mixed-precision dtype, which it
        then never casts (:func:`trilora.distributed.match_storage`).

        Raises:
            ValueError: the format cannot store its codes as ``storage``.
        """
        if storage not in self.format.storage_dtypes:
            raise ValueError(
                f"{self.format_name} experts are stored as one of {self.format.storage_dtypes}, "
                f"not {storage}"
            )
        if self.weight.dtype != storage:
            self._set_experts([qw.with_storage(storage) for qw in self.experts()])

    def _quantized_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "weight", self.weight.data
        for name, t in self._buffers.items():
            if t is not None:
                yield name, t

    # --- torch plumbing -----------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the quantized state but never cast it: a cast would
        # reinterpret packed bytes and round the scales (as QuantizedLinear does).
        frozen = dict(self._quantized_tensors())
        super()._apply(fn, recurse)
        restore_quantized_dtypes(self, frozen)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for e, qw in enumerate(self.experts()):
            for key, value in qw.to_state_dict(f"{prefix}{e}.weight").items():
                destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        experts = []
        for e in range(self.num_experts):
            head = f"{prefix}{e}."
            own = {k: v for k, v in state_dict.items() if k.startswith(head)}
            fmt = format_for_state_dict(own, f"{head}weight")
            if fmt is None:
                if strict:
                    missing_keys.append(f"{head}weight")
                return
            try:
                experts.append(fmt.from_state_dict(own, f"{head}weight"))
            except (KeyError, ValueError) as exc:
                error_msgs.append(f"while loading {head}weight: {exc}")
                return
        loaded = QuantizedExperts(experts)
        if loaded.shape != self.shape:
            error_msgs.append(
                f"{prefix} holds experts {tuple(loaded.shape)}, expected {self.shape}"
            )
            return
        self._set_experts([qw.to(self.device) for qw in loaded.experts()])

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, rows={self.rows}, cols={self.cols}, "
            f"format={self.format_name}"
        )
