"""Gradient checkpointing of decoder layers, with optional activation offload to host memory.

:func:`enable_checkpointing` patches every decoder layer of a transformers model (found
generically, no per-architecture code) so that its forward runs under non-reentrant
``torch.utils.checkpoint``: only the layer's *input* survives the forward, and the layer is
recomputed during backward.

``offload=True`` moves those layer inputs off the GPU as well. Non-reentrant checkpointing
saves its inputs through ``torch.autograd.graph.saved_tensors_hooks``, so an outer pair of
hooks around each checkpointed call sees exactly the layer input:

* pack (forward): copy it into a pinned host buffer on a side CUDA stream, after the main
  stream's producer event; ``record_stream`` keeps the device block alive until the copy
  lands, after which the caching allocator reuses it. The copy overlaps the layer's compute.
* unpack (backward, just before the layer is recomputed): wait for the prefetch of this
  layer (or start it now), and immediately start the host-to-device copy of the *previous*
  layer's input on the side stream, so it overlaps this layer's recompute and backward
  (double buffering: at most two layer inputs are on the device at a time).

Pinned buffers are kept per layer across steps (``cudaHostAlloc`` is slow and synchronizing).
If pinning fails or ``pin_memory_budget`` bytes are used up, the tensor stays on the device
and a warning says so once. The last layer's input is not offloaded: backward needs it first.
On CPU tensors there is nothing to offload and this is plain checkpointing.

``mlp_chunks=k`` additionally splits each layer's ``mlp`` submodule along the sequence into
``k`` pieces, each itself checkpointed, so during the layer's backward only one piece's
intermediate activations (``[T/k, intermediate_size]`` x 3 for a gated MLP) exist at a time.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointState", "enable_checkpointing", "find_decoder_layers"]


# ---------------------------------------------------------------------------------------
# layer discovery
# ---------------------------------------------------------------------------------------


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks.

    Tries ``get_decoder().layers`` (transformers causal LMs, also through a PeftModel's
    ``base_model``), then falls back to the longest ``nn.ModuleList`` whose children are all
    of one class (ties: the one with more parameters).
    """
    candidates = [model]
    if hasattr(model, "get_base_model"):
        # a PeftModel; if it has no base model the generic fallback below still works
        with contextlib.suppress(Exception):
            candidates.append(model.get_base_model())
    for m in candidates:
        get_decoder = getattr(m, "get_decoder", None)
        if callable(get_decoder):
            try:
                dec = get_decoder()
            except Exception:
                dec = None
            layers = getattr(dec, "layers", None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    best, best_key = None, (0, 0)
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1:
                key = (len(mod), sum(p.numel() for p in mod.parameters()))
                if key > best_key:
                    best, best_key = mod, key
    if best is None:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: expected "
            "model.get_decoder().layers or an nn.ModuleList of identical blocks"
        )
    return best


def _is_fake(t: torch.Tensor) -> bool:
    from trilora.ops.attention import is_fake_tensor  # the one check of torch's private class

    return is_fake_tensor(t) or t.is_meta


# ---------------------------------------------------------------------------------------
# offload state
# ---------------------------------------------------------------------------------------


class _Offloaded:
    """A layer input living in host memory (with its copy events)."""

    __slots__ = ("device", "device_copy", "event", "host", "index", "simulated")

    def __init__(self, index, host, device, event, simulated):
        self.index, self.host, self.device, self.event = index, host, device, event
        self.device_copy = None
        self.simulated = simulated


