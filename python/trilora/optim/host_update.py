"""Gradients offloaded to the host and the update run there: the host-update mode of
:class:`trilora.optim.AdamW` (``offload_gradients=True``, and :class:`CPUOffloadAdamW`).

A post-accumulate-grad hook moves each gradient to an fp32 host accumulator as soon as
backward has produced it (CUDA: a pinned staging copy on a side stream, folded in once its
event completed) and frees it on the device. The step resyncs the fp32 host masters with
parameters written from outside, runs the CPU update, and copies the masters back on each
parameter's current stream without blocking the host.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trilora.optim.errors import UnclippedGradientsWarning
from trilora.optim.slots import Slot
from trilora.optim.tensors import check_grad, is_dtensor, local_tensor, stamp

# id(param) -> (weakref to param, weakref to optimizer, hook handle): the optimizer whose
# gradient hook currently owns the parameter. Two offloading optimizers on one parameter
# would race for p.grad (the first hook to run takes it and leaves None for the other).
_HOOK_OWNERS: dict[int, tuple[weakref.ref, weakref.ref, Any]] = {}


def remove_handles(handles: list) -> None:
    """Remove every hook handle in ``handles`` and empty it."""
    for handle in handles:
        handle.remove()
    handles.clear()


class HostUpdater:
    """Hooks, host gradients, clipping and the host-update step of one
    :class:`trilora.optim.AdamW`, which owns it and calls it through these methods.

    Args:
        name: the optimizer's class name, for messages.
        slots: the optimizer's slots, in parameter order; ``slot_of``: ``id(param)`` -> slot.
            Both are the optimizer's own containers (it adds slots as groups are added).
        offload_gradients: gradients move to the host as backward produces them (hooks);
            otherwise :meth:`step` copies ``p.grad`` to the host.
    """

    def __init__(
        self, name: str, slots: list[Slot], slot_of: dict[int, Slot], offload_gradients: bool
    ) -> None:
        self.name = name
        self.slots = slots
        self.slot_of = slot_of
        self.offload_gradients = offload_gradients
        self.handles: list = []
        self.side_streams: dict[torch.device, Any] = {}
        self.copy_back_events: list = []
        self.clip_called = False
        self.warned_unclipped = False

    def add_side_stream(self, device: torch.device) -> None:
        """Create ``device``'s copy stream now: hooks of CUDA gradients run on autograd's
        device threads, where creating one is not safe."""
        if device not in self.side_streams:
            self.side_streams[device] = torch.cuda.Stream(device=device)

    def register_hook(self, slot: Slot) -> bool:
        """Hook ``slot.param``; True when a live optimizer had it (its hook is removed)."""
        p = slot.param
        taken = False
        previous = _HOOK_OWNERS.get(id(p))
        if previous is not None and previous[0]() is p:
            previous[2].remove()
            taken = previous[1]() is not None
        owner = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            opt = owner()
            if opt is not None:
                opt.grad_ready(param)

        handle = p.register_post_accumulate_grad_hook(hook)
        self.handles.append(handle)
        _HOOK_OWNERS[id(p)] = (weakref.ref(p), owner, handle)
        return taken

    def remove_hooks(self) -> None:
        """Stop offloading gradients as they are produced.

        Gradients then stay on ``p.grad`` until :meth:`step` or :meth:`clip_grad_norm`
        moves them to the host, so training remains correct, only without the memory gain.
        """
        for key, (_, owner, _) in list(_HOOK_OWNERS.items()):
            if owner() is self:
                del _HOOK_OWNERS[key]
        remove_handles(self.handles)

    # ---- offloaded gradients ----------------------------------------------------------

    def grad_ready(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: move ``param.grad`` to the host, free it on device."""
        grad = param.grad
        slot = self.slot_of.get(id(param))
        if grad is None or slot is None or slot.param is not param:
            return
        check_grad(grad, self.name)
        grad = local_tensor(grad)
        if grad.device.type == "cuda":
            # The staging buffer still holds the previous backward's copy of this gradient
            # (gradient accumulation): wait for it and add it to the accumulator first.
            self._fold(slot)
            if slot.staging is None or slot.staging.dtype != grad.dtype:
                slot.staging = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
                slot.event = slot.event or torch.cuda.Event()
            producer = torch.cuda.current_stream(grad.device)
            side = self.side_streams.get(grad.device)
            if side is None:
                side = self.side_streams[grad.device] = torch.cuda.Stream(device=grad.device)
            # The copy must not start before the kernels that wrote ``grad``; it runs on
            # the side stream so the rest of backward is not serialized behind it.
            side.wait_stream(producer)
            with torch.cuda.stream(side):
                slot.staging.copy_(grad, non_blocking=True)
                slot.event.record(side)
            # ``grad`` is freed below while the side stream may still read it: tell the
            # caching allocator not to reuse its memory before the side stream is done.
            grad.record_stream(side)
            slot.pending = True
        else:
            self._accumulate(slot, grad)
        param.grad = None

    @staticmethod
    def _accumulate(slot: Slot, grad: torch.Tensor) -> None:
        if grad.device.type != "cpu":
            grad = grad.to("cpu")
        if slot.has_grad:
            slot.grad.add_(grad)
        else:
            slot.grad.copy_(grad)
            slot.has_grad = True

    def _fold(self, slot: Slot) -> None:
        if slot.pending:
            slot.event.synchronize()
            slot.pending = False
            self._accumulate(slot, slot.staging)

    def _offloaded_grads(self) -> list[Slot]:
        """Finish all gradient copies; return the slots holding a host gradient."""
        with_grad = []
        for slot in self.slots:
            self._fold(slot)
            # A gradient no hook took (hooks removed, or p.grad assigned by hand).
            stray = slot.param.grad
            if stray is not None:
                check_grad(stray, self.name)
                self._accumulate(slot, local_tensor(stray))
                slot.param.grad = None
            if slot.has_grad:
                with_grad.append(slot)
        return with_grad

    def _copied_grads(self) -> list[Slot]:
        """Host update without offloading: copy every ``p.grad`` into its host buffer."""
        with_grad, devices = [], set()
        for slot in self.slots:
            grad = slot.param.grad
            if grad is None:
                continue
            check_grad(grad, self.name)
            grad = local_tensor(grad)
            slot.grad.copy_(grad, non_blocking=grad.is_cuda)
            if grad.is_cuda:
                devices.add(grad.device)
            with_grad.append(slot)
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        return with_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the host gradients (``p.grad`` is the optimizer's to clear).

        ``set_to_none=False`` zeroes the gradients that exist instead (a zero gradient
        still steps its parameter: moments decay and weight decay applies).
        """
        if not self.offload_gradients:
            return
        for slot in self.slots:
            if slot.pending:
                slot.event.synchronize()
                slot.pending = False
                slot.has_grad = True
            if set_to_none:
                slot.has_grad = False
            elif slot.has_grad or slot.consumed:
                slot.grad.zero_()
                slot.has_grad = True
            slot.consumed = False

    @torch.no_grad()
    def clip_grad_norm(
        self,
        param_groups: list[dict],
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Clip the gradients of all parameters as ``torch.nn.utils.clip_grad_norm_`` does.

        Call it between the last backward and :meth:`step`. With offloaded gradients the
        norm is taken over the host fp32 gradients; otherwise over ``p.grad``. For FSDP2's
        ``DTensor`` parameters it is the norm of the whole gradients over all ranks (every
        rank must call it), as torch's ``clip_grad_norm_`` gives for ``DTensor`` gradients.

        Returns:
            The total norm before clipping, a 0-dim fp32 tensor (on the CPU when
            gradients are offloaded, else on the gradients' device).
        """
        self.clip_called = True
        if not self.offload_gradients:
            params = [p for g in param_groups for p in g["params"] if p.grad is not None]
            total = torch.nn.utils.clip_grad_norm_(
                params, max_norm, norm_type, error_if_nonfinite, foreach
            )
            return total.full_tensor() if is_dtensor(total) else total
        slots = self._offloaded_grads()
        if any(is_dtensor(slot.param) for slot in self.slots):
            return self._clip_sharded(slots, max_norm, norm_type, error_if_nonfinite)
        # The masters carry the host gradients as ``.grad`` only for this call, so the
        # clipping itself is torch's own.
        for slot in slots:
            slot.master.grad = slot.grad
        try:
            return torch.nn.utils.clip_grad_norm_(
                [s.master for s in slots], max_norm, norm_type, error_if_nonfinite, foreach
            )
        finally:
            for slot in slots:
                slot.master.grad = None

    def _clip_sharded(
        self, slots: list[Slot], max_norm: float, norm_type: float, error_if_nonfinite: bool
    ) -> torch.Tensor:
        """Clip host gradients of FSDP2 shards by the norm of the *whole* gradients.

        Each rank's host gradients are only its shards of the ``DTensor`` parameters, so a
        norm over them is this rank's part: the parts are combined with an all-reduce
        over the mesh dimensions each parameter is sharded on (sum of ``norm**p``, or the
        maximum for the inf-norm), as torch's ``clip_grad_norm_`` does for ``DTensor``
        gradients. Every rank must call it (it is a collective).
        """
        p = float(norm_type)
        if not (p == float("inf") or p > 0):
            raise ValueError(f"norm_type must be > 0 or inf for sharded parameters, got {p}")
        inf = p == float("inf")
        with_grad = {id(slot) for slot in slots}
        # (mesh, sharded mesh dims) -> this rank's partial, in one order on every rank:
        # the order of the optimizer's slots, which every rank builds alike.
        parts: dict[tuple, list] = {}
        for slot in self.slots:
            param = slot.param
            if is_dtensor(param):
                dims = tuple(i for i, pl in enumerate(param.placements) if pl.is_shard())
                key: tuple = (id(param.device_mesh), dims)
                mesh = param.device_mesh
            else:
                key, mesh, dims = ("local",), None, ()
            entry = parts.setdefault(key, [mesh, dims, []])
            if id(slot) in with_grad:
                entry[2].append(torch.linalg.vector_norm(slot.grad, p))
        totals = []
        for mesh, dims, norms in parts.values():
            if norms:
                stacked = torch.stack(norms)
                part = stacked.max() if inf else stacked.pow(p).sum()
            else:
                part = torch.zeros((), dtype=torch.float32)
            if mesh is not None and dims:
                part = part.to(mesh.device_type)
                op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
                for dim in dims:
                    dist.all_reduce(part, op=op, group=mesh.get_group(dim))
                part = part.cpu()
            totals.append(part)
        stacked = torch.stack(totals)
        total = stacked.max() if inf else stacked.sum().pow(1.0 / p)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"The total norm of order {p} for gradients from `parameters` is non-finite, "
                "so it cannot be clipped. To disable this error and scale the gradients by the "
                "non-finite norm anyway, set `error_if_nonfinite=False`"
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for slot in slots:
            slot.grad.mul_(coef)
        return total

    def wait_copy_back(self) -> None:
        # Masters are the source of in-flight H2D copies; they must not be written first.
        for event in self.copy_back_events:
            event.synchronize()
        self.copy_back_events.clear()

    def step(
        self,
        param_groups: list[dict],
        allocate: Callable[[Slot, dict], Any],
        update: Callable[[list], None],
    ) -> None:
        """Host-update mode: gradients on the host, fp32 masters, the update on the CPU,
        parameters copied back (non-blocking on CUDA)."""
        slots = self._offloaded_grads() if self.offload_gradients else self._copied_grads()
        if self.offload_gradients and slots and not self.clip_called and not self.warned_unclipped:
            self.warned_unclipped = True
            warnings.warn(
                f"{self.name}(offload_gradients=True) keeps gradients on the host, so "
                "torch.nn.utils.clip_grad_norm_ and transformers.Trainer's max_grad_norm see "
                "p.grad=None and clip nothing. Clip with optimizer.clip_grad_norm(max_norm) "
                "before step() (with transformers.Trainer: callbacks=[trilora.optim."
                "OffloadClipCallback()]); ignore this warning if you do not clip.",
                UnclippedGradientsWarning,
                stacklevel=4,  # past torch's no_grad and step-hook wrappers
            )
        if not slots:
            return
        self.wait_copy_back()
        group_of = {id(p): g for g in param_groups for p in g["params"]}
        placed: dict[torch.device, int] = {}
        items = []
        for slot in slots:
            if slot.state is None:
                allocate(slot, placed)
            self.resync(slot)
            items.append((group_of[id(slot.param)], slot, slot.master, slot.grad))
        update(items)
        if self.offload_gradients:
            for slot in slots:
                slot.has_grad, slot.consumed = False, True
        self._copy_back(slots)

    def resync(self, slot: Slot) -> None:
        """Copy ``slot.param`` into its fp32 master if it was written since the last sync."""
        current = stamp(slot.param)
        local = local_tensor(slot.param).detach()
        if current is None:
            # No version counter (a torch without Tensor._version): the master is stale when
            # the parameter no longer equals it rounded to the parameter's dtype. Costs one
            # device-to-host read of each parameter per step.
            stale = not torch.equal(slot.master.to(local.dtype), local.to("cpu"))
        else:
            stale = slot.synced != current
        if stale:
            slot.master.copy_(local)
            slot.synced = current

    def _copy_back(self, slots: list[Slot]) -> None:
        devices = set()
        for slot in slots:
            local = local_tensor(slot.param)
            on_cuda = local.device.type == "cuda"
            # Enqueued on p's current stream: kernels later queued there (the next
            # forward) run after it; the CPU is not blocked.
            local.copy_(slot.master, non_blocking=on_cuda)
            slot.synced = stamp(slot.param)
            if on_cuda:
                devices.add(local.device)
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.copy_back_events.append(event)


__all__ = ["HostUpdater", "remove_handles"]
