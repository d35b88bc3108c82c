"""DDP and FSDP2 for trilora models, with rank 0 as the only source of weights.

Both wrappers take the model :func:`trilora.distributed.load_pretrained` returns (loaded on
rank 0, a meta-device shell elsewhere), usually after ``trilora.get_peft_model`` has put the
LoRA adapters on it, and make every rank hold its part of rank 0's tensors:

* :func:`wrap_ddp`: every rank gets a full copy (broadcast one tensor at a time); the quantized
  base is frozen, so DDP's buckets hold only the LoRA gradients, which it all-reduces.
* :func:`wrap_fsdp`: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every decoder layer,
  on the input embeddings (when not tied to the output head) and on the root. Every
  parameter is a ``DTensor`` sharded along dim 0, the quantized codes included: they
  are a frozen ``nn.Parameter`` (4-bit: packed bytes ``[rows, 1]``; int8: the ``[out, in]``
  codes; see :mod:`trilora.nn`), so each rank holds ``1/N`` of the rows and the all-gather
  before a layer runs moves the bytes untouched. Two facts make that exact:

  - FSDP2's mixed precision casts only *floating-point* parameters to ``param_dtype``.
    Packed bytes stored as ``uint8`` are never cast; stored as a float dtype they must be
    stored *as* ``param_dtype`` (a cast to it is then a no-op), so :func:`wrap_fsdp`
    re-views float-stored bytes as ``param_dtype`` (same bytes, no arithmetic).
  - Rows that the world size does not divide are padded by FSDP2 (``torch.chunk``
    semantics: the last ranks hold fewer rows, or none); the padding never reaches the
    module, which sees the unpadded full tensor.

  The quantization state (absmax, code tables, double-quant state; int8's row scales
  ``SCB``) lives in module buffers, which FSDP2 does not shard: every rank keeps a full
  copy (1/32 of the packed bytes with 4-bit double quantization, 4/K of the codes for
  int8; see :func:`resident_bytes` and ``trilora mem --world-size``).

  A mixture of experts' quantized experts (:class:`~trilora.moe.QuantizedExperts`) are
  sharded the same way: their codes are one frozen parameter ``[E, *one expert's
  storage]``, so dim 0 is the experts and each rank holds ``ceil(E / N)`` whole experts
  (padded like rows); their per-expert state ``[E, *state]`` is buffers, replicated. The
  decoder layer's FSDP group gathers them before the layer (and so the experts forward)
  runs, and again before its backward.

The wrappers first check that every rank built the same model (names, shapes, dtypes): a
rank that loaded another model or stores the quantized bytes in another dtype gets a
:class:`~trilora.io.UserError` on every rank instead of a hang or silent corruption.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from trilora.distributed.env import DistEnv, bind_device, current_env
from trilora.io import UserError
from trilora.moe import QuantizedExperts
from trilora.nn import QuantizedLinear
from trilora.patches.activation_checkpointing import find_decoder_layers

__all__ = [
    "ParallelInfo",
    "parallel_info",
    "quantized_weight_owners",
    "resident_bytes",
    "unwrap",
    "wrap_ddp",
    "wrap_fsdp",
]


@dataclass
class ParallelInfo:
    """How a model was wrapped (stored on the unwrapped model as ``_trilora_parallel``)."""

    strategy: str  # "ddp" or "fsdp"
    env: DistEnv
    mesh: Any = None  # the FSDP DeviceMesh
    cpu_offload: bool = False
    param_dtype: torch.dtype | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 wraps in place)."""

    return model.module if isinstance(model, DistributedDataParallel) else model


def parallel_info(model: nn.Module) -> ParallelInfo | None:
    """The :class:`ParallelInfo` of a wrapped model, or None for a plain one."""
    return getattr(unwrap(model), "_trilora_parallel", None)


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------


