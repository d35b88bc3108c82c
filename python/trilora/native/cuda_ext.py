"""trilora's CUDA extension (``csrc/cuda/``): managed memory for ``paging="uvm"`` and the 4-bit
decode GEMV.

``trilora.cuda_ext.load()`` returns the compiled module (built with ninja on first use on a
CUDA machine, once per source version, see :mod:`trilora.native`) or ``None`` (no CUDA device, no toolkit, or a failed
build; one warning says which). Its functions:

* ``managed_zeros(nbytes, device) -> uint8 tensor`` on ``cuda:device`` backed by zeroed
  ``cudaMallocManaged`` memory that prefers the host and is mapped for the device; freed with
  ``cudaFree`` when the tensor dies;
* ``prefetch(tensor, device, stream)``: ``cudaMemPrefetchAsync`` to a device index (``-1``:
  the host) on a raw stream handle (``torch.cuda.Stream.cuda_stream``);
* ``advise(tensor, advice, device)``: ``cudaMemAdvise`` with ``"preferred_location"``,
  ``"accessed_by"`` or ``"read_mostly"``;
* ``concurrent_managed_access(device) -> bool``;
* ``gemv_4bit(...)``: see :func:`trilora.native.gemv.decode_gemv_4bit`.
"""

from __future__ import annotations

from types import ModuleType

from trilora.native import load_extension, unavailable_reason

NAME = "trilora_cuda"
SOURCES = ("cuda/ext.cpp", "cuda/managed.cu", "cuda/gemv_4bit.cu")
CUDA = True
LABEL = "trilora's CUDA extension"
USUAL = "usually a few minutes"


def load() -> ModuleType | None:
    """The compiled extension, or ``None`` when it cannot be built here (one warning)."""
    return load_extension(NAME, SOURCES, cuda=CUDA, label=LABEL, usual=USUAL)


def available() -> bool:
    """Whether :func:`load` returns the extension (builds it on the first call)."""
    return load() is not None


def reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` if it has not failed)."""
    return unavailable_reason(NAME)


__all__ = ["NAME", "SOURCES", "available", "load", "reason"]
