"""Per-rank device memory of a distributed QLoRA step (``trilora mem --world-size N [--fsdp]``).

The single-device trace (:func:`trilora.memory.search.profile`) measures what one rank
computes with: its activations and temporaries depend only on the *per-rank* batch, which
data parallelism does not change. What changes with N ranks is who holds the model's own
tensors. :func:`per_rank_memory` walks the model the way :func:`trilora.distributed.wrap_fsdp`
groups it (one FSDP group per decoder layer, one for the input embeddings when they are not
tied to the head, the root for the rest) and counts, for rank 0 (the rank with the most
rows when a dimension does not divide):

========================  ======================================  ====================
tensor                    FSDP2 (``fully_shard``)                 DDP
========================  ======================================  ====================
quantized codes           ``ceil(rows / N)`` rows per rank         full copy
absmax, tables, SCB       replicated (module buffers)             full copy
LoRA parameters           1/N (same rule)                         full copy
norms, embeddings, head   1/N                                     full copy
other buffers (rotary)    replicated                              full copy
gathered parameters       root group for the whole step, plus     --
                          two decoder layers at a time (the one
                          running and the one prefetched; every
                          layer if ``reshard_after_forward=False``)
LoRA gradients            1/N, plus one layer's unsharded         full (DDP buckets
                          gradients awaiting reduce-scatter       view them)
optimizer state           the optimizer's own rules               full
                          (``memory/optimizer_model.py``) over
                          each rank's shards
========================  ======================================  ====================

Gathered parameters are in the mixed-precision ``param_dtype`` when one is given (packed
bytes keep their storage dtype: FSDP2 never casts them). With ``cpu_offload`` (FSDP2's
``CPUOffloadPolicy``) the sharded parameters, their gradients and the optimizer state are
host memory; the device holds only what is gathered. Sequence parallelism over ``P``
ranks (Ulysses, see ``docs/distributed.md``) divides the activations' tokens by ``P``: the
caller traces the step at ``seq_len / P`` and passes those activations, and this model adds
the all-to-all buffers of the attention inputs.

Everything is an upper bound at one moment: the gathered layers, the unsharded gradients
and the peak activations are summed as if they coincided (they nearly do: the activation
peak is early in backward, when layers are being gathered and reduced).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from trilora.distributed.sharding import fsdp_storage_dtypes, quantized_weight_owners
from trilora.io import UsageError, atomic_write_json
from trilora.memory.fast import FastProfiler
from trilora.memory.optimizer_model import optimizer_bytes
from trilora.memory.report import OVERHEADS, compute_dtype
from trilora.memory.search import largest_fitting, profile
from trilora.memory.trace import build_meta_model
from trilora.patches.activation_checkpointing import find_decoder_layers

__all__ = [
    "COMM_OVERHEAD",
    "GroupBytes",
    "RankReport",
    "largest_context",
    "per_rank_memory",
    "sharding_groups",
]

MiB = 1024**2
GiB = 1024**3
# NCCL's own device buffers for a data-parallel group: its channels' FIFO buffers
# (NCCL_BUFFSIZE, 4 MiB, per channel and peer for ring/tree) plus the collectives' staging;
# 8 H100s on NVLink typically show 300-600 MiB per process in nvidia-smi beyond
# torch.cuda.memory_reserved. An estimate (no GPU here): charged once per rank when N > 1.
COMM_OVERHEAD = 512 * MiB


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    dtype = dtype or t.dtype
    return t.numel() * torch.empty((), dtype=dtype).element_size()


def _shard_bytes(t: torch.Tensor, world: int, dtype: torch.dtype | None = None) -> int:
    """Bytes rank 0 holds of ``t`` sharded along dim 0 (``torch.chunk``, as FSDP2)."""
    if t.dim() == 0:
        return _nbytes(t, dtype)
    rows = t.shape[0]
    per_row = _nbytes(t, dtype) // rows if rows else 0
    return math.ceil(rows / world) * per_row


def _as_stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantized codes ``t`` re-viewed as ``dtype`` (a meta tensor of the shape
    ``with_storage`` of a 4-bit weight gives: one column, padded to whole items; int8 codes
    keep their dtype, so they are returned as they are)."""
    if t.dtype == dtype:
        return t
    item = torch.empty((), dtype=dtype).element_size()
    return torch.empty((math.ceil(_nbytes(t) / item), 1), dtype=dtype, device="meta")


