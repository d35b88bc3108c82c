"""One AdamW for every memory budget: 32- or 8-bit state, resident, paged or on the host.

:class:`AdamW` is ``torch.optim.AdamW``'s update (decoupled weight decay; the step
operation by operation as ``foreach=False`` computes it) with three independent choices:

* ``state_bits``: 32 (fp32 ``exp_avg`` / ``exp_avg_sq``, 8 bytes per element) or 8
  (bitsandbytes' blockwise 8-bit state, ~2 bytes per element, byte-compatible with
  ``bitsandbytes.optim.AdamW8bit``; tensors under ``min_8bit_size`` elements stay 32-bit);
* ``paging``: where the state lives (see :mod:`trilora.optim.paging`): ``"off"`` next to
  the parameters; ``"host"`` in pinned host memory except for ``device_budget`` bytes,
  streamed through the device a page at a time; ``"uvm"`` in CUDA managed memory prefetched
  page by page; ``"auto"`` resident while it fits, paged under memory pressure;
* ``offload_gradients``: move each gradient to host memory as backward produces it and run
  the update on the CPU (the :class:`CPUOffloadAdamW` mode).

Where the update runs: on CUDA parameters (and on CPU tensors when
``trilora.config.backend == "triton"``, the interpreter tests), one fused Triton kernel
(:mod:`trilora.kernels.optim`) per parameter, or per page of host-paged state. On the CPU,
the 32-bit update is torch's own AdamW kernel (the fused one when torch has it), the 8-bit
one the native extension's fused pass (:func:`trilora.optim.blockwise.adamw_8bit_native_`),
or :func:`trilora.optim.blockwise.adamw_8bit_` (torch ops) where the extension cannot be
built, all with the kernels' semantics.

The state dict has torch's layout for 32-bit state (``step``, ``exp_avg``, ``exp_avg_sq``),
so ``torch.optim.AdamW`` checkpoints load, and bitsandbytes' for 8-bit state (``state1``,
``state2``, ``absmax1``, ``absmax2``, ``qmap1``, ``qmap2``), always with a tensor ``step``.
Parameters sharded by FSDP2 (DTensors) keep their state sharded the same way.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

import trilora.optim.state_dict_layout as _ckpt
from trilora.config import use_triton
from trilora.native import cuda_ext
from trilora.ops.optim import adamw_step_8bit, adamw_step_32bit
from trilora.optim.blockwise import (
    MIN_8BIT_SIZE,
    StepScalars,
    adamw_8bit_,
    adamw_8bit_native_,
    adamw_32bit_,
    quant_maps,
)
from trilora.optim.errors import (
    OptimizerInputError,
    PagingFallbackWarning,
    ParameterTypeError,
    StateDictLayoutError,
)
from trilora.optim.host_update import HostUpdater, remove_handles
from trilora.optim.paging import (
    DEFAULT_PAGE_BYTES,
    AutoTracker,
    HostPageStreamer,
    ManagedPager,
    Page,
    SlotState,
    auto_moves,
    page_elems,
    page_ranges,
    state_nbytes,
)
from trilora.optim.slots import Slot
from trilora.optim.tensors import check_grad, is_dtensor, local_tensor, stamp

PAGING_MODES = ("off", "host", "uvm", "auto")
STATE_BITS = (32, 8)

# torch.optim.AdamW options this optimizer does not implement, with the value meaning "off".
# A group carrying one of them with that value (e.g. loaded from a torch.optim.AdamW state
# dict) is accepted and the key dropped; any other value is an error.
_UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "amsgrad": False,
    "maximize": False,
    "capturable": False,
    "differentiable": False,
    "decoupled_weight_decay": True,
    # bitsandbytes' AdamW groups (AdEMAMix options; neutral for AdamW)
    "alpha": 0.0,
    "t_alpha": None,
    "t_beta3": None,
}
# Implementation switches of torch.optim.AdamW: meaningless here, dropped whatever their value.
_IMPLEMENTATION_OPTIONS = ("foreach", "fused")
_HPARAMS = ("lr", "betas", "eps", "weight_decay")


@functools.lru_cache(maxsize=1)
def host_kernel_is_fused() -> bool:
    """Whether the CPU 32-bit update uses torch's fused CPU AdamW kernel (torch >= 2.4): one
    pass over memory, ~10x faster than the per-op loop, rounding differently from it by
    ~1 ulp per step. Otherwise the CPU update is ``foreach=False``'s op sequence."""
    probe = torch.zeros(2, requires_grad=True)
    try:
        opt = torch.optim.AdamW([probe], fused=True)
        probe.grad = torch.zeros(2)
        opt.step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise OptimizerInputError(
            f"lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}"
        )
    if not float(lr) >= 0.0:
        raise OptimizerInputError(f"lr must be >= 0, got {lr}")
    if not float(eps) >= 0.0:
        raise OptimizerInputError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise OptimizerInputError(f"betas must be two numbers in [0, 1), got {betas}")
    if not float(weight_decay) >= 0.0:
        raise OptimizerInputError(f"weight_decay must be >= 0, got {weight_decay}")


