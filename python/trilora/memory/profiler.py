"""Peak device memory of one QLoRA training step, traced on fake tensors.

:func:`trace_trilora` builds the model from its transformers config on the meta device,
swaps every targeted ``nn.Linear`` for trilora's :class:`~trilora.nn.QLoraLinear` (others
for :class:`~trilora.nn.Linear4bit`), materializes it as *fake* CPU tensors
(``FakeTensorMode``: shapes, dtypes and allocations, no data), installs
:func:`~trilora.checkpoint.enable_checkpointing` and
:func:`~trilora.fused_loss.enable_fused_cross_entropy`, and runs one real training step
(forward, loss, backward, optimizer step) through trilora's own code under
``torch.distributed._tools.mem_tracker.MemTracker``. Every tensor the step allocates is
seen, with its category (parameter, buffer, gradient, activation, temporary, optimizer
state), and the peak is reported; nothing needs the weights or a GPU.

What fake tensors cannot see is added as documented constants (:data:`OVERHEADS`):
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

Three depths (``profile(depth=...)``):

* ``"full"`` traces every layer (``trilora mem --confirm``);
* ``"extrapolate"``: decoder layers are identical, so every category is affine in the
  number of layers once the peak sits at the same point of the step; it traces
  :func:`depth_samples` layers (3 and 4) at the full length and extrapolates;
* ``"fast"`` (the default of the CLI): :class:`trilora.memory.fast.FastProfiler`, which
  also extrapolates along the length, exactly, from three short traces
  (:mod:`trilora.memory.timeline`): seconds for any length on the lattice of regular
  lengths (multiples of 2,048 tokens with auto MLP chunks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from trilora.memory import optimizer_model
from trilora.memory.optimizer_model import OPTIMIZER_NAMES

GiB = 1024**3
MiB = 1024**2

# --- allocator and runtime overheads that fake tensors cannot see ------------------------
OVERHEADS = {
    # CUDA context, loaded kernel images and the NCCL-free runtime of a torch 2.x process on
    # H100/A100 with lazy module loading: typically 450-600 MiB (nvidia-smi minus
    # torch.cuda.memory_reserved on an idle process).
    "cuda_context": 600 * MiB,
    # cuBLAS + cuBLASLt workspaces: torch's default CUBLAS_WORKSPACE_CONFIG on sm_90 is
    # ":4096:8" (32 MiB) per handle; one handle for the main and one for the side stream.
    "cublas_workspace": 64 * MiB,
}
# The caching allocator rounds and splits blocks; with transient activations that change
# size every layer the reserved-minus-allocated gap is a few percent (less with
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True). Charged on the dynamic part only:
# weights and optimizer state are allocated once, in exact-sized blocks.
FRAGMENTATION = 0.05

REQUIRED_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)
PROVIDERS = ("trilora", "bnb_peft")
DEPTHS = ("full", "extrapolate", "fast")

# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    """Names of the bundled model configs (``python/trilora/presets/*.json``)."""
    from trilora import presets

    return presets.names()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def load_config(source: str | os.PathLike | dict):
    """A transformers config from a preset name, a config.json, a model folder or a dict.

    Raises ValueError naming the missing field for a malformed config, and listing the
    presets for an unknown name.
    """
    from transformers import AutoConfig

    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"{source} has no config.json")
            raw = _read_json(path)
        elif path.is_file():
            raw = _read_json(path)
        elif str(source) in preset_names():
            from trilora import presets

            raw = presets.load(str(source))
        else:
            raise ValueError(
                f"unknown model {str(source)!r}: not a file, a folder with config.json, or a "
                f"preset; known presets: {', '.join(preset_names())}"
            )
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


# ---------------------------------------------------------------------------------------
# options and report
# ---------------------------------------------------------------------------------------


# "auto" MLP chunking: pieces of this many tokens per sequence. Each piece's intermediate
# activations are [2048, intermediate_size] (56 MiB per tensor for Llama-3.1-8B in bf16),
# constant in the context length; 2048 rows is also config.fused_max_tokens, so the chunk's
# projections stay on the fused dequantize-matmul kernels (no dequantized weight scratch),
# and its GEMMs (2048 x 4096 x 14336, 240 GFLOP) are still large enough to run near peak.
MLP_CHUNK_TOKENS = 2048


@dataclass
class MemOptions:
    """One training step to trace (see ``trilora mem --help`` for the meaning of each)."""

    seq_len: int = 8192
    batch: int = 1
    r: int = 32
    lora_alpha: float = 16.0
    targets: tuple[str, ...] | None = None  # None: every nn.Linear in the decoder
    optimizer: str = "adamw"
    checkpointing: bool = True
    offload: bool = True
    # MLP sequence chunks: a count, None (off) or "auto" (pieces of MLP_CHUNK_TOKENS tokens)
    mlp_chunks: int | str | None = "auto"
    fused_ce: bool = True
    # Llama-style RMSNorm layers run through trilora.ops.rms_norm (trilora.fused_norm)
    fused_norm: bool = True
    # attention one key/value head group at a time (trilora.enable_grouped_attention)
    grouped_attention: bool = False
    # the frozen input-embedding table stays in host memory (trilora.offload)
    offload_embeddings: bool = False
    pin_memory_budget: int | None = None
    dtype: str = "bfloat16"
    blocksize: int = 64
    double_quant: bool = True

    def resolved_mlp_chunks(self) -> int | None:
        """The chunk count passed to :func:`~trilora.checkpoint.enable_checkpointing`."""
        if self.mlp_chunks == "auto":
            return max(1, math.ceil(self.seq_len / MLP_CHUNK_TOKENS))
        return self.mlp_chunks

    def validate(self) -> None:
        if self.mlp_chunks not in (None, "auto") and (
            not isinstance(self.mlp_chunks, int) or self.mlp_chunks < 0
        ):
            raise ValueError(
                f"mlp_chunks must be an int >= 0, None or 'auto', got {self.mlp_chunks!r}"
            )
        if self.seq_len < 2 or self.batch < 1:
            raise ValueError(
                f"need seq_len >= 2 and batch >= 1, got {self.seq_len} and {self.batch}"
            )
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, got {self.optimizer!r}"
            )
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype}")


@dataclass
class MemReport:
    """Peak device memory of one step, in bytes, by category."""

    provider: str
    model: str
    options: dict
    categories: dict[str, int]  # at the moment of the peak
    overheads: dict[str, int]
    host_pinned: int
    by_module: dict[str, int] = field(default_factory=dict)  # each module's own peak
    layers_traced: int = 0
    layers: int = 0
    trace_seconds: float = 0.0
    host_embedding: int = 0  # pageable host bytes of an offloaded input-embedding table
    host_optimizer: int = 0  # pinned + pageable host bytes of a CPU-offloaded optimizer
    # how the numbers were obtained: "full" (every layer traced), "extrapolated" (depth
    # extrapolated from a few layers at this length), "lattice" (also extrapolated along the
    # length from short traces, trilora.memory.timeline)
    method: str = "full"

    @property
    def traced_peak(self) -> int:
        """Peak of the tensors the trace sees (what ``torch.cuda.max_memory_allocated`` reports)."""
        return sum(self.categories.values())

    @property
    def total(self) -> int:
        """Device memory needed: traced peak plus overheads."""
        return self.traced_peak + sum(self.overheads.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["traced_peak"] = self.traced_peak
        d["total"] = self.total
        return d


# ---------------------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------------------


def _dtype(opts: MemOptions) -> torch.dtype:
    return getattr(torch, opts.dtype)


def meta_causal_lm(config, opts: MemOptions, num_layers: int | None, make_linear) -> nn.Module:
    """``config``'s causal LM on the meta device (flash-style attention, no KV cache), every
    ``nn.Linear`` but the output head replaced by ``make_linear(name, linear, dtype)``.

    Shared by the trilora trace and the bitsandbytes + PEFT baseline, so both trace the very
    same architecture.
    """
    from transformers import AutoModelForCausalLM

    from trilora.memory.attention import register

    config = _with_layers(config, num_layers)
    config.use_cache = False
    dt = _dtype(opts)
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
    """The causal LM on the meta device, with trilora 4-bit/LoRA layers in the decoder."""
    from trilora.nn import Linear4bit, QLoraLinear

    def make(name: str, child: nn.Linear, dt: torch.dtype) -> nn.Module:
        common = dict(
            bias=child.bias is not None, blocksize=opts.blocksize, double_quant=opts.double_quant,
            compute_dtype=dt, weight_dtype=dt, device="meta",
        )  # fmt: skip
        if opts.targets is None or name in opts.targets:
            return QLoraLinear(
                child.in_features,
                child.out_features,
                r=opts.r,
                lora_alpha=opts.lora_alpha,
                **common,
            )
        return Linear4bit(child.in_features, child.out_features, **common)

    model = meta_causal_lm(config, opts, num_layers, make)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def _with_layers(config, num_layers):
    if num_layers is None:
        return config
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers
    for name in ("layer_types", "mlp_only_layers"):
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) > num_layers:
            setattr(config, name, value[:num_layers])
    return config


def static_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's own tensors: 4-bit weights, quantization state, LoRA, the rest."""
    from trilora.nn import Linear4bit

    out = {"base_weights_4bit": 0, "quant_state": 0, "lora_params": 0, "other_frozen": 0}
    seen = set()
    for mod in model.modules():
        if isinstance(mod, Linear4bit):
            out["base_weights_4bit"] += _nbytes(mod.weight)
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
                index = self.__dict__.get("_stats_by_fqn")
                if index is None or len(index) != len(self.memory_tracking):
                    index = {s.mod_fqn: s for s in self.memory_tracking.values()}
                    self._stats_by_fqn = index
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
    """``(in the MLP, in_features, out_features)`` of every 4-bit linear layer."""
    from trilora.nn import Linear4bit

    return tuple(
        (".mlp." in f".{name}.", mod.in_features, mod.out_features)
        for name, mod in model.named_modules()
        if isinstance(mod, Linear4bit)
    )


def _internal_scratch(linears, opts: MemOptions) -> int:
    """Bytes allocated inside ``qlora_linear`` that its fake implementation does not show.

    Calls with more than ``fused_max_tokens`` rows dequantize the weight into a transient
    ``[N, K]`` buffer for cuBLAS (forward and backward); only one exists at a time.
    ``linears``: :func:`_linear_shapes` of the model.
    """
    from trilora.config import config as runtime

    full = opts.batch * opts.seq_len
    chunks = opts.resolved_mlp_chunks() if opts.checkpointing else None
    mlp = opts.batch * math.ceil(opts.seq_len / chunks) if chunks else full
    biggest = 0
    for in_mlp, k, n in linears:
        if (mlp if in_mlp else full) > runtime.fused_max_tokens:
            biggest = max(biggest, k * n * _dtype(opts).itemsize)
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
    from trilora.checkpoint import find_decoder_layers

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
            overheads=_overheads(categories),
            host_pinned=self.host_pinned if host_pinned is None else host_pinned,
            by_module=_summarize_modules(self.by_module, self.layers) if cats is None else {},
            layers_traced=self.layers,
            layers=self.layers,
            trace_seconds=self.seconds if seconds is None else seconds,
            host_embedding=self.host_embedding,
            host_optimizer=host_optimizer,
            method=method,
        )


def provider_options(provider: str, opts: MemOptions) -> MemOptions:
    """What ``provider`` actually runs for ``opts``: bitsandbytes + PEFT has transformers'
    attention (one flash call over all heads) and a device-resident AdamW at the same state
    precision (:func:`~trilora.memory.optimizer_model.baseline_equivalent`: trilora's host,
    managed-memory and CPU-offloaded optimizers are not theirs)."""
    if provider == "bnb_peft":
        mode = optimizer_model.baseline_equivalent(opts.optimizer)
        return replace(opts, grouped_attention=False, optimizer=mode)
    return opts


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

    from trilora.memory import timeline

    opts.validate()
    check_supported(config, opts)
    t0 = time.perf_counter()
    model = build_meta_model(config, opts, num_layers)
    layers = model.config.num_hidden_layers
    static = static_breakdown(model)
    linears = _linear_shapes(model)
    # allow_non_fake_inputs: to_empty() converts the meta parameters inside the mode.
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
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
        trainable_itemsize=_itemsize(params),
        host_embedding=host_embedding,
        host_pinned=state.pinned_bytes if state is not None and opts.offload else 0,
        linears=linears,
        cats=cats,
        by_module=by_module,
        seconds=time.perf_counter() - t0,
    )


def _itemsize(params) -> int:
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


def apply_memory_options(
    model: nn.Module, opts: MemOptions, simulate: bool = False
) -> tuple[object | None, int]:
    """Install the memory features ``opts`` asks for on ``model`` (the same calls a user makes).

    Returns the :class:`~trilora.checkpoint.CheckpointState` (None without checkpointing) and
    the bytes of an input-embedding table moved to host memory. ``simulate`` marks a fake-
    tensor trace, whose offload only accounts host bytes.
    """
    from trilora.checkpoint import enable_checkpointing
    from trilora.fused_loss import enable_fused_cross_entropy
    from trilora.fused_norm import enable_fused_rms_norm
    from trilora.offload import offload_input_embeddings

    state = None
    if opts.checkpointing:
        state = enable_checkpointing(
            model,
            offload=opts.offload,
            pin_memory_budget=opts.pin_memory_budget,
            mlp_chunks=opts.resolved_mlp_chunks() or None,
        )
        state.simulate = simulate
    if opts.fused_ce:
        enable_fused_cross_entropy(model)
    if opts.fused_norm:
        enable_fused_rms_norm(model)
    host_embedding = 0
    if opts.offload_embeddings and offload_input_embeddings(model) is not None:
        host_embedding = _input_embedding_bytes(model)
    return state, host_embedding


def _input_embedding_bytes(model: nn.Module) -> int:
    """Bytes of the input-embedding table, 0 when it is tied to the head (never offloaded)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return 0
    return _nbytes(emb.weight)


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


def _overheads(categories: dict[str, int]) -> dict[str, int]:
    dynamic = categories["activations"] + categories["temporaries"] + categories["gradients"]
    return {**OVERHEADS, "fragmentation": int(FRAGMENTATION * dynamic)}


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


# ---------------------------------------------------------------------------------------
# depth extrapolation, search, sweep
# ---------------------------------------------------------------------------------------


def _extrapolate(a: MemReport, b: MemReport, layers: int) -> MemReport:
    la, lb = a.layers_traced, b.layers_traced

    def lin(x, y):
        return round(x + (y - x) * (layers - la) / (lb - la))

    cats = {k: max(0, lin(a.categories[k], b.categories[k])) for k in a.categories}
    return replace(
        b,
        categories=cats,
        overheads=_overheads(cats),
        host_pinned=max(0, lin(a.host_pinned, b.host_pinned)),
        host_optimizer=max(0, lin(a.host_optimizer, b.host_optimizer)),
        host_embedding=b.host_embedding,
        by_module={},
        layers=layers,
        trace_seconds=a.trace_seconds + b.trace_seconds,
        method="lattice" if "lattice" in (a.method, b.method) else "extrapolated",
    )


# Layers traced for the depth extrapolation. Layers 0 .. n-3 are identical in what they
# hold at the peak, but the last two are not: the last layer's input is never offloaded
# and the layer before it is unpacked synchronously with no prefetch ahead of it, so a
# 2-layer model lacks the prefetched input that every deeper model has at its peak. The
# increment from 2 to 3 layers therefore overstates the per-layer cost (by one layer input
# per layer, 11.9 GiB for Llama-3.1-8B at 50k tokens); from 3 to 4 it is exact.
EXTRAPOLATE_LAYERS = (3, 4)


def layer_period(config) -> int:
    """Smallest ``p`` with ``config.layer_types[i] == layer_types[i % p]`` (1 without types).

    Gemma-2 alternates sliding-window and global layers (p = 2), Gemma-3 has one global
    layer in six (p = 6); their layers are identical only in steps of ``p``.
    """
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or not types:
        return 1
    for p in range(1, len(types) + 1):
        if all(types[i] == types[i % p] for i in range(len(types))):
            return p
    return len(types)


def depth_samples(config) -> tuple[int, int] | None:
    """The two depths the depth extrapolation traces, or None when the model is not deeper.

    :data:`EXTRAPOLATE_LAYERS` (3 and 4) for identical layers. With a layer pattern of
    period ``p`` (:func:`layer_period`) the two depths are ``p`` apart and congruent to the
    model's depth modulo ``p``, so the extra layers always come in whole patterns.
    """
    layers = config.num_hidden_layers
    p = layer_period(config)
    la = EXTRAPOLATE_LAYERS[0]
    la += (layers - la) % p
    lb = la + (EXTRAPOLATE_LAYERS[1] - EXTRAPOLATE_LAYERS[0]) * p
    return None if layers <= lb else (la, lb)


def trace(
    config,
    opts: MemOptions,
    provider: str = "trilora",
    num_layers: int | None = None,
    name: str = "",
    progress=None,
    recorder=None,
) -> StepTrace:
    """One traced step of ``provider`` at ``num_layers`` layers (None: all), reported to
    ``progress`` (:class:`trilora.memory.progress.Progress`) as a bar and one line."""
    from trilora.memory.progress import as_progress

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    progress = as_progress(progress)
    fn = trace_trilora if provider == "trilora" else _baseline_trace()
    layers = num_layers or config.num_hidden_layers
    desc = f"{provider}: {layers} layers x {opts.batch} x {opts.seq_len:,} tokens"
    with progress.trace(desc, 2 * layers) as tick:
        return fn(config, opts, num_layers, name, recorder=recorder, on_layer=tick)


def profile(
    config,
    opts: MemOptions,
    provider: str = "trilora",
    depth: str = "full",
    name: str = "",
    progress=None,
) -> MemReport:
    """Trace ``provider``'s step ("trilora" or "bnb_peft").

    ``depth="full"`` traces every layer; ``depth="extrapolate"`` traces
    :func:`depth_samples` (3 and 4) layers and extrapolates each category linearly;
    ``depth="fast"`` also extrapolates along the length from short traces
    (:class:`~trilora.memory.fast.FastProfiler`; exact on its lattice of lengths, and it traces
    other lengths itself, depth-extrapolated).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
    opts.validate()
    if depth == "fast":
        from trilora.memory.fast import FastProfiler

        fast = FastProfiler(config, opts, provider, "seq_len", name, progress)
        lattice = fast.lattice(opts.seq_len)
        if lattice is None or lattice.index(opts.seq_len) > lattice.first + 2:
            return fast.report(opts.seq_len)
        # within the five short traces' own lengths: the two depth samples at this length
        # are the cheaper exact answer
        depth = "extrapolate"
    depths = depth_samples(config) if depth == "extrapolate" else None
    if depths is None:
        return trace(config, opts, provider, None, name, progress).report()
    la, lb = depths
    a = trace(config, opts, provider, la, name, progress).report()
    b = trace(config, opts, provider, lb, name, progress).report()
    return _extrapolate(a, b, config.num_hidden_layers)


def _baseline_trace():
    from trilora.memory.baseline import trace_bnb_peft

    return trace_bnb_peft


def minimum_bytes(config, opts: MemOptions) -> int:
    """Device bytes before any activation: weights, LoRA, gradients, optimizer state, overheads.

    Built from the :func:`depth_samples` depths and extrapolated (every tensor of a model is
    per layer or per model): a 70B model's full meta model takes seconds to build.
    """

    def floor(layers: int | None) -> int:
        model = build_meta_model(config, opts, layers)
        static = static_breakdown(model)
        params = [p for p in model.parameters() if p.requires_grad]
        state = optimizer_model.device_floor(
            opts.optimizer, [p.numel() for p in params], _itemsize(params)
        )
        host = _input_embedding_bytes(model) if opts.offload_embeddings else 0
        return sum(static.values()) - host + state

    depths = depth_samples(config)
    if depths is None:
        fixed = floor(None)
    else:
        la, lb = depths
        a, b = floor(la), floor(lb)
        fixed = a + (b - a) * (config.num_hidden_layers - la) // (lb - la)
    return fixed + sum(OVERHEADS.values())


def largest_fitting(
    fn, budget: int, step: int, guess: int, limit: int = 2**24
) -> tuple[int, dict[int, int]]:
    """Largest multiple ``v`` of ``step`` with ``fn(v) <= budget``, for a nondecreasing ``fn``.

    ``fn`` maps a value to bytes and is expensive (a trace), so the search interpolates
    linearly between the closest fitting and non-fitting values (peak memory is close to
    piecewise affine in the sequence length and batch) and bisects when interpolation
    stalls. It stops only when ``v`` fits and ``v + step`` does not (both evaluated), or at
    ``limit``. Returns ``(v, {value: bytes evaluated})``; ``v`` is 0 if ``step`` does not fit.
    """
    seen: dict[int, int] = {}

    def f(v: int) -> int:
        if v not in seen:
            seen[v] = fn(v)
        return seen[v]

    def snap(v: float) -> int:
        return max(step, int(v) // step * step)

    lo, hi = 0, None  # lo fits (0: nothing fits yet), hi does not fit
    g = snap(guess)
    interpolated = False  # was g an interpolated guess
    rounds = 0
    while True:
        g = min(g, limit)
        fits = f(g) <= budget
        if fits:
            lo = g
            if g >= limit:
                return lo, seen
        else:
            hi = g
        if hi is not None and hi - lo <= step:
            return lo, seen
        if hi is None:
            # Nothing too big yet: extrapolate upward from the two largest points (all fit).
            xs = sorted(seen)
            if len(xs) < 2:
                # One point: its next step up (ends it when the guess was the answer).
                g = lo + step
            elif seen[xs[-1]] > seen[xs[-2]]:
                slope = (seen[xs[-1]] - seen[xs[-2]]) / (xs[-1] - xs[-2])
                g = snap(xs[-1] + (budget - seen[xs[-1]]) / slope) + step
            else:
                g = 2 * lo
            g = max(g, lo + step)
            continue
        if lo == 0:
            g = snap(hi / 2)
            if g >= hi:
                return 0, seen
            continue
        if fits and interpolated:
            # An interpolated guess fits: the next step up usually does not, which ends it.
            g, interpolated = lo + step, False
            continue
        rounds += 1
        slope = (seen[hi] - seen[lo]) / (hi - lo)
        if rounds > 3 or slope <= 0:
            g, interpolated, rounds = snap((lo + hi) / 2), False, 0  # stalled: bisect
        else:
            g, interpolated = snap(lo + (budget - seen[lo]) / slope), True
        g = min(max(g, lo + step), hi - step)


def find_max(
    config,
    opts: MemOptions,
    budget: int,
    search: str = "seq_len",
    provider: str = "trilora",
    name: str = "",
    multiple: int = 1024,
    progress=None,
    confirm: bool = False,
    profiler=None,
) -> tuple[int, MemReport | None]:
    """Largest ``seq_len`` (or ``batch``) whose step fits ``budget`` bytes, and its report.

    The search runs on :class:`~trilora.memory.fast.FastProfiler`: three short traces at a
    few layers each, then every length on its lattice (multiples of 2,048 tokens with auto
    MLP chunks) costs nothing and is exact, so the answer is the largest lattice value whose
    step fits, and the next lattice value's does not, at the precision ``lcm(multiple,
    lattice step)``. Values below the lattice's first samples are traced themselves at the
    precision ``multiple`` (depth-extrapolated).

    ``confirm``: then re-search on **full-depth** traces seeded with that answer, at the
    precision ``multiple`` (1 for batch): the returned value's full-depth trace fits and the
    full-depth trace of ``value + multiple`` does not (minutes per trace at long context).

    The returned report's ``options["search"]`` records the precision, the next value and
    its total, and every evaluated total. ``progress``: a
    :class:`trilora.memory.progress.Progress` (or a callable taking one line per trace).
    ``profiler``: a :class:`~trilora.memory.fast.FastProfiler` of the same config, options,
    provider and ``search`` dimension whose traces to reuse (e.g. several budgets).

    Raises ValueError when even the weights do not fit, naming the minimum.
    """
    from trilora.memory.fast import FastProfiler
    from trilora.memory.progress import as_progress

    if search not in ("seq_len", "batch"):
        raise ValueError(f"search must be 'seq_len' or 'batch', got {search!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    opts.validate()
    floor = minimum_bytes(config, opts)
    if budget <= floor:
        raise ValueError(
            f"budget {format_bytes(budget)} is smaller than the model's fixed footprint "
            f"(weights, LoRA, gradients, optimizer state, CUDA overheads) of "
            f"{format_bytes(floor)}; the minimum budget is above {format_bytes(floor)}"
        )
    progress = as_progress(progress)
    unit = multiple if search == "seq_len" else 1
    if profiler is None:
        fast = FastProfiler(config, opts, provider, search, name, progress)
    elif (profiler.config, profiler.opts, profiler.provider, profiler.dimension) != (
        config, opts, provider, search,
    ):  # fmt: skip
        raise ValueError("profiler was built for another model, options, provider or dimension")
    else:
        fast = profiler
    evaluated: dict[int, int] = {}

    def total(v: int) -> int:
        if v not in evaluated:
            rep = fast.report(v)
            evaluated[v] = rep.total
            verdict = "fits" if rep.total <= budget else "exceeds"
            progress.line(f"{search}={v:,} ({_METHOD_NAMES[rep.method]}): "
                          f"{format_bytes(rep.total)}, {verdict}")  # fmt: skip
        return evaluated[v]

    start = getattr(opts, search)
    step = math.lcm(unit, fast.period())
    value, _ = largest_fitting(total, budget, step, max(start, fast.first_regular()))
    if value < fast.first_regular() and step > unit:
        # below the lattice: the values are traced themselves, at the finer precision
        value, _ = largest_fitting(total, budget, unit, max(value, unit))
        step = unit
    if value == 0:
        return 0, None
    info = {
        "dimension": search,
        "budget": budget,
        "method": "fast",
        "precision": step,
        "next_value": value + step,
        "next_total": total(value + step),
        "evaluated": {str(k): v for k, v in sorted(evaluated.items())},
    }
    rep = fast.report(value)
    if confirm:
        reports: dict[int, MemReport] = {}

        def full(v: int) -> int:
            if v not in reports:
                reports[v] = profile(config, replace(opts, **{search: v}), provider, "full", name,
                                     progress)  # fmt: skip
                verdict = "fits" if reports[v].total <= budget else "exceeds"
                progress.line(f"{search}={v:,} (full depth): "
                              f"{format_bytes(reports[v].total)}, {verdict} "
                              f"[{reports[v].trace_seconds:.0f} s]")  # fmt: skip
            return reports[v].total

        fast_value = value
        value, seen = largest_fitting(full, budget, unit, value)
        if value == 0:
            return 0, None
        rep = reports[value]
        info = {
            **info,
            "method": "full",
            "precision": unit,
            "fast_answer": fast_value,
            "next_value": value + unit,
            "next_total": seen.get(value + unit),
            "full_depth_traces": {str(k): v for k, v in sorted(seen.items())},
        }
    rep.options["search"] = info
    return value, rep


_METHOD_NAMES = {"full": "full depth", "extrapolated": "traced", "lattice": "lattice"}


def sweep(
    config,
    opts: MemOptions,
    seq_lens: list[int],
    provider: str = "trilora",
    name: str = "",
    depth: str = "fast",
    progress=None,
) -> list[MemReport]:
    """Reports for each sequence length: ``depth="fast"`` shares one
    :class:`~trilora.memory.fast.FastProfiler` (three short traces for every lattice length);
    ``"extrapolate"`` or ``"full"`` traces each length."""
    if depth != "fast":
        return [profile(config, replace(opts, seq_len=t), provider, depth, name, progress)
                for t in seq_lens]  # fmt: skip
    from trilora.memory.fast import FastProfiler

    fast = FastProfiler(config, opts, provider, "seq_len", name, progress)
    return [fast.report(t) for t in seq_lens]


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1: ``"512 B"``,
    ``"216.00 KiB"``, ``"3.25 GiB"`` (never ``"0.00 GiB"`` for a small tensor)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def byte_unit(largest: float) -> tuple[str, int]:
    """The unit (name, bytes) :func:`format_bytes` picks for ``largest``: one unit for a column."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(largest) >= size:
            return unit, size
    return "B", 1