@dataclass
class CheckpointState:
    """What :func:`enable_checkpointing` installed (returned, and stored on the model).

    ``pinned_bytes`` is the host memory held by offload buffers; ``peak_offloaded_bytes``
    the most bytes of layer inputs that were in host memory at one time.
    """

    layers: nn.ModuleList
    offload: bool
    pin_memory_budget: int | None
    mlp_chunks: int | None
    pinned_bytes: int = 0
    offloaded_bytes: int = 0
    peak_offloaded_bytes: int = 0
    fallbacks: int = 0
    # Internal: memory tracing (trilora mem) on fake CPU tensors models the device as
    # "anything not offloaded": it drops layer inputs in forward and re-allocates them at the
    # prefetch points, exactly where the CUDA path copies them.
    simulate: bool = False
    _buffers: dict = field(default_factory=dict, repr=False)
    _pending: dict = field(default_factory=dict, repr=False)
    _stream: object = field(default=None, repr=False)
    _warned: bool = field(default=False, repr=False)

    # --- pack / unpack ------------------------------------------------------------------

    def _host_buffer(self, index: int, t: torch.Tensor) -> torch.Tensor | None:
        key = (index, tuple(t.shape), t.dtype)
        buf = self._buffers.get(key)
        if buf is not None:
            return buf
        nbytes = t.numel() * t.element_size()
        if (
            self.pin_memory_budget is not None
            and self.pinned_bytes + nbytes > self.pin_memory_budget
        ):
            self._fallback(f"the pinned-memory budget of {self.pin_memory_budget} bytes is used up")
            return None
        try:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=not self.simulate)
        except RuntimeError as exc:
            self._fallback(f"pinning {nbytes} bytes failed ({exc})")
            return None
        self._buffers[key] = buf
        self.pinned_bytes += nbytes
        return buf

    def _fallback(self, why: str) -> None:
        self.fallbacks += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"trilora activation offload: {why}; keeping layer inputs on the device",
                RuntimeWarning,
                stacklevel=4,
            )

    def pack(self, index: int, t: torch.Tensor):
        if not (t.is_cuda or self.simulate):
            return t
        if self.simulate:
            # Host bytes are accounted, never allocated: 70B traces must not need 100 GB.
            nbytes = t.numel() * t.element_size()
            key = (index, tuple(t.shape), t.dtype)
            if key not in self._buffers:
                if (
                    self.pin_memory_budget is not None
                    and self.pinned_bytes + nbytes > self.pin_memory_budget
                ):
                    self._fallback(
                        f"the pinned-memory budget of {self.pin_memory_budget} bytes is used up"
                    )
                    return t
                self._buffers[key] = (tuple(t.shape), t.dtype, t.device)
                self.pinned_bytes += nbytes
            # Real CPU tensors (tests of this path) keep their values in a host copy.
            host = key if _is_fake(t) else t.detach().clone()
            handle = _Offloaded(index, host, t.device, None, True)
        else:
            host = self._host_buffer(index, t)
            if host is None:
                return t
            main = torch.cuda.current_stream(t.device)
            if self._stream is None:
                self._stream = torch.cuda.Stream(t.device)
            self._stream.wait_stream(main)
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            t.record_stream(self._stream)
            handle = _Offloaded(index, host, t.device, event, False)
        nbytes = t.numel() * t.element_size()
        self.offloaded_bytes += nbytes
        self.peak_offloaded_bytes = max(self.peak_offloaded_bytes, self.offloaded_bytes)
        self._pending[index] = handle
        return handle

    def _prefetch(self, handle: _Offloaded) -> None:
        if handle.device_copy is not None:
            return
        if handle.simulated:
            if isinstance(handle.host, torch.Tensor):
                handle.device_copy = handle.host
            else:
                shape, dtype, device = self._buffers[handle.host]
                handle.device_copy = torch.empty(shape, dtype=dtype, device=device)
            return
        # The host buffer was written by the D2H copy on the side stream; same stream, so
        # the H2D copy is ordered after it.
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(handle.event)
            handle.device_copy = handle.host.to(handle.device, non_blocking=True)
            handle.event = torch.cuda.Event()
            handle.event.record(self._stream)

    def unpack(self, obj):
        if not isinstance(obj, _Offloaded):
            return obj
        self._prefetch(obj)
        t = obj.device_copy
        if not obj.simulated:
            main = torch.cuda.current_stream(obj.device)
            main.wait_event(obj.event)
            t.record_stream(main)
        obj.device_copy = None
        if self._pending.get(obj.index) is obj:
            del self._pending[obj.index]
        self.offloaded_bytes -= t.numel() * t.element_size()
        # Double buffering: the previous layer is recomputed next; start its copy now.
        prev = self._pending.get(obj.index - 1)
        if prev is not None:
            self._prefetch(prev)
        return t


# ---------------------------------------------------------------------------------------
# patched forwards
# ---------------------------------------------------------------------------------------


def _kv_cache_types() -> tuple[type, ...]:
    # transformers' public cache base class, if transformers is in use (a model that passes a
    # cache has imported it); no import here, so plain torch models pay nothing.
    cache_utils = sys.modules.get("transformers.cache_utils")
    cache = getattr(cache_utils, "Cache", None)
    return (cache,) if isinstance(cache, type) else ()