def _strip_options(group: dict[str, Any], owner: str) -> None:
    for key, off in _UNSUPPORTED_OPTIONS.items():
        if key in group:
            if group[key] != off:
                raise OptimizerInputError(
                    f"{owner} does not implement {key}={group[key]!r} (only {key}={off!r}); "
                    "use torch.optim.AdamW for that"
                )
            del group[key]
    for key in _IMPLEMENTATION_OPTIONS:
        group.pop(key, None)


def _check_param(p: Any, owner: str) -> None:
    what = f"{owner} expects trainable real floating-point leaf tensors (nn.Parameter)"
    hint = "pass [p for p in model.parameters() if p.requires_grad]"
    if not isinstance(p, torch.Tensor):
        raise ParameterTypeError(f"{what}; got {type(p).__name__}")
    if p.is_complex():
        raise ParameterTypeError(
            f"{what}; got a complex {p.dtype} tensor of shape {tuple(p.shape)}: optimize "
            "torch.view_as_real of it instead"
        )
    if not p.is_floating_point():
        raise ParameterTypeError(f"{what}; got dtype {p.dtype} (shape {tuple(p.shape)}): {hint}")
    if p.layout != torch.strided:
        raise ParameterTypeError(f"{what}; got layout {p.layout}")
    if not p.is_leaf:
        raise OptimizerInputError(
            f"{what}; got a non-leaf tensor (grad_fn={type(p.grad_fn).__name__}): "
            "optimize the tensor it was computed from"
        )
    if not p.requires_grad:
        # Refused rather than ignored: state (and, offloading, a host master and gradient
        # buffer) would be allocated for every frozen weight.
        raise OptimizerInputError(f"{what}; got a tensor with requires_grad=False: {hint}")
    if p.device.type == "meta":
        raise OptimizerInputError(f"{what}; got a meta tensor: materialize the model first")