@dataclass
class GroupBytes:
    """One FSDP group's tensors (bytes): ``sharded`` per rank 0 by category, ``full`` the
    unsharded total by category, ``gathered`` the all-gather output when it runs,
    ``trainable_elements`` and ``grad_unsharded`` (its LoRA gradients before
    reduce-scatter)."""

    name: str
    kind: str  # "layer", "embeddings" or "root"
    sharded: dict[str, int] = field(default_factory=dict)
    full: dict[str, int] = field(default_factory=dict)
    gathered: int = 0
    trainable_elements: int = 0
    grad_unsharded: int = 0
    # elements of rank 0's shard of each trainable tensor (what its optimizer state covers)
    trainable_local: list[int] = field(default_factory=list)
    trainable_bytes_per_element: int = 4


def _add(d: dict[str, int], key: str, value: int) -> None:
    d[key] = d.get(key, 0) + value


def sharding_groups(
    model: nn.Module, world_size: int, param_dtype: torch.dtype | None = None
) -> tuple[list[GroupBytes], dict[str, int]]:
    """The model's FSDP groups (as :func:`trilora.distributed.wrap_fsdp` forms them) and the
    replicated buffers by category (``quant_state``, ``other_frozen``).

    ``model`` may live on the meta device (shapes and dtypes are all that is read).
    """

    # quantized linears and MoE experts: codes sharded, state replicated
    owners = list(quantized_weight_owners(model).values())
    packed_ids = {id(m.weight) for m in owners}
    # the dtype wrap_fsdp stores each packed weight in (float on a torch whose FSDP2 cannot
    # hold integer parameters)
    stored = fsdp_storage_dtypes(model, param_dtype)
    stored_dtype = {id(p): stored[name] for name, p in model.named_parameters() if name in stored}
    quant_ids = {id(b) for m in owners for b in m.buffers(False)}
    layers = list(find_decoder_layers(model))
    modules: list[tuple[str, str, nn.Module]] = [
        (f"layer {i}", "layer", layer) for i, layer in enumerate(layers)
    ]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    tied = emb is not None and head is not None and emb.weight is getattr(head, "weight", None)
    if emb is not None and not tied:
        modules.append(("embeddings", "embeddings", emb))
    seen: set[int] = set()
    groups = []

    def group_of(name: str, kind: str, params) -> GroupBytes:
        g = GroupBytes(name, kind)
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in packed_ids:
                cat = "base_weights"
                p = _as_stored(p, stored_dtype.get(id(p), p.dtype))
            elif p.requires_grad:
                cat = "lora_params"
            else:
                cat = "other_frozen"
            cast = param_dtype if (param_dtype is not None and p.is_floating_point()) else None
            _add(g.sharded, cat, _shard_bytes(p, world_size))
            _add(g.full, cat, _nbytes(p))
            g.gathered += _nbytes(p, cast)
            if p.requires_grad:
                g.trainable_elements += p.numel()
                g.grad_unsharded += _nbytes(p, cast)
                g.trainable_local.append(_shard_bytes(p, world_size) // p.element_size())
                g.trainable_bytes_per_element = p.element_size()
        return g

    for name, kind, module in modules:
        groups.append(group_of(name, kind, module.parameters()))
    groups.append(group_of("root", "root", model.parameters()))
    replicated: dict[str, int] = {}
    # Per layer, not deduplicated: one process may share a code table between layers, but
    # a sharded or materialized rank holds one per layer.
    for m in owners:
        for b in m.buffers(recurse=False):
            _add(replicated, "quant_state", _nbytes(b))
    counted: set[int] = set(quant_ids)
    for b in model.buffers():
        if id(b) not in counted:
            counted.add(id(b))
            _add(replicated, "other_frozen", _nbytes(b))
    return groups, replicated


@dataclass
class RankReport:
    """Peak memory of one rank (rank 0, the largest shard) in bytes, by category."""

    strategy: str  # "fsdp" or "ddp"
    world_size: int
    options: dict[str, Any]
    device: dict[str, int]
    host: dict[str, int]

    @property
    def total(self) -> int:
        """Device bytes of one rank at its peak, overheads included."""
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        d["host_total"] = self.host_total
        return d


def _attention_all_to_all_bytes(config, tokens_per_rank: int, batch: int, dtype_bytes: int) -> int:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # q, k, v in and out of the all-to-all (forward), the same for their gradients
    # (backward; not at the same time): 2 copies of q + k + v for this rank's tokens.
    return 2 * batch * tokens_per_rank * (heads + 2 * kv) * head_dim * dtype_bytes


def per_rank_memory(
    model: nn.Module,
    *,
    world_size: int,
    strategy: str = "fsdp",
    activations: int = 0,
    temporaries: int = 0,
    optimizer: str = "adamw",
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    sequence_parallel: int = 1,
    seq_len: int = 0,
    batch: int = 1,
    overheads: dict[str, int] | None = None,
    fragmentation: float = 0.05,
) -> RankReport:
    """Peak device (and host) bytes of rank 0 in an ``N``-rank DDP or FSDP2 run.

    Args:
        model: the model with its LoRA layers (meta device is fine); parameters that
            require gradients are the trainable ones.
        world_size: ranks sharing the model (FSDP) or replicating it (DDP).
        strategy: ``"fsdp"`` or ``"ddp"``.
        activations, temporaries: bytes at the single-device trace's peak for the per-rank
            batch (and ``seq_len / sequence_parallel`` tokens with sequence parallelism).
        optimizer: a name of :data:`trilora.optim.OPTIMIZERS` (``"adamw"``,
            ``"adamw_8bit"``, ``"adamw_cpu_offload"``, ...); its device and host bytes come
            from :mod:`trilora.memory.optimizer_model` over each rank's shards.
        param_dtype: FSDP mixed-precision dtype of gathered floating-point parameters.
        cpu_offload: FSDP2's ``CPUOffloadPolicy`` (FSDP only).
        reshard_after_forward: FSDP frees a layer's gathered parameters after its forward.
        sequence_parallel: Ulysses degree ``P`` (adds the all-to-all buffers; needs
            ``seq_len`` and ``batch``, the *global* sequence length and the per-rank batch).
        overheads: fixed device bytes (CUDA context, cuBLAS workspaces); default: the
            single-device profiler's, plus :data:`COMM_OVERHEAD` when ``world_size > 1``.
        fragmentation: fraction of the dynamic bytes the caching allocator loses.

    Raises:
        ValueError: an unknown strategy or optimizer, ``world_size < 1``, ``cpu_offload``
            without FSDP, or a sequence-parallel degree the attention heads do not allow.
    """
    if strategy not in ("fsdp", "ddp"):
        raise ValueError(f"strategy must be 'fsdp' or 'ddp', got {strategy!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if cpu_offload and strategy != "fsdp":
        raise ValueError("cpu_offload is FSDP2's CPUOffloadPolicy: it needs strategy='fsdp'")
    if sequence_parallel < 1:
        raise ValueError(f"sequence_parallel must be >= 1, got {sequence_parallel}")
    fsdp = strategy == "fsdp"
    shards = world_size if fsdp else 1
    groups, replicated = sharding_groups(model, shards, param_dtype if fsdp else None)
    device: dict[str, int] = {}
    host: dict[str, int] = {}
    resident = device if not cpu_offload else host
    for g in groups:
        for cat, value in g.sharded.items():
            _add(resident, cat, value)
    for cat, value in replicated.items():
        _add(device, cat, value)  # buffers stay on the device, offload or not

    # Optimizer state covers each rank's shard of every trainable tensor (all of it in DDP),
    # by the optimizer's own rules (8-bit blocks, paging, CPU offload).
    local = [n for g in groups for n in g.trainable_local]
    elem = max((g.trainable_bytes_per_element for g in groups if g.trainable_local), default=4)
    opt_bytes = optimizer_bytes(optimizer, local, elem)
    # build_optimizer turns gradient offload off under DDP (it would precede the all-reduce)
    grads_on_device = opt_bytes.gradients_on_device or not fsdp
    lora_bytes = sum(g.full.get("lora_params", 0) for g in groups)
    grad_bytes_sharded = sum(g.sharded.get("lora_params", 0) for g in groups)
    if fsdp:
        layers = [g for g in groups if g.kind == "layer"]
        root = next(g for g in groups if g.kind == "root")
        emb = [g for g in groups if g.kind == "embeddings"]
        biggest = max((g.gathered for g in layers), default=0)
        if reshard_after_forward:
            held = min(2, len(layers)) * biggest  # the running layer and the prefetched one
        else:
            held = sum(g.gathered for g in layers)  # all stay gathered until backward
        # The embeddings are gathered (and freed) before the first layer runs.
        gathered = root.gathered + max(held, max((g.gathered for g in emb), default=0))
        # FSDP2 all-gathers into a separate buffer even on one rank.
        device["gathered_params"] = gathered
        # one layer's unsharded LoRA gradients wait for their reduce-scatter
        reduce_buf = max((g.grad_unsharded for g in layers), default=0)
        if grads_on_device:
            _add(resident, "gradients", grad_bytes_sharded)
        device["gradients"] = device.get("gradients", 0) + reduce_buf
    else:
        device["gradients"] = lora_bytes
    # FSDP2's CPUOffloadPolicy steps the optimizer where the shards are: the host
    _add(resident, "optimizer_state", opt_bytes.device)
    if opt_bytes.host:
        _add(host, "optimizer_state", opt_bytes.host)
    device["activations"] = activations
    device["temporaries"] = temporaries
    if sequence_parallel > 1:
        if seq_len <= 0:
            raise ValueError("sequence_parallel needs the global seq_len")
        config = getattr(model, "config", None)
        if hasattr(model, "get_base_model"):
            config = model.get_base_model().config
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        if heads % sequence_parallel:
            raise ValueError(
                f"Ulysses splits the {heads} attention heads over {sequence_parallel} ranks: "
                "the degree must divide the head count"
            )
        if kv % sequence_parallel and sequence_parallel % kv:
            raise ValueError(
                f"{kv} key/value heads cannot be split over or replicated to "
                f"{sequence_parallel} ranks"
            )
        dtype_bytes = torch.empty((), dtype=param_dtype or torch.bfloat16).element_size()
        device["sequence_parallel_buffers"] = _attention_all_to_all_bytes(
            config, math.ceil(seq_len / sequence_parallel), batch, dtype_bytes
        )
    if overheads is None:
        overheads = dict(OVERHEADS)
        if world_size > 1:
            overheads["communication"] = COMM_OVERHEAD
    dynamic = (
        device.get("activations", 0)
        + device.get("temporaries", 0)
        + device.get("gradients", 0)
        + device.get("gathered_params", 0)
        + device.get("sequence_parallel_buffers", 0)
    )
    device.update(overheads)
    device["fragmentation"] = int(fragmentation * dynamic)
    options = dict(
        strategy=strategy,
        world_size=world_size,
        optimizer=optimizer,
        param_dtype=None if param_dtype is None else str(param_dtype).removeprefix("torch."),
        cpu_offload=cpu_offload,
        reshard_after_forward=reshard_after_forward,
        sequence_parallel=sequence_parallel,
    )
    return RankReport(strategy, world_size, options, device, host)


# ---------------------------------------------------------------------------------------
# with the single-device trace (trilora mem)
# ---------------------------------------------------------------------------------------


def rank_report(
    config,
    opts,
    world_size: int,
    strategy: str = "fsdp",
    sequence_parallel: int = 1,
    depth: str = "full",
    cpu_offload: bool = False,
    progress=None,
    profiler=None,
    model: nn.Module | None = None,
) -> tuple[RankReport, Any]:
    """Trace the step each rank runs (``opts.seq_len / sequence_parallel`` tokens of a
    ``opts.batch`` per-rank batch) and model rank 0's memory; returns it and the trace.

    ``depth``: as :func:`trilora.memory.search.profile` (``"fast"``: the fast model, what
    ``trilora mem`` runs; ``"full"``: every layer traced). ``profiler``: a
    :class:`~trilora.memory.fast.FastProfiler` along ``seq_len`` of the same config and
    options to take the single-device report from instead (several lengths share its
    traces). ``model``: the meta model of ``build_meta_model(config, opts)``, if already
    built (it does not depend on the length).
    """

    local = replace(opts, seq_len=max(2, math.ceil(opts.seq_len / sequence_parallel)))
    if profiler is not None:
        trace = profiler.report(local.seq_len)
    else:
        trace = profile(config, local, depth=depth, progress=progress)
    if model is None:
        model = build_meta_model(config, opts)
    report = per_rank_memory(
        model,
        world_size=world_size,
        strategy=strategy,
        activations=trace.categories.get("activations", 0),
        temporaries=trace.categories.get("temporaries", 0),
        optimizer=opts.optimizer,
        param_dtype=compute_dtype(opts) if strategy == "fsdp" else None,
        cpu_offload=cpu_offload,
        sequence_parallel=sequence_parallel,
        seq_len=opts.seq_len,
        batch=opts.batch,
    )
    report.host["pinned_activations"] = trace.host_pinned
    return report, trace


def largest_context(
    config,
    opts,
    world_size: int,
    budget: int,
    sequence_parallel: int = 1,
    strategy: str = "fsdp",
    multiple: int = 1024,
) -> tuple[int, RankReport | None]:
    """Largest global ``seq_len`` whose per-rank peak fits ``budget`` bytes, and its report.

    Each rank's step comes from one :class:`~trilora.memory.fast.FastProfiler` (five short
    traces, then every per-rank length on its lattice is exact and immediate), so the
    precision is ``lcm(multiple, lattice step) * sequence_parallel`` global tokens (2,048
    per rank with auto MLP chunks); lengths off the lattice are traced themselves
    (depth-extrapolated).
    """

    fast = FastProfiler(config, opts, dimension="seq_len")
    step = math.lcm(multiple, fast.period()) * sequence_parallel
    model = build_meta_model(config, opts)
    reports: dict[int, RankReport] = {}

    def total(v: int) -> int:
        rep, _ = rank_report(
            config,
            replace(opts, seq_len=v),
            world_size,
            strategy,
            sequence_parallel,
            profiler=fast,
            model=model,
        )
        reports[v] = rep
        return rep.total

    value, _ = largest_fitting(total, budget, step, max(step, opts.seq_len))
    return value, reports.get(value)


def format_rank_report(report: RankReport, name: str) -> str:
    """A one-column table (GiB) of a :class:`RankReport`."""
    head = (
        f"{name}: per-rank memory, {report.strategy.upper()} over {report.world_size} rank(s)"
        + (" + CPU offload" if report.options.get("cpu_offload") else "")
        + (
            f", sequence parallel {report.options['sequence_parallel']}"
            if report.options.get("sequence_parallel", 1) > 1
            else ""
        )
    )
    lines = [head, f"{'GiB per rank':<30}{'device':>10}"]
    for cat, value in report.device.items():
        lines.append(f"{cat:<30}{value / GiB:>10.2f}")
    lines.append(f"{'= device total':<30}{report.total / GiB:>10.2f}")
    for cat, value in report.host.items():
        if value:
            lines.append(f"{'host: ' + cat:<30}{value / GiB:>10.2f}")
    return "\n".join(lines)


def run_cli(args, config, opts, name: str, depth: str = "fast", progress=None) -> int:
    """``trilora mem ... --world-size N [--fsdp]``: print (and ``--json``) rank 0's memory.

    ``depth``: of the single-device trace (``"fast"``, or ``"full"`` with ``--confirm``);
    ``progress``: a :class:`trilora.memory.progress.Progress` for its traces.
    """

    strategy = "fsdp" if args.fsdp else "ddp"
    if args.budget is not None or args.sweep or args.baseline or args.measure:
        raise UsageError(
            "--world-size/--fsdp report one configuration; they do not combine with --budget, "
            "--sweep, --baseline or --measure yet"
        )
    report, trace = rank_report(
        config, opts, args.world_size, strategy, depth=depth, progress=progress
    )
    if progress is not None:
        progress.close()
    print(
        f"{name}: per-rank batch {opts.batch} x {opts.seq_len} tokens, LoRA r={opts.r}, "
        f"{opts.optimizer}; one GPU alone: {trace.total / GiB:.2f} GiB"
    )
    print(format_rank_report(report, name))
    if args.json:  # checked by trilora mem before tracing (--overwrite)
        atomic_write_json(
            args.json,
            {"model": name, "per_rank": report.to_dict(), "single_device": trace.to_dict()},
        )
    return 0
