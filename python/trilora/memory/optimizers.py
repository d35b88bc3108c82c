"""The optimizer side of the memory model: what each ``trilora mem --optimizer`` mode keeps
where.

This is the one place that knows optimizers. A mode is an :class:`OptimizerModel`: the
optimizer the trace actually runs (its state is then allocated for real on fake tensors),
whether gradients stay on the device until the step, and the device and host bytes that
replace the traced state. To add a mode, add an entry to :data:`MODELS` (and its help text
shows up in ``trilora mem --help``); the trace, the search floor (:func:`device_bytes_floor`)
and the report all read it from here.

The module imports no torch at module level: the CLI reads :data:`OPTIMIZERS` to build its
parser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Bytes of one fp32 value: LoRA parameters, their gradients and AdamW's moments are fp32.
FP32 = 4
# trilora.optim.CPUOffloadAdamW keeps, per LoRA parameter, an fp32 master, an fp32 gradient
# accumulator, a pinned staging copy of the gradient and the two fp32 moments in host memory.
CPU_OFFLOAD_HOST_BYTES_PER_PARAM = 5 * FP32


def _adamw_state(n: int) -> int:
    # exp_avg and exp_avg_sq in fp32 (the step counters are scalars, traced as they are)
    return 2 * FP32 * n


def _paged_8bit_state(n: int) -> int:
    # bitsandbytes 8-bit Adam: two uint8 states per parameter plus one fp32 absmax per
    # 256-value block for each; paged, so under pressure it can be evicted to host memory.
    # Counted as resident (the worst case).
    return 2 * n + 2 * FP32 * math.ceil(n / 256)


@dataclass(frozen=True)
class OptimizerModel:
    """How one optimizer mode is traced and accounted.

    Attributes:
        name: the ``--optimizer`` value.
        help: one line for ``trilora mem --help``.
        gradients_on_device: False when gradients leave the device from post-accumulate
            hooks during backward (the trace then drops each one as soon as it is complete).
        traced_state: True when the traced AdamW's own state (fp32 moments, allocated on
            fake tensors) is what the device holds; False when :meth:`device_state`
            replaces it.
        baseline: the mode bitsandbytes + PEFT runs for this one (they have no CPU offload).
    """

    name: str
    help: str
    gradients_on_device: bool = True
    traced_state: bool = True
    baseline: str = ""

    def device_state(self, n: int) -> int:
        """Device bytes of the optimizer state for ``n`` trainable (fp32) parameters."""
        if self.name == "paged_adamw_8bit":
            return _paged_8bit_state(n)
        if self.name == "adamw_cpu_offload":
            return 0
        return _adamw_state(n)

    def host_bytes(self, n: int) -> int:
        """Host bytes the optimizer keeps for ``n`` trainable parameters."""
        return CPU_OFFLOAD_HOST_BYTES_PER_PARAM * n if self.name == "adamw_cpu_offload" else 0

    def baseline_mode(self) -> str:
        return self.baseline or self.name


MODELS: dict[str, OptimizerModel] = {
    m.name: m
    for m in (
        OptimizerModel("adamw", "torch AdamW, fp32 moments on the device (default)"),
        OptimizerModel(
            "adamw_cpu_offload",
            "trilora.optim.CPUOffloadAdamW: state and gradients in host memory",
            gradients_on_device=False,
            traced_state=False,
            baseline="adamw",
        ),
        OptimizerModel(
            "paged_adamw_8bit",
            "bitsandbytes' paged 8-bit AdamW (estimate: 2 bytes per parameter, resident)",
            traced_state=False,
        ),
    )
}
OPTIMIZERS = tuple(MODELS)


def get(name: str) -> OptimizerModel:
    """The model of optimizer mode ``name``; ValueError naming the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}") from None


def make_optimizer(params, name: str):
    """The optimizer whose state the trace allocates: AdamW with fp32 states, multi-tensor
    (``foreach``) as on CUDA, for every mode.

    Modes whose device state differs (8-bit, CPU offload) replace the traced state in
    :func:`apply` after the trace; a mode that moves gradients off the device during
    backward says so with ``gradients_on_device=False``.
    """
    import torch

    get(name)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def apply(categories: dict[str, int], n_params: int, name: str) -> int:
    """Replace the traced optimizer state in ``categories`` by mode ``name``'s; returns its
    host bytes. ``n_params``: trainable parameters (all fp32)."""
    model = get(name)
    if not model.traced_state:
        categories["optimizer_state"] = model.device_state(n_params)
    return model.host_bytes(n_params)


def device_bytes_floor(name: str, trainable_bytes: int, n_params: int) -> int:
    """Device bytes of gradients plus optimizer state, before any activation (the search's
    floor). ``trainable_bytes``: bytes of the fp32 LoRA parameters."""
    model = get(name)
    grads = trainable_bytes if model.gradients_on_device else 0
    return grads + model.device_state(n_params)