def _without_kv_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` of a checkpointed layer call with the KV cache taken out.

    Under checkpointing the layer runs twice (forward, then the recompute in backward), so a
    cache would get this layer's keys and values appended twice, and would keep every layer's
    keys and values alive until the step ends. transformers' own checkpointing drops the cache
    for the same reason. The cache is found by its type, whatever keyword (``cache``,
    ``past_key_values``, ``past_key_value``, ``layer_past``, ...) or position carries it, so a
    renamed keyword cannot bring it back. ``use_cache`` is the one flag name every
    transformers decoder layer shares; it is switched off too, but correctness does not
    depend on it (a layer with no cache object has nothing to append to).
    """
    types = _kv_cache_types()
    if types:
        args = tuple(None if isinstance(a, types) else a for a in args)
        kwargs = {k: None if isinstance(v, types) else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _on_cuda(kwargs: dict) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_cuda for v in kwargs.values())


def _checkpointed_forward(orig, state: CheckpointState, index: int, last: bool, *args, **kwargs):
    if not torch.is_grad_enabled():
        return orig(*args, **kwargs)
    # Non-reentrant checkpoint saves *positional* tensors through the saved-tensor hooks but
    # keeps keyword arguments in a closure: pass the hidden states positionally.
    if not args and "hidden_states" in kwargs:
        args = (kwargs.pop("hidden_states"),)
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
    args, kwargs = _without_kv_cache(args, kwargs)

    def run(*a):
        return orig(*a, **kwargs)

    if state.offload and not last and hidden is None and (state.simulate or _on_cuda(kwargs)):
        # The layer input is found positionally (or as ``hidden_states=``); a model that
        # passes it otherwise still trains, checkpointed, with the input kept on the device.
        state._fallback("a decoder layer was called without a positional input tensor")
    if not state.offload or last or hidden is None:
        return checkpoint(run, *args, use_reentrant=False)

    # A weak reference: autograd keeps the pack hook alive with the saved tensor, and a
    # strong reference here would pin the very device tensor being offloaded.
    target = weakref.ref(hidden)

    def pack(t):
        return state.pack(index, t) if t is target() else t

    with torch.autograd.graph.saved_tensors_hooks(pack, state.unpack):
        return checkpoint(run, *args, use_reentrant=False)


def _chunked_mlp_forward(orig, chunks: int, x: torch.Tensor, *args, **kwargs):
    if x.dim() < 2 or x.shape[-2] < 2 or args or kwargs:
        return orig(x, *args, **kwargs)
    pieces = x.split(-(-x.shape[-2] // chunks), dim=-2)
    if not torch.is_grad_enabled():
        return torch.cat([orig(p) for p in pieces], dim=-2)
    return torch.cat([checkpoint(orig, p, use_reentrant=False) for p in pieces], dim=-2)


def enable_checkpointing(
    model: nn.Module,
    offload: bool = False,
    pin_memory_budget: int | None = None,
    mlp_chunks: int | None = None,
) -> CheckpointState:
    """Checkpoint every decoder layer of ``model`` (non-reentrant), optionally offloading.

    Args:
        model: a transformers decoder model, causal LM, or a PeftModel wrapping one (any
            module whose decoder blocks form an ``nn.ModuleList``).
        offload: keep each checkpointed layer's input in pinned host memory between forward
            and backward (CUDA only; on CPU this is plain checkpointing).
        pin_memory_budget: most bytes of pinned host memory to use; beyond it layer inputs
            stay on the device (with one warning). None: unlimited.
        mlp_chunks: if > 1, run each layer's ``mlp`` submodule in this many checkpointed
            pieces along the sequence, bounding its intermediate activations.

    Returns:
        The :class:`CheckpointState` (also at ``model._trilora_checkpoint``), which reports
        pinned and offloaded bytes.

    Calling it again replaces the previous patching. Gradients equal those without
    checkpointing (the recompute replays the RNG state, so dropout masks match too).
    """
    if mlp_chunks is not None and (not isinstance(mlp_chunks, int) or mlp_chunks < 1):
        raise ValueError(f"mlp_chunks must be a positive int or None, got {mlp_chunks!r}")
    if pin_memory_budget is not None and pin_memory_budget < 0:
        raise ValueError(f"pin_memory_budget must be >= 0 bytes or None, got {pin_memory_budget}")
    layers = find_decoder_layers(model)
    disable_checkpointing(model)
    state = CheckpointState(layers, offload, pin_memory_budget, mlp_chunks)
    # transformers' own checkpointing would checkpoint again inside ours.
    if hasattr(model, "gradient_checkpointing_disable") and any(
        getattr(m, "gradient_checkpointing", False) for m in layers
    ):
        model.gradient_checkpointing_disable()
    n = len(layers)
    for i, layer in enumerate(layers):
        layer.forward = functools.partial(
            _checkpointed_forward, type(layer).forward.__get__(layer), state, i, i == n - 1
        )
        mlp = getattr(layer, "mlp", None)
        if mlp_chunks and mlp_chunks > 1 and isinstance(mlp, nn.Module):
            mlp.forward = functools.partial(
                _chunked_mlp_forward, type(mlp).forward.__get__(mlp), mlp_chunks
            )
    model._trilora_checkpoint = state
    return state


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing` (no-op if it was not enabled)."""
    state = getattr(model, "_trilora_checkpoint", None)
    if state is None:
        return
    for layer in state.layers:
        layer.__dict__.pop("forward", None)
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module):
            mlp.__dict__.pop("forward", None)
    del model._trilora_checkpoint
