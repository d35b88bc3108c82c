"""Optimizers for wrapped models: any optimizer on FSDP2's sharded parameters, global clipping.

FSDP2's parameters are ``DTensor`` shards. torch's and trilora's optimizers step them
directly, but an optimizer written for plain tensors (a third-party one, or trilora's own
asked to treat shards as plain tensors) cannot. :class:`ShardedOptimizer` runs such an
optimizer on each rank's *local shard*:

* the inner optimizer gets one plain leaf tensor per parameter that aliases the storage of
  the local shard, so its in-place update is the update of the shard;
* before each step the shard's gradient (the local part of the reduce-scattered
  ``DTensor`` gradient) is handed to the alias as its ``.grad``;
* ``param_groups`` hold the ``DTensor`` parameters and the hyperparameters, so LR
  schedulers work unchanged; their values are copied into the inner groups at each step;
* ``state_dict()`` returns the inner state with every per-element tensor (same shape as the
  shard) wrapped back into a ``DTensor`` of the parameter's layout, which is what lets
  ``torch.distributed.checkpoint`` reshard it (see :func:`trilora.distributed.save_state`).

Elementwise optimizers (AdamW and its relatives) are exactly the same on shards as on full
tensors. Gradient clipping needs the norm over all ranks: use :func:`clip_grad_norm`.

torch's optimizers and trilora's own (:mod:`trilora.optim`, which keeps its state sharded
like the ``DTensor`` parameters) need no adapter. Under DDP every rank holds full
parameters, so any optimizer works as is, with one exception handled by
:func:`build_optimizer`: ``CPUOffloadAdamW(offload_gradients=True)`` would move each
gradient to the host from a post-accumulate hook, *before* DDP averages it across ranks, so
under DDP it runs with ``offload_gradients=False`` (gradients move to the host in
``step()``, after the all-reduce).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trilora.distributed.sharding import parallel_info, unwrap
from trilora.io import UserError

__all__ = ["ShardedOptimizer", "build_optimizer", "clip_grad_norm"]


def _is_dtensor(t: Any) -> bool:

    return isinstance(t, DTensor)


def _local_alias(p: torch.Tensor) -> torch.Tensor:
    # Under no_grad, to_local() returns the shard itself; detach() shares its storage and
    # version counter, so writes through the shard are visible to the optimizer and back.
    with torch.no_grad():
        local = p.to_local() if _is_dtensor(p) else p
    alias = local.detach()
    alias.requires_grad_(True)
    return alias


class ShardedOptimizer(torch.optim.Optimizer):
    """Run ``optimizer_class`` (written for plain tensors) on the local shards of ``params``.

    Args:
        params: the model's trainable parameters (``DTensor`` shards under FSDP2; plain
            tensors pass through unchanged), or param-group dicts of them.
        optimizer_class: e.g. :class:`trilora.optim.CPUOffloadAdamW`.
        **kwargs: the optimizer's hyperparameters (``lr``, ``betas``, ...), defaults for
            every group.

    ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` behave as the inner
    optimizer's; ``inner`` is the inner optimizer. Build it after the model is wrapped and
    materialized (the aliases point at the shards' storage).
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: Callable[..., torch.optim.Optimizer],
        **kwargs: Any,
    ) -> None:
        self._aliases: dict[int, torch.Tensor] = {}
        self._overrides: list[dict[str, Any]] = []
        super().__init__(params, dict(kwargs))
        groups = [
            {"params": [self._aliases[id(p)] for p in group["params"]], **overrides}
            for group, overrides in zip(self.param_groups, self._overrides)
        ]
        self.inner = optimizer_class(groups, **kwargs)
        # The inner optimizer decides what a hyperparameter is: constructor switches such
        # as offload_gradients are not, and must not travel in the groups.
        self.defaults = dict(self.inner.defaults)
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            self._adopt(group, inner)

    @staticmethod
    def _adopt(group: dict[str, Any], inner: dict[str, Any]) -> None:
        for key in [k for k in group if k != "params" and k not in inner]:
            del group[key]
        for key, value in inner.items():
            if key != "params":
                group[key] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        overrides = {k: v for k, v in param_group.items() if k != "params"}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._aliases[id(p)] = _local_alias(p)
        self._overrides.append(overrides)
        if "inner" in self.__dict__:
            self.inner.add_param_group(
                {"params": [self._aliases[id(p)] for p in group["params"]], **overrides}
            )
            self._adopt(group, self.inner.param_groups[-1])

    def _sync_hparams(self) -> None:
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            for key, value in group.items():
                if key != "params":
                    inner[key] = value

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Hand each shard's gradient to its alias, then step the inner optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is not None and _is_dtensor(grad):
                    grad = grad.to_local()
                self._aliases[id(p)].grad = grad
        self._sync_hparams()
        try:
            self.inner.step()
        finally:
            for alias in self._aliases.values():
                alias.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with per-element state as ``DTensor`` shards."""

        self._sync_hparams()  # a scheduler may have changed the outer groups since the step
        sd = self.inner.state_dict()
        params = self._params()
        state = {}
        for index, entry in sd["state"].items():
            p = params[index]
            local_shape = self._aliases[id(p)].shape
            out = {}
            for key, value in entry.items():
                if (
                    _is_dtensor(p)
                    and isinstance(value, torch.Tensor)
                    and value.shape == local_shape
                ):
                    value = DTensor.from_local(
                        value,
                        p.device_mesh,
                        p.placements,
                        run_check=False,
                        shape=p.shape,
                        stride=p.stride(),
                    )
                out[key] = value
            state[index] = out
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (``DTensor`` entries become their local shards)."""
        state = {
            index: {k: (v.to_local() if _is_dtensor(v) else v) for k, v in entry.items()}
            for index, entry in state_dict["state"].items()
        }
        self.inner.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            self._adopt(group, inner)

    def __getattr__(self, name: str) -> Any:
        # host_memory(), host_bytes, ... of the inner optimizer
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _trainable(model: nn.Module) -> list[torch.Tensor]:

    return [p for p in unwrap(model).parameters() if p.requires_grad]


def _steps_dtensors(optimizer_class: Any) -> bool:
    # torch's optimizers and trilora.optim's AdamW family step DTensor shards themselves
    # (trilora.optim keeps their state sharded like the parameters).
    return getattr(optimizer_class, "__module__", "").startswith(("torch.optim", "trilora.optim"))


def _offloads_gradients(optimizer_class: Any, kwargs: dict[str, Any]) -> bool | None:
    """The ``offload_gradients`` the optimizer would use (None: it has no such switch)."""

    try:
        param = inspect.signature(optimizer_class).parameters.get("offload_gradients")
    except (TypeError, ValueError):
        return None
    if param is None:
        return None
    return bool(kwargs.get("offload_gradients", param.default))


def build_optimizer(
    model: nn.Module,
    optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    params: Iterable[Any] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer for a (possibly wrapped) model's trainable parameters.

    * plain model: ``optimizer_class(params, **kwargs)``;
    * DDP: the same, but an optimizer that offloads gradients from post-accumulate hooks
      (:class:`~trilora.optim.CPUOffloadAdamW`, ``offload_gradients=True``) would take each
      gradient before DDP averages it across ranks: it runs with
      ``offload_gradients=False`` (gradients reach the host in ``step()``), and asking for
      ``True`` explicitly is a :class:`UserError`;
    * FSDP2: torch's optimizers and ``trilora.optim``'s step the ``DTensor`` shards directly
      (FSDP2 hands them the reduce-scattered gradients); any other class runs inside a
      :class:`ShardedOptimizer`.

    ``params`` defaults to the parameters that require gradients.
    """

    info = parallel_info(model)
    params = list(params) if params is not None else _trainable(model)
    strategy = info.strategy if info is not None else None
    if strategy == "ddp" and _offloads_gradients(optimizer_class, kwargs):
        if kwargs.get("offload_gradients"):
            raise UserError(
                f"{getattr(optimizer_class, '__name__', 'the optimizer')}(offload_gradients=True) "
                "does not work under DDP: it would take each gradient before it is averaged "
                "across ranks; leave offload_gradients unset (gradients then reach the host in "
                "step())"
            )
        kwargs["offload_gradients"] = False
    sharded = strategy == "fsdp" and any(_is_dtensor(p) for p in _flat(params))
    if sharded and not _steps_dtensors(optimizer_class):
        if _offloads_gradients(optimizer_class, kwargs):
            kwargs["offload_gradients"] = False  # its hooks would never see FSDP's grads
        return ShardedOptimizer(params, optimizer_class, **kwargs)
    return optimizer_class(params, **kwargs)


def _flat(params: list[Any]) -> list[torch.Tensor]:
    out = []
    for item in params:
        out.extend(item["params"] if isinstance(item, dict) else [item])
    return out


def clip_grad_norm(
    model_or_params: nn.Module | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip gradients by their norm over *all* ranks; returns the total norm (a plain tensor).

    Under FSDP2 the gradients are ``DTensor`` shards and torch computes the global norm
    from them; under DDP every rank already holds the averaged full gradients. Call it
    after backward and before ``optimizer.step()``, on every rank.

    ``optimizer``: an optimizer that keeps gradients off ``p.grad`` (trilora's
    ``CPUOffloadAdamW`` and ``AdamW(offload_gradients=True)`` move them to host memory as
    backward produces them, or, under FSDP2, in this call) clips through its own
    ``clip_grad_norm``, which combines the ranks' shards with an all-reduce. Given such an
    optimizer, it is used; otherwise the parameters' ``.grad`` are clipped.
    """
    own = getattr(optimizer, "clip_grad_norm", None)
    if callable(own) and not isinstance(optimizer, ShardedOptimizer):
        # (a ShardedOptimizer's inner optimizer sees plain aliases of the shards, with no
        # gradients before step(): the DTensor gradients on p.grad are the ones to clip)
        total = own(max_norm, norm_type)
    else:
        if isinstance(model_or_params, nn.Module):
            params = _trainable(model_or_params)
        else:
            params = list(model_or_params)
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros(())
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)
    if _is_dtensor(total):
        total = total.full_tensor()
    return total
