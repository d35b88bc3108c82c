"""AdamW with its state, fp32 master weights and (optionally) gradients held in host memory.

LoRA training keeps two fp32 AdamW moments per trainable parameter plus the gradients on
the device. For Llama-3.1-8B with r=32 adapters on every linear layer that is ~84M
parameters, i.e. ~0.93 GiB (8 bytes/param of state + 4 bytes/param of fp32 gradients)
that the device holds for the whole run. LoRA parameters are few enough that an AdamW
step on the CPU is cheap next to a forward/backward pass, so :class:`CPUOffloadAdamW`
keeps all of it in host memory:

* ``param_groups`` hold the *device* parameters, so LR schedulers (torch's, transformers')
  work unchanged: they write ``group["lr"]``, which is copied into the host optimizer at
  every step.
* Every parameter has a host fp32 master copy (pinned when the parameter is on CUDA),
  stepped by an inner :class:`torch.optim.AdamW` that owns ``exp_avg``/``exp_avg_sq``.
  The new values are copied back into the device parameter after each step.
* With ``offload_gradients=True`` a post-accumulate-grad hook moves each gradient to a
  host fp32 accumulator as soon as autograd has produced it and sets ``p.grad = None``,
  so the device never holds more than the gradients still in flight.

Because ``p.grad`` is ``None`` in that mode, ``torch.nn.utils.clip_grad_norm_`` (and so
``transformers.Trainer``'s ``max_grad_norm``) sees no gradients and clips nothing: use
:meth:`CPUOffloadAdamW.clip_grad_norm`, or with the Trainer add :class:`OffloadClipCallback`.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

# OffloadClipCallback is built on first access (module __getattr__ below).
__all__ = ["CPUOffloadAdamW", "OffloadClipCallback", "UnclippedGradientsWarning"]  # noqa: F822


class UnclippedGradientsWarning(UserWarning):
    """The optimizer stepped offloaded gradients that nothing could have clipped.

    Emitted once per optimizer, at the first :meth:`CPUOffloadAdamW.step` with
    ``offload_gradients=True`` that was not preceded by :meth:`CPUOffloadAdamW.clip_grad_norm`.
    Filter it (``warnings.filterwarnings("ignore", category=UnclippedGradientsWarning)``)
    when training without clipping is intended.
    """


# torch.optim.AdamW options this optimizer does not implement, with the value meaning "off".
# A group carrying one of them with that value (e.g. loaded from a torch.optim.AdamW
# state dict) is accepted and the key dropped; any other value is an error.
_UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "amsgrad": False,
    "maximize": False,
    "capturable": False,
    "differentiable": False,
    "decoupled_weight_decay": True,
}
# Implementation switches of torch.optim.AdamW: meaningless here (the host step picks its
# own implementation), dropped from groups whatever their value.
_IMPLEMENTATION_OPTIONS = ("foreach", "fused")
_HPARAMS = ("lr", "betas", "eps", "weight_decay")

# id(param) -> (weakref to param, weakref to optimizer, hook handle): the optimizer whose
# gradient hook currently owns the parameter. Two offloading optimizers on one parameter
# would race for p.grad (the first hook to run takes it and leaves None for the other).
_HOOK_OWNERS: dict[int, tuple[weakref.ref, weakref.ref, Any]] = {}


@dataclass(eq=False)
class _Slot:
    """Host-side buffers of one parameter ``param`` of shape ``S``.

    ``master``: fp32 ``S``, the value the inner AdamW steps (pinned if ``param`` is CUDA).
    ``grad``: fp32 ``S``, the host gradient (accumulator when offloading; pinned D2H target
    when not offloading a CUDA parameter).
    ``staging``: ``param.dtype`` ``S`` pinned, only for offloaded CUDA parameters: the
    target of the asynchronous D2H copy, folded into ``grad`` once ``event`` completed.
    ``synced``: ``(param._version, param.data_ptr())`` when ``master`` last matched
    ``param``; anything else means the device parameter was changed from outside.
    """

    param: torch.Tensor
    master: torch.Tensor
    grad: torch.Tensor
    staging: torch.Tensor | None = None
    event: Any = None  # torch.cuda.Event guarding ``staging``
    pending: bool = False  # ``staging`` holds a copy not yet folded into ``grad``
    has_grad: bool = False  # ``grad`` holds a gradient (offloading mode only)
    # The last step consumed ``grad``: torch would still have a ``p.grad`` here, which a
    # ``zero_grad(set_to_none=False)`` turns into a zero gradient that steps the parameter.
    consumed: bool = False
    synced: tuple[int, int] | None = None


def _stamp(p: torch.Tensor) -> tuple[int, int]:
    # The version counter moves on every in-place write (copy_, load_state_dict, fill_);
    # the data pointer moves when ``p.data`` is rebound (e.g. ``model.to(...)``).
    return (p._version, p.data_ptr())


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(
            f"lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}"
        )
    if not float(lr) >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _strip_adamw_options(group: dict[str, Any]) -> None:
    for key, off in _UNSUPPORTED_OPTIONS.items():
        if key in group:
            if group[key] != off:
                raise ValueError(
                    f"CPUOffloadAdamW does not implement {key}={group[key]!r} "
                    f"(only {key}={off!r}); use torch.optim.AdamW for that"
                )
            del group[key]
    for key in _IMPLEMENTATION_OPTIONS:
        group.pop(key, None)


def _check_param(p: Any) -> None:
    what = "CPUOffloadAdamW expects trainable floating-point leaf tensors (nn.Parameter)"
    hint = "pass [p for p in model.parameters() if p.requires_grad]"
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{what}; got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"{what}; got dtype {p.dtype} (shape {tuple(p.shape)}): {hint}")
    if p.layout != torch.strided:
        raise TypeError(f"{what}; got layout {p.layout}")
    if not p.is_leaf:
        raise ValueError(
            f"{what}; got a non-leaf tensor (grad_fn={type(p.grad_fn).__name__}): "
            "optimize the tensor it was computed from"
        )
    if not p.requires_grad:
        # Refused rather than ignored: a host master + gradient buffer would be allocated
        # for every frozen weight (GBs of pinned memory for a base model).
        raise ValueError(f"{what}; got a tensor with requires_grad=False: {hint}")
    if p.device.type == "meta":
        raise ValueError(f"{what}; got a meta tensor: materialize the model first")


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class CPUOffloadAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as :class:`torch.optim.AdamW`) stepped on the CPU.

    Args:
        params: trainable floating-point leaf tensors of any shape ``S`` and dtype
            (fp32, bf16, fp16), on CUDA or CPU, or param-group dicts of them. They stay
            where they are; ``param_groups`` hold them.
        lr, betas, eps, weight_decay: as :class:`torch.optim.AdamW`, per group.
        offload_gradients: move each gradient to host memory as soon as backward
            produces it (``p.grad`` is ``None`` afterwards). ``False`` leaves gradients on
            ``p.grad`` and copies them to the host inside :meth:`step`.

    Host memory, per parameter of ``n`` elements: fp32 master (``4n`` bytes), fp32
    ``exp_avg`` + ``exp_avg_sq`` (``8n``, allocated at the first step), fp32 gradient
    (``4n``), and for offloaded CUDA parameters a pinned ``param.dtype`` staging buffer.

    Semantics that differ from :class:`torch.optim.AdamW`:

    * ``offload_gradients=True``: :meth:`step` consumes the host gradients, because
      loops such as the Trainer's call ``model.zero_grad()``, which cannot reach host
      buffers. A backward after a step therefore starts from zero even without a
      ``zero_grad()`` in between (torch would add to the old ``p.grad``); an explicit
      ``zero_grad(set_to_none=False)`` still yields zero gradients that step their
      parameters, as in torch. Gradients of several
      backward passes before one step accumulate in fp32 on the host (torch accumulates
      in ``p.grad``'s dtype). Clip with :meth:`clip_grad_norm`, not
      ``torch.nn.utils.clip_grad_norm_``.
    * fp16 AMP with a ``GradScaler`` needs ``p.grad`` and does not work with
      ``offload_gradients=True`` (use bf16, or ``offload_gradients=False``).
    * The fp32 master is authoritative while the device parameter is untouched, so
      bf16/fp16 parameters keep fp32 precision across steps. A device parameter written
      from outside the optimizer (detected through its version counter or data pointer,
      e.g. ``model.load_state_dict``) is re-read into the master before its next step.

    CUDA ordering: gradient copies run on a side stream that waits on the stream that
    produced the gradient; the updated parameters are copied back on the parameter's
    current stream, so a forward on that stream is ordered after them (a forward on
    another stream must wait on it).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        offload_gradients: bool = True,
        **unsupported: Any,
    ) -> None:
        if unsupported:
            names = ", ".join(sorted(unsupported))
            extra = " (amsgrad is not implemented)" if "amsgrad" in unsupported else ""
            raise TypeError(
                f"CPUOffloadAdamW got unsupported argument(s) {names}{extra}; it accepts "
                "lr, betas, eps, weight_decay and offload_gradients"
            )
        _check_hparams(lr, betas, eps, weight_decay)
        self.offload_gradients = bool(offload_gradients)
        self._slots: list[_Slot] = []
        self._slot_of: dict[int, _Slot] = {}
        self._inner: torch.optim.AdamW | None = None
        self._handles: list = []
        self._side_streams: dict[torch.device, Any] = {}
        self._copy_back_events: list = []
        self._clip_called = False
        self._warned_unclipped = False
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        try:
            super().__init__(params, defaults)
        except BaseException:
            self.remove_hooks()
            raise
        # Hooks hold only a weak reference to the optimizer; drop them when it goes away.
        weakref.finalize(self, _remove_handles, self._handles)

    # ---- construction -------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        _strip_adamw_options(group)
        params = group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set) or params is None:
            raise TypeError(
                "a param group's 'params' must be a list of tensors (sets are unordered)"
            )
        else:
            params = list(params)
        for item in params:
            _check_param(item[1] if isinstance(item, tuple) and len(item) == 2 else item)
        group["params"] = params
        _check_hparams(*(group.get(k, self.defaults[k]) for k in _HPARAMS))
        super().add_param_group(group)  # fills defaults, rejects duplicates
        group = self.param_groups[-1]
        slots = [self._new_slot(p) for p in group["params"]]
        inner_group = {"params": [s.master for s in slots], **self._inner_hparams(group)}
        if self._inner is None:
            self._inner = self._make_inner(inner_group)
        else:
            self._inner.add_param_group(inner_group)
        if self.offload_gradients:
            taken = sum(self._register_hook(slot) for slot in slots)
            if taken:
                warnings.warn(
                    f"{taken} parameter(s) were offloaded by another CPUOffloadAdamW; their "
                    "gradients now go to this optimizer only",
                    stacklevel=3,
                )

    @staticmethod
    def _make_inner(group: dict[str, Any]) -> torch.optim.AdamW:
        # The fused CPU kernel (torch >= 2.4) does the whole update in one pass, ~5x faster
        # than the per-op loop; it rounds differently by ~1 ulp per step.
        try:
            return torch.optim.AdamW([group], fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW([group])

    @staticmethod
    def _inner_hparams(group: dict[str, Any]) -> dict[str, Any]:
        # Plain floats: the inner optimizer runs on CPU, where a CUDA lr tensor cannot go.
        return {
            "lr": float(group["lr"]),
            "betas": tuple(float(b) for b in group["betas"]),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
        }

    def _new_slot(self, p: torch.Tensor) -> _Slot:
        on_cuda = p.device.type == "cuda"
        master = torch.empty(p.shape, dtype=torch.float32, pin_memory=on_cuda)
        master.copy_(p.detach())
        # Offloaded gradients land in ``staging`` (pinned); the accumulator is CPU-only.
        # Without offloading, ``grad`` itself is the D2H target and is pinned.
        grad = torch.zeros(
            p.shape, dtype=torch.float32, pin_memory=on_cuda and not self.offload_gradients
        )
        slot = _Slot(param=p, master=master, grad=grad, synced=_stamp(p))
        if on_cuda and self.offload_gradients:
            slot.staging = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            slot.event = torch.cuda.Event()
            if p.device not in self._side_streams:
                # Created here, not lazily in the hook: hooks of CUDA gradients run on
                # autograd's device threads.
                self._side_streams[p.device] = torch.cuda.Stream(device=p.device)
        self._slots.append(slot)
        self._slot_of[id(p)] = slot
        return slot

    def _register_hook(self, slot: _Slot) -> bool:
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
                opt._grad_ready(param)

        handle = p.register_post_accumulate_grad_hook(hook)
        self._handles.append(handle)
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
        _remove_handles(self._handles)

    # ---- gradients ----------------------------------------------------------------

    def _grad_ready(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: move ``param.grad`` to the host, free it on device."""
        grad = param.grad
        slot = self._slot_of.get(id(param))
        if grad is None or slot is None or slot.param is not param:
            return
        if grad.layout != torch.strided:
            raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
        if grad.device.type == "cuda":
            # The staging buffer still holds the previous backward's copy of this gradient
            # (gradient accumulation): wait for it and add it to the accumulator first.
            self._fold(slot)
            if slot.staging is None or slot.staging.dtype != grad.dtype:
                slot.staging = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
                slot.event = slot.event or torch.cuda.Event()
            producer = torch.cuda.current_stream(grad.device)
            side = self._side_streams.get(grad.device)
            if side is None:
                side = self._side_streams[grad.device] = torch.cuda.Stream(device=grad.device)
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
    def _accumulate(slot: _Slot, grad: torch.Tensor) -> None:
        if grad.device.type != "cpu":
            grad = grad.to("cpu")
        if slot.has_grad:
            slot.grad.add_(grad)
        else:
            slot.grad.copy_(grad)
            slot.has_grad = True

    def _fold(self, slot: _Slot) -> None:
        if slot.pending:
            slot.event.synchronize()
            slot.pending = False
            self._accumulate(slot, slot.staging)

    def _offloaded_grads(self) -> list[_Slot]:
        """Finish all gradient copies; return the slots holding a host gradient."""
        with_grad = []
        for slot in self._slots:
            self._fold(slot)
            # A gradient no hook took (hooks removed, or p.grad assigned by hand).
            stray = slot.param.grad
            if stray is not None:
                if stray.layout != torch.strided:
                    raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
                self._accumulate(slot, stray)
                slot.param.grad = None
            if slot.has_grad:
                with_grad.append(slot)
        return with_grad

    def _device_grads(self) -> list[_Slot]:
        """Copy every ``p.grad`` into its host buffer; return the slots that had one."""
        with_grad, devices = [], set()
        for slot in self._slots:
            grad = slot.param.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
            slot.grad.copy_(grad, non_blocking=grad.is_cuda)
            if grad.is_cuda:
                devices.add(grad.device)
            with_grad.append(slot)
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        return with_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and the host gradients.

        ``set_to_none=False`` zeroes the gradients that exist instead (a zero gradient
        still steps its parameter: moments decay and weight decay applies).
        """
        super().zero_grad(set_to_none=set_to_none)
        if not self.offload_gradients:
            return
        for slot in self._slots:
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
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Clip the gradients of all parameters as ``torch.nn.utils.clip_grad_norm_`` does.

        Call it between the last backward and :meth:`step`. With offloaded gradients the
        norm is taken over the host fp32 gradients; otherwise over ``p.grad``.

        Returns:
            The total norm before clipping, a 0-dim fp32 tensor (on the CPU when
            gradients are offloaded, else on the gradients' device).
        """
        self._clip_called = True
        if not self.offload_gradients:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(
                params, max_norm, norm_type, error_if_nonfinite, foreach
            )
        slots = self._offloaded_grads()
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

    # ---- step -----------------------------------------------------------------------

    def _wait_copy_back(self) -> None:
        # Masters are the source of in-flight H2D copies; they must not be written first.
        for event in self._copy_back_events:
            event.synchronize()
        self._copy_back_events.clear()

    def _resync(self, slot: _Slot) -> None:
        if slot.synced != _stamp(slot.param):
            slot.master.copy_(slot.param.detach())
            slot.synced = _stamp(slot.param)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run one AdamW step on the host and write the results into the parameters.

        Parameters without a gradient are skipped (no moment decay, no weight decay), as
        in :class:`torch.optim.AdamW`. With ``offload_gradients=True`` the host gradients
        are consumed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        slots = self._offloaded_grads() if self.offload_gradients else self._device_grads()
        if (
            self.offload_gradients
            and slots
            and not self._clip_called
            and not self._warned_unclipped
        ):
            self._warned_unclipped = True
            warnings.warn(
                "CPUOffloadAdamW(offload_gradients=True) keeps gradients on the host, so "
                "torch.nn.utils.clip_grad_norm_ and transformers.Trainer's max_grad_norm see "
                "p.grad=None and clip nothing. Clip with optimizer.clip_grad_norm(max_norm) "
                "before step() (with transformers.Trainer: callbacks=[trilora.optim."
                "OffloadClipCallback()]); ignore this warning if you do not clip.",
                UnclippedGradientsWarning,
                stacklevel=4,  # past torch's no_grad and step-hook wrappers
            )
        if not slots:
            return loss
        self._wait_copy_back()
        for group, inner_group in zip(self.param_groups, self._inner.param_groups):
            inner_group.update(self._inner_hparams(group))
        for slot in slots:
            self._resync(slot)
            slot.master.grad = slot.grad
        try:
            self._inner.step()
        finally:
            for slot in slots:
                slot.master.grad = None
        if self.offload_gradients:
            for slot in slots:
                slot.has_grad, slot.consumed = False, True
        self._copy_back(slots)
        for slot in slots:
            self.state[slot.param] = self._inner.state[slot.master]
        return loss

    def _copy_back(self, slots: list[_Slot]) -> None:
        devices = set()
        for slot in slots:
            p = slot.param
            on_cuda = p.device.type == "cuda"
            # Enqueued on p's current stream: kernels later queued there (the next
            # forward) run after it; the CPU is not blocked.
            p.copy_(slot.master, non_blocking=on_cuda)
            slot.synced = _stamp(p)
            if on_cuda:
                devices.add(p.device)
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._copy_back_events.append(event)

    # ---- state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [...]}``, laid out as torch's.

        ``state[index]`` holds the inner AdamW's ``step``, ``exp_avg`` and ``exp_avg_sq``
        (fp32, CPU), plus ``master`` (fp32 ``S``) for parameters whose dtype is not fp32,
        whose masters carry bits the device copy lacks. Tensors are references, as in
        torch: save or copy the result before stepping again.
        """
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state: dict[int, dict[str, Any]] = {}
        for index, slot in enumerate(self._slots):
            inner = self._inner.state.get(slot.master) if self._inner is not None else None
            if not inner:
                continue
            entry = dict(inner)
            if slot.param.dtype != torch.float32:
                self._wait_copy_back()
                self._resync(slot)
                entry["master"] = slot.master
            state[index] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one of :class:`torch.optim.AdamW`).

        Group hyperparameters and moments are taken from ``state_dict``; tensors are
        copied to the host, never aliased. Masters: a saved ``master`` is adopted when it
        rounds to the parameter's current device value; otherwise (or without one, as for
        fp32 parameters) the master is re-read from the device parameter at its next step.
        So the model weights may be loaded before or after the optimizer state.
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer has {len(self.param_groups)}"
            )
        by_index: dict[Any, _Slot] = {}
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded parameter group has {len(saved['params'])} parameters, "
                    f"the optimizer's has {len(group['params'])}"
                )
            for p, index in zip(group["params"], saved["params"]):
                by_index[index] = self._slot_of[id(p)]
            new_group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            _strip_adamw_options(new_group)
            _check_hparams(*(new_group.get(k, self.defaults[k]) for k in _HPARAMS))
            new_group["params"] = group["params"]
            new_groups.append(new_group)
        unknown = [k for k in saved_state if k not in by_index]
        if unknown:
            raise ValueError(f"loaded state refers to unknown parameter indices {unknown}")

        self._wait_copy_back()
        position = {id(slot): i for i, slot in enumerate(self._slots)}
        inner_sd = self._inner.state_dict()
        inner_sd["state"] = {
            position[id(by_index[k])]: {
                name: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
                for name, v in entry.items()
                if name != "master"
            }
            for k, entry in saved_state.items()
        }
        self._inner.load_state_dict(inner_sd)
        self.param_groups = new_groups

        for slot in self._slots:
            slot.synced = None  # re-read from the device at the next step
        for k, entry in saved_state.items():
            master = entry.get("master")
            slot = by_index[k]
            if master is None or tuple(master.shape) != tuple(slot.param.shape):
                continue
            master = master.detach().to("cpu", torch.float32)
            if torch.equal(master.to(slot.param.dtype), slot.param.detach().to("cpu")):
                slot.master.copy_(master)
                slot.synced = _stamp(slot.param)
        self.state = defaultdict(dict)
        for slot in self._slots:
            if self._inner.state.get(slot.master):
                self.state[slot.param] = self._inner.state[slot.master]

    # ---- reporting ------------------------------------------------------------------

    def host_memory(self) -> dict[str, int]:
        """Host bytes held, by kind: ``master``, ``grad`` (accumulators), ``staging``
        (pinned D2H buffers) and ``state`` (``exp_avg``, ``exp_avg_sq``, ``step``; empty
        until the first step allocates them)."""
        out = {"master": 0, "grad": 0, "staging": 0, "state": 0}
        for slot in self._slots:
            out["master"] += slot.master.nbytes
            out["grad"] += slot.grad.nbytes
            if slot.staging is not None:
                out["staging"] += slot.staging.nbytes
            inner = self._inner.state.get(slot.master) if self._inner is not None else None
            for value in (inner or {}).values():
                if isinstance(value, torch.Tensor):
                    out["state"] += value.nbytes
        return out

    @property
    def host_bytes(self) -> int:
        """Total host bytes held (see :meth:`host_memory`)."""
        return sum(self.host_memory().values())

    @property
    def pinned_bytes(self) -> int:
        """The part of :attr:`host_bytes` in page-locked memory (CUDA parameters only)."""
        total = 0
        for slot in self._slots:
            for buf in (slot.master, slot.grad, slot.staging):
                if buf is not None and buf.is_pinned():
                    total += buf.nbytes
        return total


def _unwrap(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer (what Trainer callbacks receive) wraps ``.optimizer``.
    seen = 0
    while not isinstance(optimizer, CPUOffloadAdamW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 8:
            break
    return optimizer


def _build_clip_callback() -> type:
    # transformers.TrainerCallback costs seconds to import; built on first access only.
    from transformers import TrainerCallback

    class OffloadClipCallback(TrainerCallback):
        """Clips :class:`CPUOffloadAdamW`'s host gradients for ``transformers.Trainer``.

        The Trainer clips with ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``,
        which sees ``p.grad is None`` for offloaded gradients: it clips nothing and logs a
        ``grad_norm`` of 0. This callback clips at ``args.max_grad_norm`` in
        ``on_pre_optimizer_step`` (after the Trainer's no-op clip, before the step) and
        writes the true norm into the logged ``grad_norm`` (``trainer.state.log_history``
        and the callbacks after this one; callbacks earlier in the list, such as the
        console printer, see the Trainer's 0.0). With ``offload_gradients=False`` it does
        nothing: the Trainer's own clipping works.

        Usage: ``Trainer(..., optimizers=(CPUOffloadAdamW(...), None),
        callbacks=[OffloadClipCallback()])``.
        """

        def __init__(self) -> None:
            self.last_grad_norm: float | None = None

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            opt = _unwrap(optimizer)
            if not isinstance(opt, CPUOffloadAdamW):
                raise TypeError(
                    "OffloadClipCallback needs the Trainer's optimizer to be a "
                    f"CPUOffloadAdamW, got {type(opt).__name__}"
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

    OffloadClipCallback.__module__ = __name__
    return OffloadClipCallback


def __getattr__(name: str) -> Any:
    if name == "OffloadClipCallback":
        cls = _build_clip_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