def quantized_weight_owners(
    model: nn.Module,
) -> dict[str, QuantizedLinear | QuantizedExperts]:
    """Every module whose frozen ``weight`` parameter holds quantized codes (any format), by
    that parameter's name: quantized linear layers (codes ``[rows, ...]``) and quantized MoE
    experts tensors (codes ``[E, ...]``). Both keep the rest of their quantization state in
    their own buffers and have ``format``/``format_name``."""
    return {
        f"{name}.weight" if name else "weight": m
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear | QuantizedExperts)
    }


def _restore_storage(module: QuantizedLinear | QuantizedExperts, storage: torch.dtype) -> None:
    """Re-view ``module``'s codes as ``storage`` (the same bytes), in place."""
    if isinstance(module, QuantizedExperts):
        module.set_storage(storage)
    else:
        module.set_quantized_weight(module.quantized_weight().with_storage(storage))


def _layout(model: nn.Module) -> list[tuple]:
    rows = [
        ("parameter", n, tuple(p.shape), str(p.dtype), p.requires_grad)
        for n, p in model.named_parameters(remove_duplicate=False)
    ]
    # Without deduplication: rank 0's layers may share one table tensor (the double-quant
    # map) where a shell holds one per layer; by name, both are the same model.
    rows += [
        ("buffer", n, tuple(b.shape), str(b.dtype), False)
        for n, b in model.named_buffers(remove_duplicate=False)
    ]
    return rows


def check_same_model(model: nn.Module, env: DistEnv) -> None:
    """Raise :class:`UserError` on every rank unless all ranks hold the same module layout.

    Compares the names, shapes, dtypes and trainability of every parameter and buffer with
    rank 0's; a quantized weight stored in different dtypes gets its own message.
    """
    if not env.distributed:
        return
    layouts: list[Any] = [None] * env.world_size
    dist.all_gather_object(layouts, _layout(model))
    reference = layouts[0]
    packed = set(quantized_weight_owners(model))
    for rank, layout in enumerate(layouts[1:], start=1):
        if layout == reference:
            continue
        if len(layout) != len(reference):
            raise UserError(
                f"rank {rank} built a model with {len(layout)} parameters and buffers, rank 0 "
                f"with {len(reference)}: every rank must load the same model with the same "
                "LoRA settings"
            )
        for mine, ref in zip(layout, reference):
            if mine == ref:
                continue
            if mine[1] == ref[1] and mine[1] in packed and mine[3] != ref[3]:
                raise UserError(
                    f"mixed storage dtypes across ranks: rank {rank} stores the quantized bytes of "
                    f"{mine[1]} as {mine[3]}, rank 0 as {ref[3]}; load every rank with the same "
                    "quant_storage (bnb_4bit_quant_storage)"
                )
            raise UserError(
                f"rank {rank} differs from rank 0 at {ref[0]} {ref[1]}: "
                f"{mine[1]} {mine[2]} {mine[3]} requires_grad={mine[4]} vs "
                f"{ref[1]} {ref[2]} {ref[3]} requires_grad={ref[4]}; every rank must load the "
                "same model with the same LoRA settings"
            )


def _check_source(model: nn.Module, env: DistEnv) -> None:
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if env.rank == 0 and meta:
        found: list[Any] = [
            UserError(
                f"rank 0 holds meta tensors ({meta[0]}, ...): rank 0 must hold the loaded model; "
                "load it with trilora.distributed.load_pretrained"
            )
        ]
    else:
        found = [None]
    if env.distributed:
        dist.broadcast_object_list(found, src=0)
    if found[0] is not None:
        raise found[0]


# ---------------------------------------------------------------------------------------
# moving rank 0's tensors to the other ranks
# ---------------------------------------------------------------------------------------


def comm_device(env: DistEnv) -> torch.device:
    return env.device if env.backend == "nccl" else torch.device("cpu")


