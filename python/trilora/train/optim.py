"""The one place the trainer builds its optimizer and learning-rate schedule.

The names are trilora's AdamW family (:data:`trilora.optim.OPTIMIZERS`: 32- or 8-bit
state, resident, paged, in host or managed memory, or updated on the CPU) plus
``torch_adamw``, PyTorch's own single-tensor AdamW. The loop needs nothing else: it clips
through :func:`clip_gradients`, which uses an optimizer's own ``clip_grad_norm`` when it
has one (optimizers that keep gradients off ``p.grad`` do).
"""

from __future__ import annotations

import math
from typing import Any

import torch

import trilora.distributed as td
from trilora.distributed import clip_grad_norm, unwrap
from trilora.optim import OPTIMIZERS as SETTINGS
from trilora.optim import AdamW
from trilora.optim.errors import OptimizerInputError

__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "clip_gradients", "param_groups"]

from trilora.train.config import OPTIMIZER_CHOICES as OPTIMIZERS

BETAS = (0.9, 0.999)
EPS = 1e-8


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, in ``named_parameters`` order: matrices decay, vectors do not."""

    decay, no_decay = [], []
    for _, p in unwrap(model).named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    name: str, model: torch.nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters (``model`` plain, or
    wrapped by :func:`trilora.train.collectives.wrap`: FSDP2 shards are stepped as they are).

    Under DDP the ``*_cpu_offload`` optimizers run without gradient hooks: a hook would take
    each gradient to the host before DDP averages it across the ranks, so the averaged
    gradients move to the host in ``step()`` instead (the update still runs on the CPU).
    """

    groups = param_groups(model, weight_decay)
    if name == "torch_adamw":
        # foreach=False: the single-tensor path, identical on every device count and order.
        return td.build_optimizer(
            model, torch.optim.AdamW, params=groups, lr=lr, betas=BETAS, eps=EPS, foreach=False
        )

    if name not in SETTINGS:
        raise OptimizerInputError(
            f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}"
        )
    settings = dict(SETTINGS[name])
    info = td.parallel_info(model)
    if info is not None and info.strategy == "ddp" and settings.get("offload_gradients"):
        settings["offload_gradients"] = False
    return td.build_optimizer(model, AdamW, params=groups, lr=lr, betas=BETAS, eps=EPS, **settings)


def clip_gradients(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, max_norm: float
) -> float:
    """Clip to ``max_norm`` (0: only measure) and return the norm before clipping: the norm
    over all ranks (every rank must call it). An optimizer's own ``clip_grad_norm`` is used
    when it has one (optimizers that keep gradients off ``p.grad`` do)."""

    limit = max_norm if max_norm > 0 else float("inf")
    return float(clip_grad_norm(model, limit, optimizer=optimizer, foreach=False))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR before optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup_steps``, then ``kind`` decay (cosine, linear, constant)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, kind)
    )
