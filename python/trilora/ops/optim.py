"""The fused AdamW updates of :class:`trilora.optim.AdamW` on CUDA tensors (or CPU tensors
under the Triton interpreter): the one place the optimizer reaches its kernels
(``kernels/optim.py``), so ``trilora.optim`` stays above ``trilora.ops`` like the modules.

Each call steps a contiguous flat parameter in place with its state; the scalars are those
of :meth:`trilora.optim.blockwise.StepScalars.kernel_args`. The CPU path is the optimizer's
own torch code.
"""

from __future__ import annotations

import torch

__all__ = ["adamw_step_8bit", "adamw_step_32bit"]


def adamw_step_32bit(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    **scalars: float,
) -> None:
    """One AdamW step in place, 32-bit state: ``p`` ``[n]`` fp32/bf16/fp16, ``g`` ``[n]``,
    ``exp_avg`` / ``exp_avg_sq`` ``[n]`` fp32, all contiguous on one device."""
    # The kernel module is imported on the first call: decorating its kernels fixes the
    # Triton backend (TRITON_INTERPRET), and CPU-only training never needs them.
    from trilora.kernels.optim import adamw_step_32bit as launch

    launch(p, g, exp_avg, exp_avg_sq, **scalars)


def adamw_step_8bit(
    p: torch.Tensor,
    g: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    bounds1: torch.Tensor,
    bounds2: torch.Tensor,
    **scalars: float,
) -> None:
    """One AdamW step in place, 8-bit blockwise state (bitsandbytes' layout): ``state1`` /
    ``state2`` ``[n]`` uint8, ``absmax1`` / ``absmax2`` fp32 per block, ``qmap*`` the 256-entry
    dynamic maps and ``bounds*`` their decision boundaries."""
    from trilora.kernels.optim import adamw_step_8bit as launch

    launch(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, bounds1, bounds2, **scalars)
