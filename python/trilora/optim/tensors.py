"""Small tensor helpers shared by the optimizer modules: FSDP2 DTensors seen through their
local shard, version stamps, gradient checks."""

from __future__ import annotations

import functools
from typing import Any

import torch

from trilora.optim.errors import ParameterTypeError


@functools.lru_cache(maxsize=1)
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch.distributed unavailable
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def version_counter(t: torch.Tensor) -> int | None:
    """``t``'s in-place write counter, or None where torch no longer exposes it.

    The compatibility point for ``Tensor._version``, which autograd keeps on every tensor
    (torch 2.11 to the newest release) but has no public name.
    """
    version = getattr(t, "_version", None)
    return version if isinstance(version, int) else None


def stamp(t: torch.Tensor) -> tuple[int, int] | None:
    """A value that changes whenever ``t`` (its local shard) is written from outside, or None.

    The version counter moves on every in-place write (copy_, load_state_dict, fill_); the
    data pointer moves when ``p.data`` is rebound (e.g. ``model.to(...)``). None where there
    is no version counter (:func:`version_counter`): callers then compare values instead.
    """
    t = local_tensor(t)
    version = version_counter(t)
    return None if version is None else (version, t.data_ptr())


def check_grad(grad: torch.Tensor, owner: str) -> None:
    if grad.layout != torch.strided:
        raise ParameterTypeError(
            f"{owner} does not support sparse gradients (got layout {grad.layout}); use "
            "torch.optim.SparseAdam or a dense embedding"
        )


__all__ = ["check_grad", "is_dtensor", "local_tensor", "stamp", "version_counter"]
