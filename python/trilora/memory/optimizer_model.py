"""Device and host bytes of each trilora optimizer (``trilora.optim.OPTIMIZERS``).

``trilora mem`` traces a training step with ``torch.optim.AdamW`` and then replaces its state
by the chosen optimizer's, computed here from the trainable tensors' sizes with the same rules
as the optimizer itself:

* state per tensor of ``n`` elements: 8 bytes per element at 32 bits; at 8 bits
  ``2n + 8 * ceil(n / 256)`` (two uint8 codes and two fp32 scales per 256 elements) when
  ``n >= 4096``, else 32-bit;
* ``paging="off"``: all state on the device; ``"auto"`` (``paged_*``): resident while it
  fits, so counted on the device (the upper bound; it pages to the host under pressure);
* ``"host"``: all state in pinned host memory; the device holds two page buffers (at most
  ``page_bytes`` each) while the step streams the pages; ``"uvm"``: managed memory that
  lives on the host, at most two pages on the device during the step;
* offloaded gradients (``*_cpu_offload``): no state and no gradients on the device; on the
  host the state, an fp32 master and an fp32 gradient accumulator per element, and a pinned
  staging copy of each gradient in the parameter's dtype.

This is the one place ``trilora mem`` knows optimizers: the trace (full depth, depth-
extrapolated, or :class:`~trilora.memory.fast.FastProfiler`'s lattice model) calls
:func:`apply` on every report, the search floor calls :func:`device_floor`, the bitsandbytes
+ PEFT baseline runs :func:`baseline_equivalent`, and the per-rank model
(:mod:`trilora.memory.distributed`) calls :func:`optimizer_bytes` over each rank's shards.
Every figure is a sum over tensors (plus, for host paging, two page buffers of the largest
tensor), so it is affine in the number of identical decoder layers, as the depth
extrapolation needs. The step counters are 0-dim CPU tensors in ``trilora.optim``: no
device bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from trilora.optim import OPTIMIZERS
from trilora.optim.blockwise import MIN_8BIT_SIZE
from trilora.optim.paging import DEFAULT_PAGE_BYTES, page_buffer_nbytes, page_elems, state_nbytes

OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
"""Every name ``trilora mem --optimizer`` accepts."""


@dataclass(frozen=True)
class OptimizerBytes:
    """What an optimizer holds for a set of trainable tensors.

    ``device``: optimizer state (and page buffers) on the device. ``host``: state, masters,
    gradient accumulators and staging buffers in host memory. ``gradients_on_device``:
    whether gradients stay on the device until the step (False when offloaded).
    """

    device: int
    host: int
    gradients_on_device: bool


def _bits(numel: int, state_bits: int) -> int:
    return 8 if state_bits == 8 and numel >= MIN_8BIT_SIZE else 32


def state_bytes(numel: int, bits: int) -> int:
    """Bytes of AdamW state for one tensor of ``numel`` elements at ``bits`` (32 or 8)."""
    return state_nbytes(_bits(numel, bits), numel)


def optimizer_bytes(
    name: str, numels: Iterable[int], param_bytes: int = 4, page_bytes: int = DEFAULT_PAGE_BYTES
) -> OptimizerBytes:
    """Device and host bytes of optimizer ``name`` over tensors of ``numels`` elements whose
    dtype has ``param_bytes`` bytes per element."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    settings = OPTIMIZERS[name]
    bits, paging = settings["state_bits"], settings["paging"]
    numels = list(numels)
    state = sum(state_bytes(n, bits) for n in numels)
    if settings.get("offload_gradients"):
        host = state + sum((4 + 4 + param_bytes) * n for n in numels)
        return OptimizerBytes(0, host, gradients_on_device=False)
    if paging in ("off", "auto"):
        return OptimizerBytes(state, 0, gradients_on_device=True)
    # Two buffers of the largest page (a page: a multiple of 256 elements within page_bytes).
    page = max(
        (
            page_buffer_nbytes(b, min(n, page_elems(b, page_bytes)))
            for n in numels
            for b in [_bits(n, bits)]
        ),
        default=0,
    )
    return OptimizerBytes(2 * page, state, gradients_on_device=True)


def offloads_gradients(name: str) -> bool:
    """Whether optimizer ``name`` moves gradients to the host as backward produces them."""
    return bool(OPTIMIZERS[name].get("offload_gradients"))


def apply(
    categories: dict[str, int], name: str, numels: Iterable[int], param_bytes: int = 4
) -> int:
    """Replace the traced optimizer state in ``categories`` (the report's
    ``"optimizer_state"``: the trace steps a ``torch.optim.AdamW``) by optimizer ``name``'s
    device bytes over trainable tensors of ``numels`` elements; returns its host bytes."""
    held = optimizer_bytes(name, numels, param_bytes)
    categories["optimizer_state"] = held.device
    return held.host


def device_floor(name: str, numels: Iterable[int], param_bytes: int = 4) -> int:
    """Device bytes of the gradients plus the optimizer state of trainable tensors of
    ``numels`` elements, before any activation (the floor of a budget search). A gradient
    has its parameter's dtype; an offloaded one never stays on the device."""
    numels = list(numels)
    held = optimizer_bytes(name, numels, param_bytes)
    grads = param_bytes * sum(numels) if held.gradients_on_device else 0
    return grads + held.device


def baseline_equivalent(name: str) -> str:
    """The optimizer a transformers + bitsandbytes + PEFT run would use for ``name``: its
    8-bit or 32-bit AdamW, resident (bitsandbytes' paged optimizers count as resident)."""
    return "adamw_8bit" if OPTIMIZERS[name]["state_bits"] == 8 else "adamw"


__all__ = [
    "OPTIMIZER_NAMES",
    "OptimizerBytes",
    "apply",
    "baseline_equivalent",
    "device_floor",
    "offloads_gradients",
    "optimizer_bytes",
    "state_bytes",
]
