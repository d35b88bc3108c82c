"""What :class:`trilora.optim.AdamW` keeps for each parameter (:class:`Slot`), shared by the
optimizer and its host-update part (:mod:`trilora.optim.host_update`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trilora.optim.paging import SlotState
from trilora.optim.tensors import local_tensor

__all__ = ["Slot"]


@dataclass(eq=False)
class Slot:
    """One parameter ``param`` and everything the optimizer keeps for it.

    ``numel`` / ``shape``: of the local tensor (the shard of a DTensor). ``bits``: of its
    state (8 only for ``state_bits=8`` and at least ``min_8bit_size`` elements in the whole
    tensor). Host-update mode (offloaded gradients, :class:`CPUOffloadAdamW`) adds:
    ``master`` fp32 ``shape`` (pinned for CUDA parameters), the value the update steps;
    ``grad`` fp32 ``shape``, the host gradient (accumulator when offloading, pinned D2H
    target otherwise); ``staging``, pinned ``param.dtype``, the target of an offloaded CUDA
    gradient's asynchronous copy, folded into ``grad`` once ``event`` completed; ``synced``,
    the parameter's stamp when ``master`` last matched it.
    """

    param: torch.Tensor
    index: int
    numel: int
    shape: torch.Size
    bits: int
    state: SlotState | None = None
    master: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    staging: torch.Tensor | None = None
    event: Any = None
    pending: bool = False
    has_grad: bool = False
    # The last step consumed ``grad``: torch would still have a ``p.grad`` here, which a
    # ``zero_grad(set_to_none=False)`` turns into a zero gradient that steps the parameter.
    consumed: bool = False
    synced: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        return local_tensor(self.param).device
