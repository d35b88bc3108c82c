"""``transformers.Trainer`` support for offloaded gradients (imported on first access)."""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from trilora.optim.adamw import AdamW


def _unwrap(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer (what Trainer callbacks receive) wraps ``.optimizer``.
    seen = 0
    while not isinstance(optimizer, AdamW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 8:
            break
    return optimizer


class OffloadClipCallback(TrainerCallback):
    """Clips the host gradients of an :class:`~trilora.optim.AdamW` with
    ``offload_gradients=True`` (e.g. :class:`~trilora.optim.CPUOffloadAdamW`) for
    ``transformers.Trainer``.

    The Trainer clips with ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``,
    which sees ``p.grad is None`` for offloaded gradients: it clips nothing and logs a
    ``grad_norm`` of 0. This callback clips at ``args.max_grad_norm`` in
    ``on_pre_optimizer_step`` (after the Trainer's no-op clip, before the step) and writes
    the true norm into the logged ``grad_norm`` (``trainer.state.log_history`` and the
    callbacks after this one; callbacks earlier in the list, such as the console printer,
    see the Trainer's 0.0). Without offloaded gradients it does nothing: the Trainer's own
    clipping works.

    Usage: ``Trainer(..., optimizers=(CPUOffloadAdamW(...), None),
    callbacks=[OffloadClipCallback()])``.
    """

    def __init__(self) -> None:
        self.last_grad_norm: float | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if not isinstance(opt, AdamW):
            raise TypeError(
                "OffloadClipCallback needs the Trainer's optimizer to be a trilora.optim.AdamW "
                f"(e.g. CPUOffloadAdamW), got {type(opt).__name__}"
            )
        if not opt.offload_gradients:
            return
        max_norm = args.max_grad_norm
        # max_grad_norm <= 0 or None: the Trainer only logs the norm; so do we.
        max_norm = max_norm if max_norm is not None and max_norm > 0 else math.inf
        self.last_grad_norm = float(opt.clip_grad_norm(max_norm))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.last_grad_norm is None or logs is None or "grad_norm" not in logs:
            return
        logs["grad_norm"] = self.last_grad_norm
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "grad_norm" in last:
            last["grad_norm"] = self.last_grad_norm


__all__ = ["OffloadClipCallback"]