def _snapshot(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Rank 0's parameters and buffers by name (references, no copies)."""
    if env.rank != 0:
        return {}
    out = {n: p.detach() for n, p in model.named_parameters()}
    out.update({n: b.detach() for n, b in model.named_buffers(remove_duplicate=False)})
    return out


def _chunk_rows(rows: int, world: int) -> int:
    # torch.chunk semantics, which DTensor's Shard(0) (and so FSDP2) follows
    return -(-rows // world) if rows else 0


@torch.no_grad()
def _send_sharded(param, full: torch.Tensor | None, name: str, env: DistEnv) -> None:
    """Scatter rank 0's ``full`` along dim 0 into every rank's shard of the DTensor ``param``."""
    world, rank = env.world_size, env.rank
    local = param.to_local()
    rows = param.shape[0]
    step = _chunk_rows(rows, world)
    start = min(rank * step, rows)
    mine = max(0, min(step, rows - start))
    if local.shape[0] != mine:
        raise RuntimeError(
            f"{name}: rank {rank} holds {local.shape[0]} of {rows} rows, expected {mine} "
            "(FSDP2 sharding is not torch.chunk along dim 0 in this torch version)"
        )
    device = comm_device(env)
    recv = torch.empty((step, *local.shape[1:]), dtype=local.dtype, device=device)
    chunks = None
    if rank == 0:
        src = full.to(device=device, dtype=local.dtype)
        chunks = []
        for r in range(world):
            piece = src[min(r * step, rows) : min((r + 1) * step, rows)]
            if piece.shape[0] < step:
                pad = piece.new_zeros((step - piece.shape[0], *piece.shape[1:]))
                piece = torch.cat([piece, pad])
            chunks.append(piece.contiguous())
    dist.scatter(recv, chunks, src=0)
    if mine:
        local.copy_(recv[:mine])


@torch.no_grad()
def _send_full(local: torch.Tensor, full: torch.Tensor | None, env: DistEnv) -> None:
    device = comm_device(env)
    if env.rank == 0:
        buf = full.to(device=device, dtype=local.dtype).contiguous()
    else:
        buf = torch.empty(local.shape, dtype=local.dtype, device=device)
    dist.broadcast(buf, src=0)
    if buf.data_ptr() != local.data_ptr():
        local.copy_(buf)


def _fill_from_rank0(model: nn.Module, source: dict[str, torch.Tensor], env: DistEnv) -> None:

    for name, p in model.named_parameters():
        full = source.get(name)
        if isinstance(p, DTensor):
            _send_sharded(p, full, name, env)
        else:
            _send_full(p.detach(), full, env)
    for name, b in model.named_buffers(remove_duplicate=False):
        _send_full(b, source.get(name), env)


# ---------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------


def _mp_policy(mixed_precision):

    if mixed_precision is None:
        return MixedPrecisionPolicy()
    if isinstance(mixed_precision, torch.dtype):
        # LoRA gradients are reduced in fp32: they are small, and bf16 sums lose bits
        return MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    raise TypeError(
        "mixed_precision must be None, a torch.dtype or a torch.distributed.fsdp."
        f"MixedPrecisionPolicy, got {type(mixed_precision).__name__}"
    )


def fsdp_holds_integer_params() -> bool:
    """Whether this torch's FSDP2 can shard an integer-typed frozen parameter.

    Before torch 2.13, ``fully_shard`` wraps each shard as ``nn.Parameter(shard)`` (which
    asks for a gradient) and only then sets ``requires_grad``, so an integer tensor is
    refused ("only Tensors of floating point dtype can require gradients"); 2.13 passes
    ``requires_grad`` in the constructor. Checked: torch 2.11 refuses, 2.13 accepts.
    """
    return torch.__version__ >= (2, 13)


def fsdp_storage_dtypes(
    model: nn.Module, param_dtype: torch.dtype | None
) -> dict[str, torch.dtype]:
    """The storage dtype :func:`wrap_fsdp` gives each quantized weight's codes (by the
    weight's name, as ``model.named_parameters`` spells it; the same bytes, re-viewed),
    among those its format allows (``WeightFormat.storage_dtypes``).

    With a mixed-precision ``param_dtype``, float-stored bytes take it, so FSDP2 never casts
    them. ``uint8``/``int8`` storage stays where FSDP2 can hold it
    (:func:`fsdp_holds_integer_params`); on an older torch it takes ``param_dtype``, or
    without one the dtype of the model's first floating-point parameter (fp32 if none).

    Raises:
        UserError: a format stored only as integers (int8) on a torch whose FSDP2 cannot
            hold integer parameters.
    """
    weights = quantized_weight_owners(model)
    packed = {id(m.weight) for m in weights.values()}
    model_float = next(
        (p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in packed),
        torch.float32,
    )
    integer_ok = fsdp_holds_integer_params()
    out = {}
    for name, m in weights.items():
        storage = m.weight.dtype
        if storage.is_floating_point:
            target = param_dtype or storage
        else:
            target = storage if integer_ok else (param_dtype or model_float)
        if target not in m.format.storage_dtypes:
            raise UserError(
                f"FSDP cannot hold the {m.format_name} weight {name}: it is stored as "
                f"{storage} only, and this torch ({torch.__version__}) shards integer "
                "parameters from 2.13 on; upgrade torch or use DDP"
            )
        out[name] = target
    return out


def match_storage(model: nn.Module, param_dtype: torch.dtype | None) -> int:
    """Re-view the quantized weights' codes (linear layers and MoE experts) as
    :func:`fsdp_storage_dtypes` says (same bytes); returns the number of modules changed."""
    changed = 0
    targets = fsdp_storage_dtypes(model, param_dtype)
    for name, m in quantized_weight_owners(model).items():
        if m.weight.dtype != targets[name]:
            _restore_storage(m, targets[name])
            changed += 1
    return changed


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_in = getattr(base, "get_input_embeddings", None)
    get_out = getattr(base, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if emb is None or head is None:
        return emb
    if getattr(emb, "weight", None) is getattr(head, "weight", object()):
        return None  # tied: both must sit in one FSDP group (the root)
    return emb


def wrap_fsdp(
    model: nn.Module,
    *,
    mixed_precision=None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    env: DistEnv | None = None,
    mesh=None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 across the ranks, filling every shard from rank 0's model.

    Args:
        model: on rank 0 the loaded model (any device), on the other ranks a shell of the
            same model (meta device, as :func:`~trilora.distributed.load_pretrained` builds
            it) or a loaded copy (ignored: rank 0's values win), LoRA adapters included.
        mixed_precision: None (compute in the parameters' dtypes), a dtype such as
            ``torch.bfloat16`` (parameters all-gathered in it, gradients reduced in fp32),
            or a ``torch.distributed.fsdp.MixedPrecisionPolicy``.
        cpu_offload: keep the sharded parameters, their gradients and the optimizer's
            state in host memory (``CPUOffloadPolicy``); each layer's shard is copied to
            the GPU for its all-gather.
        reshard_after_forward: free each layer's gathered parameters after its forward
            (and gather them again in backward): less memory, one more all-gather.
        env, mesh: the run's :class:`DistEnv` and a 1-D ``DeviceMesh`` (defaults: the
            current process group over all ranks).

    Returns:
        ``model`` itself, now an ``FSDPModule``; its parameters are ``DTensor`` shards on
        ``env.device`` (on the CPU with ``cpu_offload``). Without a process group (a plain
        single-process run) the model is returned unchanged.

    Raises:
        UserError: the ranks built different models (or store the quantized bytes in
            different dtypes), or rank 0 holds no loaded model.
    """

    env = env or current_env()
    policy = _mp_policy(mixed_precision)
    if not env.has_group:
        return model
    bind_device(env)
    match_storage(model, policy.param_dtype)
    check_same_model(model, env)
    _check_source(model, env)
    source = _snapshot(model, env)
    model.to("meta")
    if mesh is None:
        mesh = init_device_mesh(env.device.type, (env.world_size,))
    kwargs: dict[str, Any] = dict(
        mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward
    )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
    for layer in find_decoder_layers(model):
        fully_shard(layer, **kwargs)
    emb = _input_embeddings(model)
    if emb is not None:
        fully_shard(emb, **kwargs)
    fully_shard(model, **kwargs)
    model.to_empty(device="cpu" if cpu_offload else env.device)
    if cpu_offload and env.device.type != "cpu":
        # FSDP2 leaves buffers alone: they are used in place, on the compute device.
        for m in model.modules():
            for key, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[key] = b.to(env.device)
    _fill_from_rank0(model, source, env)
    del source
    model._trilora_parallel = ParallelInfo("fsdp", env, mesh, cpu_offload, policy.param_dtype)
    return model


# ---------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------


def wrap_ddp(model: nn.Module, *, env: DistEnv | None = None, **ddp_kwargs: Any) -> nn.Module:
    """Replicate ``model`` on every rank (rank 0's values) and wrap it in DDP.

    Only the LoRA parameters require gradients, so only they are bucketed and all-reduced
    (averaged). DDP runs without syncing buffers (``broadcast_buffers=False``, named
    ``forward_sync_buffers=False`` from torch 2.13; the frozen quantization buffers would
    otherwise be re-broadcast before every forward) and
    ``gradient_as_bucket_view=True`` (no second copy of the gradients); ``ddp_kwargs``
    override these and go to ``DistributedDataParallel``.

    Returns:
        The ``DistributedDataParallel`` module (the model itself when no process group is
        initialized); :func:`unwrap` gives back the inner model.

    Raises:
        UserError: the ranks built different models, rank 0 holds no loaded model, or the
            model has no trainable parameter.
    """

    env = env or current_env()
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            "the model has no trainable parameters: put LoRA adapters on it "
            "(trilora.get_peft_model) before wrapping it for DDP"
        )
    if not env.has_group:
        return model
    bind_device(env)
    check_same_model(model, env)
    _check_source(model, env)
    if env.rank == 0:
        model.to(env.device)
    else:
        model.to_empty(device=env.device)
    for _, p in model.named_parameters():
        _send_full(p.detach(), p.detach() if env.rank == 0 else None, env)
    for _, b in model.named_buffers(remove_duplicate=False):
        _send_full(b, b if env.rank == 0 else None, env)
    model._trilora_parallel = ParallelInfo("ddp", env)
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs: dict[str, Any] = dict(gradient_as_bucket_view=True)
    if "init_sync" in accepted:
        kwargs["init_sync"] = False  # the broadcast above already made the ranks equal
    if "forward_sync_buffers" in accepted and "init_sync" in accepted:
        # torch >= 2.13's name for broadcast_buffers=False (deprecated there); with
        # init_sync=False nothing is synced at construction either
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    if env.device.type == "cuda":
        kwargs["device_ids"] = [env.device.index]
    kwargs.update(ddp_kwargs)
    return DistributedDataParallel(model, **kwargs)


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------


def _local_nbytes(t: torch.Tensor) -> int:

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds, by kind: ``base_weights`` (quantized codes, MoE experts
    included), ``quant_state`` (their absmax and tables, replicated), ``trainable`` (LoRA),
    ``other_params`` (embeddings, norms, router, head, 16-bit experts) and ``buffers``;
    sharded parameters count their local shard only."""
    model = unwrap(model)
    out = {"base_weights": 0, "quant_state": 0, "trainable": 0, "other_params": 0, "buffers": 0}
    seen: set[int] = set()
    for m in quantized_weight_owners(model).values():
        out["base_weights"] += _local_nbytes(m.weight)
        seen.add(id(m.weight))
        for b in m.buffers(recurse=False):
            if id(b) not in seen:  # layers may share one table (the double-quant map)
                out["quant_state"] += _local_nbytes(b)
                seen.add(id(b))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out["trainable" if p.requires_grad else "other_params"] += _local_nbytes(p)
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            out["buffers"] += _local_nbytes(b)
    return out