class AdamW(torch.optim.Optimizer):
    """AdamW with 32- or 8-bit state, resident, paged or on the host (module docstring).

    Args:
        params: trainable floating-point leaf tensors (fp32, bf16, fp16; plain or FSDP2
            DTensors), or param-group dicts of them.
        lr, betas, eps, weight_decay: as :class:`torch.optim.AdamW`, per group.
        state_bits: 32, or 8 for bitsandbytes' blockwise 8-bit state.
        paging: ``"off"``, ``"host"``, ``"uvm"`` or ``"auto"`` (module docstring).
        device_budget: ``paging="host"``/``"auto"`` only: bytes of state (including the two
            page buffers of streamed state) the device may hold. ``None``: 0 for
            ``"host"``, what fits for ``"auto"``. Otherwise 0 (only the two page buffers)
            or at least two pages.
        offload_gradients: copy each gradient to host memory as backward produces it
            (``p.grad`` is ``None`` afterwards) and run the update on the CPU against fp32
            host masters; needs ``paging="host"`` with ``device_budget`` 0 or ``None``.
            Clip with :meth:`clip_grad_norm`.
        page_bytes: size of a page of streamed or managed state.
        min_8bit_size: tensors with fewer elements keep 32-bit state.

    Memory per element of the parameters (state only): 8 bytes at 32 bits, ~2.03 at 8 bits,
    on the device (``paging="off"``), or on the host but for ``device_budget`` bytes.
    :meth:`device_memory` and :meth:`host_memory` report what is actually held.

    Semantics that differ from :class:`torch.optim.AdamW`: bf16/fp16 parameters are updated
    in fp32 and rounded once (torch keeps their state in their own dtype); with
    ``offload_gradients=True`` see :class:`CPUOffloadAdamW`.
    """

    _always_host_update = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 32,
        paging: str = "off",
        device_budget: int | None = None,
        offload_gradients: bool = False,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        min_8bit_size: int = MIN_8BIT_SIZE,
        **unsupported: Any,
    ) -> None:
        name = type(self).__name__
        if unsupported:
            names = ", ".join(sorted(unsupported))
            extra = " (amsgrad is not implemented)" if "amsgrad" in unsupported else ""
            raise TypeError(
                f"{name} got unsupported argument(s) {names}{extra}; it accepts lr, betas, eps, "
                "weight_decay, state_bits, paging, device_budget, offload_gradients, "
                "page_bytes and min_8bit_size"
            )
        _check_hparams(lr, betas, eps, weight_decay)
        self._check_settings(
            state_bits, paging, device_budget, offload_gradients, page_bytes, min_8bit_size
        )
        self.state_bits = int(state_bits)
        self.paging = paging
        self.device_budget = None if device_budget is None else int(device_budget)
        self.offload_gradients = bool(offload_gradients)
        self.page_bytes = int(page_bytes)
        self.min_8bit_size = int(min_8bit_size)
        self._host_update = self.offload_gradients or self._always_host_update
        self._slots: list[Slot] = []
        self._slot_of: dict[int, Slot] = {}
        # hooks, host gradients, clipping and the host step (offload_gradients, CPUOffloadAdamW)
        self._host = HostUpdater(
            type(self).__name__, self._slots, self._slot_of, self.offload_gradients
        )
        self._streamers: dict[torch.device, HostPageStreamer] = {}
        self._pagers: dict[torch.device, ManagedPager] = {}
        self._trackers: dict[torch.device, AutoTracker] = {}
        self._managed: Any = None  # the native extension, once paging="uvm" has found it
        self._uvm_failed = False
        self._inner: torch.optim.AdamW | None = None
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        try:
            super().__init__(params, defaults)
        except BaseException:
            self.remove_hooks()
            raise
        # Hooks hold only a weak reference to the optimizer; drop them when it goes away.
        weakref.finalize(self, remove_handles, self._host.handles)

    # ---- host gradients (trilora.optim.host_update) -------------------------------------

    def remove_hooks(self) -> None:
        """Stop offloading gradients as they are produced.

        Gradients then stay on ``p.grad`` until :meth:`step` or :meth:`clip_grad_norm`
        moves them to the host, so training remains correct, only without the memory gain.
        """
        self._host.remove_hooks()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (and, offloading, the host gradients).

        ``set_to_none=False`` zeroes the gradients that exist instead (a zero gradient
        still steps its parameter: moments decay and weight decay applies).
        """
        super().zero_grad(set_to_none=set_to_none)
        self._host.zero_grad(set_to_none)

    def clip_grad_norm(
        self,
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
        return self._host.clip_grad_norm(
            self.param_groups, max_norm, norm_type, error_if_nonfinite, foreach
        )

    def _check_settings(
        self, state_bits, paging, device_budget, offload_gradients, page_bytes, min_8bit_size
    ) -> None:
        name = type(self).__name__
        if state_bits not in STATE_BITS or isinstance(state_bits, bool):
            raise OptimizerInputError(f"{name}: state_bits must be 32 or 8, got {state_bits!r}")
        if paging not in PAGING_MODES:
            raise OptimizerInputError(
                f"{name}: paging must be one of {', '.join(PAGING_MODES)}, got {paging!r}"
            )
        if not isinstance(page_bytes, int) or page_bytes < 8192:
            raise OptimizerInputError(
                f"{name}: page_bytes must be an int >= 8192, got {page_bytes!r}"
            )
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise OptimizerInputError(
                f"{name}: min_8bit_size must be an int >= 0, got {min_8bit_size!r}"
            )
        if device_budget is not None:
            if paging not in ("host", "auto"):
                raise OptimizerInputError(
                    f"{name}: device_budget applies to paging='host' or 'auto', not paging={paging!r}"
                )
            if not isinstance(device_budget, int) or device_budget < 0:
                raise OptimizerInputError(
                    f"{name}: device_budget must be a number of bytes >= 0, got {device_budget!r}"
                )
            if 0 < device_budget < 2 * page_bytes:
                raise OptimizerInputError(
                    f"{name}: device_budget={device_budget} bytes is below two pages "
                    f"(2 x page_bytes = {2 * page_bytes}): give 0 to keep all state on the host, "
                    f"or at least {2 * page_bytes}"
                )
        if (offload_gradients or self._always_host_update) and (
            paging != "host" or device_budget not in (None, 0)
        ):
            raise OptimizerInputError(
                f"{name}: offload_gradients=True runs the update on the host, where the state "
                "lives: use paging='host' with device_budget 0 or None"
            )
        if paging == "uvm" and not torch.cuda.is_available():
            raise OptimizerInputError(
                f"{name}: paging='uvm' needs CUDA managed memory and no CUDA device is "
                "available; use paging='host' or 'off'"
            )

    # ---- construction -------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise ParameterTypeError(
                f"param_group must be a dict, got {type(param_group).__name__}"
            )
        group = dict(param_group)
        _strip_options(group, name)
        params = group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set) or params is None:
            raise ParameterTypeError(
                "a param group's 'params' must be a list of tensors (sets are unordered)"
            )
        else:
            params = list(params)
        for item in params:
            _check_param(item[1] if isinstance(item, tuple) and len(item) == 2 else item, name)
        group["params"] = params
        _check_hparams(*(group.get(k, self.defaults[k]) for k in _HPARAMS))
        super().add_param_group(group)  # fills defaults, rejects duplicates
        slots = [self._new_slot(p) for p in self.param_groups[-1]["params"]]
        if self.offload_gradients:
            taken = sum(self._host.register_hook(slot) for slot in slots)
            if taken:
                warnings.warn(
                    f"{taken} parameter(s) were offloaded by another optimizer; their gradients "
                    "now go to this one only",
                    stacklevel=3,
                )

    def _new_slot(self, p: torch.Tensor) -> Slot:
        local = local_tensor(p)
        bits = 8 if self.state_bits == 8 and p.numel() >= self.min_8bit_size else 32
        if bits == 8 and is_dtensor(p):
            _ckpt.check_8bit_dtensor(p, type(self).__name__)
        slot = Slot(p, len(self._slots), local.numel(), local.shape, bits)
        if self._host_update:
            on_cuda = local.device.type == "cuda"
            slot.master = torch.empty(local.shape, dtype=torch.float32, pin_memory=on_cuda)
            slot.master.copy_(local.detach())
            slot.synced = stamp(p)
            # Offloaded gradients land in ``staging`` (pinned); the accumulator is CPU-only.
            # Without offloading, ``grad`` itself is the D2H target and is pinned.
            slot.grad = torch.zeros(
                local.shape, dtype=torch.float32, pin_memory=on_cuda and not self.offload_gradients
            )
            if on_cuda and self.offload_gradients:
                slot.staging = torch.empty(local.shape, dtype=local.dtype, pin_memory=True)
                slot.event = torch.cuda.Event()
                self._host.add_side_stream(local.device)
        self._slots.append(slot)
        self._slot_of[id(p)] = slot
        return slot

    # ---- where the state lives ----------------------------------------------------------

    def _managed_ext(self, device: torch.device):
        """The native extension when managed memory works on ``device``; else ``None``
        (after one warning: the state is paged through pinned host memory instead)."""
        if self._managed is not None or self._uvm_failed:
            return self._managed

        ext, why = cuda_ext.load(), None
        if ext is None:
            why = f"the CUDA extension is unavailable ({cuda_ext.reason()})"
        elif not ext.concurrent_managed_access(device.index):
            why = f"{device} has no concurrent managed memory access"
        if why is not None:
            self._uvm_failed = True
            warnings.warn(
                f"{type(self).__name__}: paging='uvm' falls back to paging='host' with "
                f"device_budget=0: {why}",
                PagingFallbackWarning,
                stacklevel=4,
            )
            return None
        self._managed = ext
        return ext

    def _resident_bytes(self, device: torch.device) -> int:
        return sum(
            state_nbytes(s.bits, s.numel)
            for s in self._slots
            if s.state is not None and s.state.home == "device" and s.device == device
        )

    def _choose_home(self, slot: Slot, placed: dict[torch.device, int]) -> str:
        """Home of a state about to be allocated; ``placed``: bytes placed on each device
        during this call (``paging="auto"``), updated here."""
        device = slot.device
        nbytes = state_nbytes(slot.bits, slot.numel)
        if self._host_update:
            return "host"
        if self.paging == "off":
            return "device"
        if self.paging == "uvm":
            if device.type == "cuda" and self._managed_ext(device) is not None:
                return "uvm"
            return "device" if device.type != "cuda" else "host"
        if self.paging == "auto" and device.type != "cuda":
            return "device"
        budget = float("inf") if self.paging == "auto" else 0.0
        if self.device_budget is not None:
            budget = self.device_budget
        if budget > 0:
            budget -= 2 * self.page_bytes  # room for the two page buffers
        room = budget - self._resident_bytes(device) - placed.get(device, 0)
        if self.paging == "auto":
            tracker = self._trackers.setdefault(device, AutoTracker())
            room = min(room, tracker.slack(device)[0] - placed.get(device, 0))
        if nbytes <= room:
            placed[device] = placed.get(device, 0) + nbytes
            return "device"
        return "host"

    def _allocate(self, slot: Slot, placed: dict[torch.device, int]) -> SlotState:
        home = self._choose_home(slot, placed)
        state = SlotState.allocate(slot.bits, slot.numel, home, slot.device, self._managed)
        self._set_state(slot, state)
        return state

    def _set_state(self, slot: Slot, state: SlotState) -> None:
        slot.state = state
        self.state[slot.param] = self._export(slot)

    def _export(self, slot: Slot) -> dict[str, Any]:
        """``step`` and the state tensors of ``slot`` shaped like the local parameter
        (absmax flat), aliasing the live storage: torch's ``optimizer.state[p]``."""
        st = slot.state
        entry: dict[str, Any] = {"step": st.step}
        for name, t in st.tensors.items():
            entry[name] = t if name.startswith("absmax") else t.view(slot.shape)
        if st.bits == 8:
            maps = quant_maps(st.device)
            entry["qmap1"], entry["qmap2"] = maps.qmap1, maps.qmap2
        return entry

    def _rebalance(self, device: torch.device) -> None:
        """``paging="auto"``: move states between device and host as memory pressure says."""
        tracker = self._trackers.setdefault(device, AutoTracker())
        slots = [
            s
            for s in self._slots
            if s.state is not None and s.device == device and s.state.home in ("device", "host")
        ]
        if not slots:
            return
        slack, headroom = tracker.slack(device)
        if self.device_budget is not None:
            over = self._resident_bytes(device) + 2 * self.page_bytes - self.device_budget
            slack = min(slack, -over)
        sizes = [(state_nbytes(s.bits, s.numel), s.state.home == "device") for s in slots]
        demote, promote = auto_moves(sizes, slack, headroom)
        if self.device_budget is not None:
            promote = []  # a fixed budget never grows the resident set past where it started
        if not demote and not promote:
            return
        self._synchronize()
        for i in demote:
            self._set_state(slots[i], slots[i].state.moved("host", device))
        for i in promote:
            self._set_state(slots[i], slots[i].state.moved("device", device))
        tracker.moved(sum(sizes[i][0] for i in demote), sum(sizes[i][0] for i in promote))

    # ---- step -------------------------------------------------------------------------

    def _synchronize(self) -> None:
        """Wait for every asynchronous copy of state or parameters this optimizer issued."""
        for streamer in self._streamers.values():
            streamer.synchronize()
        for pager in self._pagers.values():
            pager.synchronize()
        self._host.wait_copy_back()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step of every parameter that has a gradient.

        Parameters without a gradient are skipped (no moment decay, no weight decay), as
        in :class:`torch.optim.AdamW`. With ``offload_gradients=True`` the host gradients
        are consumed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._host_update:
            self._host.step(self.param_groups, self._allocate, self._cpu_update)
            return loss

        device_items, host_items = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(p.grad, type(self).__name__)
                slot = self._slot_of[id(p)]
                local = local_tensor(p)
                (device_items if use_triton(local) else host_items).append((group, slot))
        placed: dict[torch.device, int] = {}
        if self.paging == "auto":
            for device in {s.device for _, s in device_items if s.device.type == "cuda"}:
                self._rebalance(device)
        for _, slot in device_items + host_items:
            if slot.state is None:
                self._allocate(slot, placed)
        if host_items:
            self._synchronize()
            self._cpu_update(
                [(g, s, local_tensor(s.param), local_tensor(s.param.grad)) for g, s in host_items]
            )
        if device_items:
            self._device_update(device_items)
        return loss

    def _scalars(self, group: dict[str, Any], slot: Slot) -> StepScalars:
        slot.state.step += 1
        return StepScalars.of(
            group["lr"], group["betas"], group["eps"], group["weight_decay"], float(slot.state.step)
        )

    def _device_update(self, items: list[tuple[dict, Slot]]) -> None:
        """Fused kernels: one launch per resident parameter, one per page of paged state."""

        def launch(slot, p_flat, g_flat, tensors, sc):
            if slot.bits == 32:
                adamw_step_32bit(
                    p_flat, g_flat, tensors["exp_avg"], tensors["exp_avg_sq"], **sc.kernel_args()
                )
            else:
                maps = quant_maps(p_flat.device)
                adamw_step_8bit(
                    p_flat,
                    g_flat,
                    tensors["state1"],
                    tensors["state2"],
                    tensors["absmax1"],
                    tensors["absmax2"],
                    maps.qmap1,
                    maps.qmap2,
                    maps.bounds1,
                    maps.bounds2,
                    **sc.kernel_args(),
                )

        write_back = []
        streamed: dict[torch.device, list[Page]] = defaultdict(list)
        managed: dict[torch.device, list[Page]] = defaultdict(list)
        for group, slot in items:
            local = local_tensor(slot.param)
            work = local if local.is_contiguous() else local.contiguous()
            if work is not local:
                write_back.append((local, work))
            p_flat = work.view(-1)
            g_flat = local_tensor(slot.param.grad).contiguous().view(-1)
            sc = self._scalars(group, slot)
            st = slot.state
            if st.home == "device":
                launch(slot, p_flat, g_flat, st.tensors, sc)
                continue
            pages = streamed if st.home == "host" else managed
            for start, stop in page_ranges(slot.numel, page_elems(slot.bits, self.page_bytes)):
                pages[slot.device].append(
                    Page(
                        st,
                        start,
                        stop,
                        functools.partial(
                            _launch_page, launch, slot, p_flat[start:stop], g_flat[start:stop], sc
                        ),
                    )
                )
        for device, pages in streamed.items():
            if device not in self._streamers:
                self._streamers[device] = HostPageStreamer(device)
            self._streamers[device].run(pages)
        for device, pages in managed.items():
            if device not in self._pagers:
                self._pagers[device] = ManagedPager(self._managed, device)
            self._pagers[device].run(pages)
        for local, work in write_back:
            local.copy_(work)

    def _cpu_update(self, items: list[tuple[dict, Slot, torch.Tensor, torch.Tensor]]) -> None:
        """The update on the CPU (any tensor when ``trilora.config.backend`` is ``"torch"``):
        ``(group, slot, work, grad)``, ``work`` the tensor stepped in place (computed in fp32)
        and its gradient. 8-bit state on CPU tensors takes the native kernel, everything else
        torch ops."""
        batch: list[tuple[dict, torch.Tensor, torch.Tensor, Slot]] = []
        write_back = []
        for group, slot, work, grad in items:
            t = slot.state.tensors
            if slot.bits == 8:
                sc = self._scalars(group, slot)
                state = (t["state1"], t["state2"], t["absmax1"], t["absmax2"])
                # The native kernel steps fp32/bf16/fp16 parameters in place, with the
                # gradient as it is; it returns False (nothing done) where it does not apply.
                if work.is_contiguous() and adamw_8bit_native_(
                    work.view(-1), grad.reshape(-1), *state, quant_maps(work.device), sc
                ):
                    continue
            target = work
            if work.dtype != torch.float32 or not work.is_contiguous():
                work = work.float().contiguous()
                write_back.append((target, work))
            grad = grad.float() if grad.dtype != torch.float32 else grad
            if slot.bits == 8:
                adamw_8bit_(work.view(-1), grad.reshape(-1), *state, quant_maps(work.device), sc)
            elif work.device.type == "cpu":
                batch.append((group, work, grad, slot))
            else:  # a CUDA tensor under config.backend == "torch": the reference ops
                adamw_32bit_(
                    work,
                    grad,
                    t["exp_avg"].view(work.shape),
                    t["exp_avg_sq"].view(work.shape),
                    self._scalars(group, slot),
                )
        if batch:
            self._torch_adamw32(batch)
        for target, work in write_back:
            target.copy_(work)

    def _torch_adamw32(self, batch: list[tuple[dict, torch.Tensor, torch.Tensor, Slot]]) -> None:
        """32-bit CPU update through torch's own AdamW kernel, on our state tensors."""
        if self._inner is None:
            probe = torch.zeros(1, requires_grad=True)
            self._inner = torch.optim.AdamW(
                [probe],
                fused=True if host_kernel_is_fused() else None,
                foreach=None if host_kernel_is_fused() else False,
            )
        inner = self._inner
        groups: dict[int, dict[str, Any]] = {}
        inner.state = defaultdict(dict)
        restore = []
        for group, work, grad, slot in batch:
            key = id(group)
            if key not in groups:
                groups[key] = {
                    **inner.defaults,
                    "params": [],
                    "lr": float(group["lr"]),
                    "betas": tuple(float(b) for b in group["betas"]),
                    "eps": float(group["eps"]),
                    "weight_decay": float(group["weight_decay"]),
                }
            groups[key]["params"].append(work)
            t = slot.state.tensors
            inner.state[work] = {
                "step": slot.state.step,
                "exp_avg": t["exp_avg"].view(work.shape),
                "exp_avg_sq": t["exp_avg_sq"].view(work.shape),
            }
            if work.grad is not grad:
                restore.append((work, work.grad))
                work.grad = grad
        inner.param_groups = list(groups.values())
        try:
            inner.step()
        finally:
            for work, old in restore:
                work.grad = old
            inner.param_groups = []
            inner.state = defaultdict(dict)

    # ---- state dict ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [...]}``, laid out as torch's.

        ``state[index]``: ``step`` (0-dim fp32 tensor) with ``exp_avg`` and ``exp_avg_sq``
        (fp32, the parameter's shape) for 32-bit state, or bitsandbytes' ``state1``,
        ``state2`` (uint8), ``absmax1``, ``absmax2`` (fp32 per 256 elements), ``qmap1``,
        ``qmap2`` for 8-bit state; in host-update mode also ``master`` (fp32) for
        parameters whose dtype is not fp32, whose masters carry bits the parameter lacks.
        For DTensor parameters the tensors are DTensors sharded like them. Tensors are
        references to the live state, as in torch: save or copy the result before stepping
        again.
        """
        self._synchronize()
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state: dict[int, dict[str, Any]] = {}
        for slot in self._slots:
            if slot.state is None:
                continue
            entry = self._export(slot)
            if self._host_update and slot.param.dtype != torch.float32:
                self._host.resync(slot)
                entry["master"] = slot.master
            if is_dtensor(slot.param):
                entry = _ckpt.to_dtensors(entry, slot.param)
            state[slot.index] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, also one of :class:`torch.optim.AdamW` (32-bit state)
        or of a bitsandbytes 8-bit or 32-bit AdamW.

        Group hyperparameters and state are copied, never aliased, into this optimizer's
        storage (wherever its paging puts it). Each entry must match the state this
        optimizer keeps for the parameter (8- or 32-bit, element count, maps); otherwise
        :class:`~trilora.optim.errors.StateDictLayoutError`. Masters (host-update mode):
        a saved ``master`` is adopted when it rounds to the parameter's current value;
        otherwise the master is re-read from the parameter at its next step, so the model
        weights may be loaded before or after the optimizer state.
        """
        name = type(self).__name__
        saved_groups, saved_state = _ckpt.unwrap(state_dict, name)
        if len(saved_groups) != len(self.param_groups):
            raise StateDictLayoutError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer has {len(self.param_groups)}"
            )
        by_index: dict[Any, Slot] = {}
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise StateDictLayoutError(
                    f"loaded parameter group has {len(saved['params'])} parameters, "
                    f"the optimizer's has {len(group['params'])}"
                )
            for p, index in zip(group["params"], saved["params"]):
                by_index[index] = self._slot_of[id(p)]
            new_group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            _strip_options(new_group, name)
            _check_hparams(*(new_group.get(k, self.defaults[k]) for k in _HPARAMS))
            new_group["params"] = group["params"]
            new_groups.append(new_group)
        unknown = [k for k in saved_state if k not in by_index]
        if unknown:
            raise StateDictLayoutError(
                f"loaded state refers to unknown parameter indices {unknown}"
            )
        parsed = {
            k: _ckpt.parse_entry(entry, by_index[k], k, name, self.state_bits)
            for k, entry in saved_state.items()
        }  # validates everything before anything changes

        self._synchronize()
        self.param_groups = new_groups
        self.state = defaultdict(dict)
        placed: dict[torch.device, int] = {}
        for slot in self._slots:
            slot.state = None
            slot.synced = None  # re-read from the parameter at the next step
        for k, (step, tensors, master) in parsed.items():
            slot = by_index[k]
            st = self._allocate(slot, placed)
            for key, value in tensors.items():
                st.tensors[key].copy_(value.reshape(-1))
            st.step.fill_(step)
            if master is not None and self._host_update:
                local = local_tensor(slot.param).detach()
                master = master.to("cpu", torch.float32)
                if torch.equal(master.to(local.dtype), local.to("cpu")):
                    slot.master.copy_(master)
                    slot.synced = stamp(slot.param)

    # ---- reporting ----------------------------------------------------------------------

    def host_memory(self) -> dict[str, int]:
        """Host bytes held, by kind: ``master``, ``grad`` (accumulators), ``staging``
        (pinned D2H buffers) and ``state`` (host-paged and managed state with its step
        counters; empty until the first step allocates it)."""
        out = {"master": 0, "grad": 0, "staging": 0, "state": 0}
        for slot in self._slots:
            for kind in ("master", "grad", "staging"):
                t = getattr(slot, kind)
                if t is not None:
                    out[kind] += t.nbytes
            if slot.state is not None and slot.state.home in ("host", "uvm"):
                out["state"] += slot.state.state_bytes + slot.state.step.nbytes
        return out

    def device_memory(self) -> dict[str, int]:
        """Bytes held next to the parameters: ``state`` (resident state) and
        ``page_buffers`` (the two buffers host pages stream through)."""
        state = sum(
            s.state.state_bytes
            for s in self._slots
            if s.state is not None and s.state.home == "device"
        )
        buffers = sum(s.device_bytes for s in self._streamers.values())
        return {"state": state, "page_buffers": buffers}

    @property
    def host_bytes(self) -> int:
        """Total host bytes held (see :meth:`host_memory`)."""
        return sum(self.host_memory().values())

    @property
    def device_bytes(self) -> int:
        """Total device bytes held (see :meth:`device_memory`)."""
        return sum(self.device_memory().values())

    @property
    def pinned_bytes(self) -> int:
        """The part of :attr:`host_bytes` in page-locked memory (CUDA parameters only)."""
        total = 0
        for slot in self._slots:
            for buf in (slot.master, slot.grad, slot.staging):
                if buf is not None and buf.is_pinned():
                    total += buf.nbytes
            if slot.state is not None and slot.state.home == "host":
                total += sum(t.nbytes for t in slot.state.tensors.values() if t.is_pinned())
        return total


