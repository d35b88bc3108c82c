"""Peak device memory of one QLoRA training step, traced on fake tensors.

:func:`trace_trilora` builds the model from its transformers config on the meta device,
swaps every targeted ``nn.Linear`` for a trilora quantized layer with a LoRA adapter
(:func:`~trilora.nn.lora_shell`; the others for a plain :class:`~trilora.nn.QuantizedLinear`)
in the format ``MemOptions.quant_type`` names, materializes it as *fake* CPU tensors
(``FakeTensorMode``: shapes, dtypes and allocations, no data), installs
:func:`~trilora.patches.activation_checkpointing.enable_checkpointing` and
:func:`~trilora.patches.fused_loss.enable_fused_cross_entropy`, and runs one real training step
(forward, loss, backward, optimizer step) through trilora's own code under
``torch.distributed._tools.mem_tracker.MemTracker``. Every tensor the step allocates is
seen, with its category (parameter, buffer, gradient, activation, temporary, optimizer
state), and the peak is reported; nothing needs the weights or a GPU.

What fake tensors cannot see is added as documented constants (:data:`trilora.memory.report.OVERHEADS`):
the CUDA context, cuBLAS workspaces, the caching allocator's fragmentation, and scratch
buffers allocated *inside* custom ops (the dequantized weight of the cuBLAS fallback of
``qlora_linear`` when a call has more than ``fused_max_tokens`` rows). The optimizer side
(which state lives where, per ``--optimizer`` mode) is :mod:`trilora.memory.optimizer_model`.

Attention: the model is built with ``attn_implementation="sdpa"`` and no padding mask, so
``F.scaled_dot_product_attention`` runs causal with no mask and dispatches to the flash
kernel, whose memory is O(T): it saves q, k, v, the output and a per-row logsumexp; the
T x T scores never exist. On CUDA that is FlashAttention-2 (or cuDNN/efficient attention,
the same footprint); under the trace it is the CPU flash kernel's meta function with the
same saved tensors.

Depths, the fast model and the search over budgets: :mod:`trilora.memory.depth`,
:mod:`trilora.memory.fast` and :mod:`trilora.memory.search`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from trilora import patches, presets
from trilora.config import config as runtime
from trilora.config import override
from trilora.formats import QuantConfig
from trilora.memory import optimizer_model, timeline
from trilora.memory.attention import register
from trilora.memory.moe import check_traceable
from trilora.memory.optimizer_model import OPTIMIZER_NAMES
from trilora.memory.report import (
    MemOptions,
    MemReport,
    compute_dtype,
    overheads_of,
    provider_options,
)
from trilora.nn import QuantizedLinear, lora_shell
from trilora.patches.activation_checkpointing import find_decoder_layers

REQUIRED_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)

# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    """Names of the bundled model configs (``python/trilora/presets/*.json``)."""
    return presets.names()


def load_config(source: str | os.PathLike | dict):
    """A transformers config from a preset name, a config.json, a model folder or a dict.

    Raises ValueError naming the missing field for a malformed config, and listing the
    presets for an unknown name.
    """
    raw = dict(source) if isinstance(source, dict) else presets.read_model_config(source)
    # text config of multimodal wrappers
    if "text_config" in raw and "hidden_size" not in raw:
        raw = {
            **raw["text_config"],
            "model_type": raw["text_config"].get("model_type", raw.get("model_type")),
        }
    for name in REQUIRED_FIELDS:
        if name not in raw:
            raise ValueError(
                f"model config is missing the field {name!r} (needed: {', '.join(REQUIRED_FIELDS)})"
            )
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    raw.pop("quantization_config", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except ValueError as exc:
        raise ValueError(f"unsupported model_type {model_type!r}: {exc}") from exc


def meta_causal_lm(config, opts: MemOptions, num_layers: int | None, make_linear) -> nn.Module:
    """``config``'s causal LM on the meta device (flash-style attention, no KV cache), every
    ``nn.Linear`` but the output head replaced by ``make_linear(name, linear, dtype)``.

    Shared by the trilora trace and the bitsandbytes + PEFT baseline, so both trace the very
    same architecture.
    """
    config = _with_layers(config, num_layers)
    config.use_cache = False
    dt = compute_dtype(opts)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(
            config, dtype=dt, attn_implementation=register(opts.grouped_attention)
        )
    head = model.get_output_embeddings()
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child is not head:
                setattr(mod, name, make_linear(name, child, dt))
    return model


def build_meta_model(config, opts: MemOptions, num_layers: int | None = None) -> nn.Module:
    """The causal LM on the meta device, with trilora quantized layers (``opts.quant_type``'s
    format) in the decoder, a LoRA adapter on each targeted one."""
    quant = quant_config(opts)

    def make(name: str, child: nn.Linear, dt: torch.dtype) -> nn.Module:
        layer_quant = quant.replace(compute_dtype=dt)
        bias = child.bias is not None
        if opts.targets is None or name in opts.targets:
            return lora_shell(
                child.in_features,
                child.out_features,
                bias,
                layer_quant,
                r=opts.r,
                lora_alpha=opts.lora_alpha,
                weight_dtype=dt,
                device="meta",
            )
        return QuantizedLinear.shell(
            child.in_features, child.out_features, bias, layer_quant, dt, "meta"
        )

    model = meta_causal_lm(config, opts, num_layers, make)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def quant_config(opts: MemOptions) -> QuantConfig:
    """The :class:`~trilora.formats.QuantConfig` of the base weights ``opts`` describes."""
    return QuantConfig(opts.quant_type, opts.blocksize, opts.double_quant)


def _with_layers(config, num_layers):
    if num_layers is None:
        return config
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers
    for name in ("layer_types", "mlp_only_layers"):
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) > num_layers:
            setattr(config, name, value[:num_layers])
    return config


def static_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's own tensors: quantized base weights (the codes), their
    quantization state (absmax, scales, tables), LoRA, the rest."""
    out = {"base_weights": 0, "quant_state": 0, "lora_params": 0, "other_frozen": 0}
    seen = set()
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            out["base_weights"] += _nbytes(mod.weight)
            seen.add(id(mod.weight))
            for b in mod.buffers(recurse=False):
                out["quant_state"] += _nbytes(b)
                seen.add(id(b))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out["lora_params" if p.requires_grad else "other_frozen"] += _nbytes(p)
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            out["other_frozen"] += _nbytes(b)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------


def _tracker_class():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    device_query = torch.ops.prim.device.default

    class FrozenAwareMemTracker(MemTracker):
        """MemTracker that hooks gradients of trainable parameters only, with an O(depth)
        peak update, and an optional per-op recorder.

        The stock tracker registers a gradient hook on every parameter, which raises for the
        frozen 4-bit weights of a QLoRA model. Its per-op peak update also walks every
        module it has seen (~500 for a 32-layer model) to find the active ones; with the
        thousands of chunk ops of a long-context step that walk was over half of a trace's
        time. Here the active modules (``_mod_tracker.parents``, a handful of names) are
        looked up in a name index instead; the recorded peaks are the same.

        ``recorder`` (a :class:`~trilora.memory.timeline.TimelineRecorder`), if set, gets
        the snapshot after every op (exactly the points where the tracker updates its peak)
        and is told about each op before it runs, to mark loops.
        """

        recorder = None
        module_peaks = True  # each module's own peak (by_module); off for timeline samples

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:

                def grad_hook(g: torch.Tensor) -> None:
                    self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)

                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                        h1 = p.register_hook(grad_hook)
                        h2 = p.register_post_accumulate_grad_hook(lambda q: grad_hook(q.grad))
                        self._param_to_grad_hook_handles[p] = (h1, h2)
            return out

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is device_query:
                # ``tensor.device`` of a fake tensor dispatches prim::device: two thirds of
                # a trace's dispatches, most from the tracker's own bookkeeping. It
                # allocates nothing, so it cannot change the memory or the peak.
                return func(*args, **(kwargs or {}))
            if self.recorder is not None:
                backward = bool(getattr(self._mod_tracker, "is_bw", False))
                self.recorder.op(func.name().split(".")[0], backward)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _update_peak_stats(self, peak_state) -> None:
            curr_snap = self._curr_mem_snap
            if self.module_peaks:
                # The fqn index is rebuilt only when a module is added: several modules can
                # share an fqn, so the index's own length cannot tell, and each rebuild walks
                # a weak dictionary of every module (a quarter of a trace's time when it was
                # rebuilt on every op).
                index = self.__dict__.get("_stats_by_fqn")
                tracked = len(self.memory_tracking)
                if index is None or self.__dict__.get("_stats_indexed") != tracked:
                    index = {s.mod_fqn: s for s in self.memory_tracking.values()}
                    self._stats_by_fqn, self._stats_indexed = index, tracked
                for fqn in self._mod_tracker.parents:
                    stats = index.get(fqn)
                    if stats is None or peak_state not in stats.snapshots:
                        continue
                    for dev, dev_snap in curr_snap.items():
                        if stats.local_peak.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                            stats.local_peak[dev] = dev_snap[_TOTAL_KEY]
                            # bytes by category: a flat dict of ints
                            stats.snapshots[peak_state][-1][dev] = dict(dev_snap)
            for dev, dev_snap in curr_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(dev_snap)
            if self.recorder is not None:
                self.recorder.row(_one_device(curr_snap))

    return FrozenAwareMemTracker


def _one_device(snap: dict) -> dict:
    # Fake CPU tensors live on one device; an empty snapshot (nothing allocated) is zeros.
    return max(snap.values(), key=lambda d: d.get("Total", 0)) if snap else {}


def track_step(
    model: nn.Module, optimizer, step_fn, recorder=None
) -> tuple[dict[str, int], dict[str, int]]:
    """Run ``step_fn()`` under the tracker; return (peak snapshot by category, module peaks).

    ``recorder``: a :class:`~trilora.memory.timeline.TimelineRecorder` that receives the
    snapshot after every op (and one before the first).
    """
    tracker = _tracker_class()()
    tracker.recorder = recorder
    # A timeline sample is never reported with module peaks (its report is extrapolated).
    tracker.module_peaks = recorder is None
    tracker.track_external(model, optimizer)
    with tracker:
        if recorder is not None:
            recorder.row(_one_device(tracker.get_tracker_snapshot()))
        step_fn()
    snap = tracker.get_tracker_snapshot("peak")
    dev_snap = max(snap.values(), key=lambda d: d.get("Total", 0)) if snap else {}
    cats = {str(getattr(k, "value", k)): int(v) for k, v in dev_snap.items() if k != "Total"}
    names = {m: n for n, m in model.named_modules()}
    by_module = {}
    for mod, stats in tracker.memory_tracking.items():
        name = names.get(mod)
        if name is None:
            continue
        peak = max(stats.local_peak.values(), default=0)
        by_module[name or "<model>"] = int(peak)
    return cats, by_module


def _init_optimizer_state(optimizer, params) -> None:
    # Training is in steady state from step 2 on: the optimizer state already exists while
    # forward and backward run. Create it before tracing with one step on zero gradients.
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _linear_shapes(model: nn.Module) -> tuple[tuple[bool, int, int], ...]:
    """``(in the MLP, in_features, out_features)`` of every quantized linear layer."""
    return tuple(
        (".mlp." in f".{name}.", mod.in_features, mod.out_features)
        for name, mod in model.named_modules()
        if isinstance(mod, QuantizedLinear)
    )


def _internal_scratch(linears, opts: MemOptions) -> int:
    """Bytes allocated inside ``qlora_linear`` that its fake implementation does not show.

    Calls with more than ``fused_max_tokens`` rows dequantize the weight into a transient
    ``[N, K]`` buffer for cuBLAS (forward and backward); only one exists at a time.
    ``linears``: :func:`_linear_shapes` of the model.
    """
    full = opts.batch * opts.seq_len
    chunks = opts.resolved_mlp_chunks() if opts.checkpointing else None
    mlp = opts.batch * math.ceil(opts.seq_len / chunks) if chunks else full
    biggest = 0
    for in_mlp, k, n in linears:
        if (mlp if in_mlp else full) > runtime.fused_max_tokens:
            biggest = max(biggest, k * n * compute_dtype(opts).itemsize)
    return biggest


def make_optimizer(params, kind: str):
    """The optimizer whose state the trace allocates: ``torch.optim.AdamW`` with fp32
    states, multi-tensor (``foreach``) as on CUDA, for every ``kind``.

    Each report then replaces the traced state by optimizer ``kind``'s own device bytes
    (:func:`trilora.memory.optimizer_model.apply`: 8-bit blocks, paging, CPU offload); an
    optimizer that moves gradients to the host during backward is traced with each gradient
    dropped as soon as it is accumulated (see :func:`trace_training_step`).
    """
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, got {kind!r}")
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def trace_training_step(
    model: nn.Module, opts: MemOptions, recorder=None
) -> tuple[dict[str, int], dict[str, int], list[torch.Tensor]]:
    """Track one steady-state training step of ``model``: forward with labels on a
    ``[batch, seq_len]`` batch, backward, and an optimizer step whose state already exists.

    Returns the tracker's ``(categories, by_module)`` and the trainable parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, opts.optimizer)
    _init_optimizer_state(optimizer, params)
    ids = torch.zeros((opts.batch, opts.seq_len), dtype=torch.long)
    offloaded = optimizer_model.offloads_gradients(opts.optimizer)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        hooks = []
        if offloaded:
            # e.g. CPUOffloadAdamW copies each gradient to host memory from a post-accumulate
            # hook and drops the device tensor. Registered after the forward, so the
            # tracker's own gradient hooks (installed during it) run first and see it.
            hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params]
        loss.backward()
        for h in hooks:
            h.remove()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cats, by_module = track_step(model, optimizer, step, recorder)
    return cats, by_module, params


@contextlib.contextmanager
def layer_progress(model: nn.Module, tick):
    """Call ``tick()`` when each decoder layer starts its forward and its backward (two
    calls per layer and step, whatever the checkpointing does), through public hooks."""
    if tick is None:
        yield
        return
    seen: set = set()

    def once(key) -> None:
        if key not in seen:
            seen.add(key)
            tick()

    def pre(i):
        return lambda module, args: once(("forward", i))

    def post(i):
        def hook(module, args, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g: once(("backward", i)))

        return hook

    handles = []
    for i, layer in enumerate(find_decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(pre(i)))
        handles.append(layer.register_forward_hook(post(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepTrace:
    """One traced step, with what turns any tracker snapshot of the same model into a report.

    The fast path (:mod:`trilora.memory.fast`) extrapolates the tracker snapshot and keeps
    everything else from a short trace: the static breakdown, the trainable tensors (what
    the optimizer model counts) and the embedding bytes do not depend on the length.
    """

    provider: str
    name: str
    opts: MemOptions
    layers: int
    static: dict[str, int]
    trainable_numels: tuple[int, ...]  # elements of each trainable tensor (optimizer model)
    trainable_itemsize: int  # bytes per element of the trainable tensors (and gradients)
    host_embedding: int
    host_pinned: int
    linears: tuple  # _linear_shapes (scratch of the dequantize fallback); () for bnb_peft
    cats: dict[str, int]  # tracker categories at the peak
    by_module: dict[str, int]
    seconds: float

    def report(
        self,
        cats: dict[str, int] | None = None,
        opts: MemOptions | None = None,
        host_pinned: int | None = None,
        method: str = "full",
        seconds: float | None = None,
    ) -> MemReport:
        """The :class:`MemReport` of this trace, or of ``cats`` (a tracker snapshot of the
        same model at options ``opts``) when given."""
        opts = provider_options(self.provider, opts or self.opts)
        categories = _categorize(self.cats if cats is None else cats, self.static)
        # The tracker sees the table as a parameter on the (fake) CPU device like every other
        # tensor; offloaded, it is host memory.
        categories["other_frozen"] -= self.host_embedding
        host_optimizer = optimizer_model.apply(
            categories, opts.optimizer, self.trainable_numels, self.trainable_itemsize
        )
        categories["temporaries"] += _internal_scratch(self.linears, opts)
        return MemReport(
            provider=self.provider,
            model=self.name,
            options=_report_options(self.provider, opts),
            categories=categories,
            overheads=overheads_of(categories),
            host_pinned=self.host_pinned if host_pinned is None else host_pinned,
            by_module=_summarize_modules(self.by_module, self.layers) if cats is None else {},
            layers_traced=self.layers,
            layers=self.layers,
            trace_seconds=self.seconds if seconds is None else seconds,
            host_embedding=self.host_embedding,
            host_optimizer=host_optimizer,
            method=method,
        )


def _report_options(provider: str, opts: MemOptions) -> dict:
    if provider == "bnb_peft":
        # what the baseline runs, whatever trilora's options were
        return {
            **asdict(opts),
            "offload": False,
            "mlp_chunks": None,
            "fused_ce": False,
            "fused_norm": False,
            "grouped_attention": False,
            "offload_embeddings": False,
        }
    return asdict(opts)


def trace_trilora(
    config,
    opts: MemOptions,
    num_layers: int | None = None,
    name: str = "",
    fake: bool = True,
    recorder=None,
    on_layer=None,
) -> StepTrace:
    """Trace one trilora training step of ``config`` on fake tensors (full depth by default).

    ``fake=False`` runs the same step on real CPU tensors under the same tracker (small
    models only): the tests check that both agree. ``recorder``: a
    :class:`~trilora.memory.timeline.TimelineRecorder` for the per-op timeline (MLP chunks
    and loss chunks marked); ``on_layer``: called as each layer starts its forward and its
    backward (progress).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    opts.validate()
    check_supported(config, opts)
    check_traceable(config)
    t0 = time.perf_counter()
    model = build_meta_model(config, opts, num_layers)
    layers = model.config.num_hidden_layers
    static = static_breakdown(model)
    linears = _linear_shapes(model)
    # allow_non_fake_inputs: to_empty() converts the meta parameters inside the mode. A real
    # step multiplies in the model's dtype, as a GPU does: a CPU without bf16 matrix units
    # would otherwise widen bf16 products to fp32 (config.cpu_half_matmul), temporaries the
    # traced device never holds.
    mode = (
        FakeTensorMode(allow_non_fake_inputs=True) if fake else override(cpu_half_matmul="native")
    )
    with mode, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to_empty(device="cpu")
        if not fake:
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point():
                        p.normal_(0, 0.02)
        model.train()
        if recorder is not None:
            timeline.instrument_chunks(model, recorder)
        state, host_embedding = apply_memory_options(model, opts, simulate=fake)
        if recorder is not None:
            timeline.instrument_loops(model, recorder)
        with layer_progress(model, on_layer):
            cats, by_module, params = trace_training_step(model, opts, recorder)
    return StepTrace(
        provider="trilora",
        name=name,
        opts=opts,
        layers=layers,
        static=static,
        trainable_numels=tuple(p.numel() for p in params),
        trainable_itemsize=trainable_itemsize(params),
        host_embedding=host_embedding,
        host_pinned=state.pinned_bytes if state is not None and opts.offload else 0,
        linears=linears,
        cats=cats,
        by_module=by_module,
        seconds=time.perf_counter() - t0,
    )


def trainable_itemsize(params) -> int:
    """Bytes per element of the trainable tensors (the LoRA dtype; 4 when there are none)."""
    return params[0].element_size() if params else 4


def check_supported(config, opts: MemOptions) -> None:
    """Raise ValueError, saying why, for a configuration trilora's step cannot run.

    Grouped attention hands the calls it cannot serve to transformers' SDPA attention, which
    rejects attention-logit soft-capping (Gemma-2's ``attn_logit_softcapping``): that step
    fails on a GPU as it would in the trace.
    """
    cap = getattr(config, "attn_logit_softcapping", None)
    if opts.grouped_attention and cap not in (None, 0, 0.0):
        raise ValueError(
            f"--grouped-attention cannot run this model: its attention is soft-capped "
            f"(attn_logit_softcapping={cap}), which trilora's grouped attention leaves to "
            "transformers' SDPA attention, and SDPA does not support soft-capping; trace it "
            "without --grouped-attention (FlashAttention-2 soft-caps, same memory)"
        )


def profile_trilora(
    config, opts: MemOptions, num_layers: int | None = None, name: str = "", fake: bool = True
) -> MemReport:
    """The report of :func:`trace_trilora` (one step, full depth by default)."""
    return trace_trilora(config, opts, num_layers, name, fake).report()


def patch_options(opts: MemOptions, simulate: bool = False) -> patches.PatchOptions:
    """The :class:`trilora.patches.PatchOptions` of the memory features ``opts`` asks for
    (the same patches a user installs); ``simulate`` marks a fake-tensor trace, whose
    activation offload only accounts host bytes."""
    return patches.PatchOptions(
        checkpointing=opts.checkpointing,
        offload=opts.offload,
        pin_memory_budget=opts.pin_memory_budget,
        mlp_chunks=opts.resolved_mlp_chunks() or None,
        simulate_offload=simulate,
        fused_cross_entropy=opts.fused_ce,
        fused_rms_norm=opts.fused_norm,
        offload_embeddings=opts.offload_embeddings,
    )


def apply_memory_options(
    model: nn.Module, opts: MemOptions, simulate: bool = False
) -> tuple[patches.activation_checkpointing.CheckpointState | None, int]:
    """Install the memory features ``opts`` asks for on ``model`` (:func:`trilora.patches.apply`).

    Returns the checkpointing state (None without checkpointing) and the bytes of an
    input-embedding table moved to host memory.
    """
    result = patches.apply(model, patch_options(opts, simulate))
    return result.checkpoint_state, result.host_embedding_bytes


def _categorize(cats: dict[str, int], static: dict[str, int]) -> dict[str, int]:
    """Tracker categories -> report categories (parameters split with the static breakdown)."""
    params = cats.get("Parameter", 0) + cats.get("Buffer", 0)
    out = dict(static)
    # Anything the tracker counts as a parameter or buffer beyond the model's own tensors
    # (e.g. the rotary inv_freq buffer) goes to other_frozen.
    out["other_frozen"] += max(0, params - sum(static.values()))
    out["gradients"] = cats.get("Gradient", 0)
    out["optimizer_state"] = cats.get("Optstate", 0)
    out["activations"] = cats.get("Activation", 0)
    out["temporaries"] = cats.get("Temp", 0) + cats.get("Other", 0)
    return out


def _summarize_modules(by_module: dict[str, int], layers: int) -> dict[str, int]:
    """Peaks of the top-level modules, the first and last decoder layer, and the loss head."""
    keep = {}
    for name, peak in by_module.items():
        parts = name.split(".")
        if (
            name == "<model>"
            or len(parts) <= 2
            or (parts[-2] == "layers" and parts[-1] in ("0", str(layers - 1)))
        ):
            keep[name] = peak
    return keep