def _launch_page(launch, slot, p_page, g_page, sc, tensors) -> None:
    launch(slot, p_page, g_page, tensors, sc)


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit state (bitsandbytes' ``AdamW8bit``), resident."""

    def __init__(
        self,
        params: ParamsT,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class PagedAdamW(AdamW):
    """:class:`AdamW` with 32-bit state that stays on the device while it fits and is paged
    to host memory under memory pressure (``paging="auto"``), as bitsandbytes users expect of
    ``PagedAdamW``. Pass ``paging="uvm"`` for managed memory, as bitsandbytes does it."""

    def __init__(
        self,
        params: ParamsT,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("paging", "auto")
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class PagedAdamW8bit(AdamW):
    """:class:`PagedAdamW` with 8-bit state (bitsandbytes' ``PagedAdamW8bit``)."""

    def __init__(
        self,
        params: ParamsT,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("state_bits", 8)
        kwargs.setdefault("paging", "auto")
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class CPUOffloadAdamW(AdamW):
    """AdamW stepped on the CPU: state, fp32 masters and (by default) gradients in host memory.

    The :class:`AdamW` mode ``paging="host", device_budget=0`` with the update on the host,
    kept under this name for code that has it. LoRA training keeps two fp32 AdamW moments
    per trainable parameter plus the gradients on the device; for Llama-3.1-8B with r=32
    adapters on every linear layer that is ~84M parameters, ~0.93 GiB. LoRA parameters are
    few enough that an AdamW step on the CPU is cheap next to a forward/backward pass, so
    this optimizer keeps all of it in host memory:

    * ``param_groups`` hold the *device* parameters, so LR schedulers (torch's,
      transformers') work unchanged.
    * Every parameter has a host fp32 master copy (pinned when the parameter is on CUDA);
      the update (torch's fused CPU AdamW kernel for 32-bit state) steps it, and the new
      values are copied back into the device parameter after each step.
    * With ``offload_gradients=True`` a post-accumulate-grad hook moves each gradient to a
      host fp32 accumulator as soon as autograd has produced it and sets ``p.grad = None``,
      so the device never holds more than the gradients still in flight. ``False`` leaves
      gradients on ``p.grad`` and copies them to the host inside :meth:`step`.

    Semantics that differ from :class:`torch.optim.AdamW`:

    * ``offload_gradients=True``: :meth:`step` consumes the host gradients, because loops
      such as the Trainer's call ``model.zero_grad()``, which cannot reach host buffers. A
      backward after a step therefore starts from zero even without a ``zero_grad()`` in
      between; an explicit ``zero_grad(set_to_none=False)`` still yields zero gradients that
      step their parameters, as in torch. Gradients of several backward passes before one
      step accumulate in fp32 on the host. Because ``p.grad`` is ``None``,
      ``torch.nn.utils.clip_grad_norm_`` (and ``transformers.Trainer``'s ``max_grad_norm``)
      clips nothing: use :meth:`clip_grad_norm`, or with the Trainer
      :class:`~trilora.optim.OffloadClipCallback`.
    * fp16 AMP with a ``GradScaler`` needs ``p.grad`` and does not work with
      ``offload_gradients=True`` (use bf16, or ``offload_gradients=False``).
    * The fp32 master is authoritative while the device parameter is untouched, so
      bf16/fp16 parameters keep fp32 precision across steps. A parameter written from
      outside the optimizer (detected through its version counter or data pointer, e.g.
      ``model.load_state_dict``) is re-read into the master before its next step.

    CUDA ordering: gradient copies run on a side stream that waits on the stream that
    produced the gradient; the updated parameters are copied back on the parameter's
    current stream, so a forward on that stream is ordered after them.
    """

    _always_host_update = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        offload_gradients: bool = True,
        state_bits: int = 32,
        **unsupported: Any,
    ) -> None:
        if unsupported:
            names = ", ".join(sorted(unsupported))
            extra = " (amsgrad is not implemented)" if "amsgrad" in unsupported else ""
            raise TypeError(
                f"CPUOffloadAdamW got unsupported argument(s) {names}{extra}; it accepts "
                "lr, betas, eps, weight_decay, offload_gradients and state_bits"
            )
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            state_bits=state_bits,
            paging="host",
            device_budget=0,
            offload_gradients=offload_gradients,
        )


__all__ = [
    "PAGING_MODES",
    "STATE_BITS",
    "AdamW",
    "AdamW8bit",
    "CPUOffloadAdamW",
    "PagedAdamW",
    "PagedAdamW8bit",
    "host_kernel_is_fused",
]
