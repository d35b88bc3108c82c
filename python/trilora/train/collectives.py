"""What the ranks of a ``trilora train`` run do together: the process group, wrapping, the
rank's rows, agreeing on results. The launcher is :mod:`trilora.train.launch`.

The data rule (:func:`rank_rows`): ``--batch-size`` is the *global* micro-batch; rank ``r``
of ``N`` takes rows ``r, r + N, ...`` of every micro-batch. The loss is normalised by the
loss-token count of the whole step over all ranks (an all-reduce), times ``N`` because DDP
and FSDP2 average gradients over the ranks, so ``N`` processes at batch ``B`` follow the
trajectory of one process at batch ``B`` (to fp32 rounding). A rank left without a row (the
last, short micro-batch of an epoch) runs one row at weight 0, so every rank takes part in
every collective.

Everything here is the identity in a single process (no process group), so the loop has one
code path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trilora.distributed as td
from trilora.distributed.sharding import comm_device
from trilora.io import UserError

__all__ = [
    "all_reduce",
    "gather_objects",
    "gradient_sync",
    "inference_model",
    "on_main",
    "rank_rows",
    "setup",
    "strategy",
    "wrap",
]

# Launchers that start processes without torchrun's variables (MPI): each process would
# believe it is alone and train the whole run by itself.
_MPI_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# the process group
# ---------------------------------------------------------------------------------------


def setup(device: str | None):
    """The run's :class:`~trilora.distributed.DistEnv`: a process group when a launcher
    started this process (gloo for ``--device cpu`` or without CUDA, NCCL otherwise), else a
    single process. Returns ``(env, device, initialized_here)``.
    """

    if "WORLD_SIZE" not in os.environ:
        launched = [v for v in _MPI_WORLD_VARS if int(os.environ.get(v, "1") or 1) > 1]
        if launched:
            raise UserError(
                f"this process was started by MPI ({launched[0]} is set) without "
                "torchrun's variables; start trilora train with torchrun, "
                "accelerate launch --multi_gpu, or trilora train --nproc N"
            )
        if device is None and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            device = "cpu"  # accelerate launch --cpu (one process)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    was_initialized = dist.is_available() and dist.is_initialized()
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    env = td.init_distributed(backend="nccl" if kind == "cuda" else "gloo")
    if env.has_group:
        if env.device.type != kind:
            raise UserError(
                f"--device {device}: the process group ({env.backend}) computes on "
                f"{env.device.type}; start it with the matching device"
            )
        device = str(env.device)
    return env, torch.device(device), env.has_group and not was_initialized


def strategy(env, fsdp: bool) -> str | None:
    """``"fsdp"``, ``"ddp"`` or None (a single process without a process group)."""
    if not env.has_group:
        return None
    return "fsdp" if fsdp else "ddp"


def wrap(model, env, cfg):
    """Wrap ``model`` for ``env``: FSDP2 with ``cfg.fsdp`` (``CPUOffloadPolicy`` with
    ``cfg.cpu_offload``), else DDP; unchanged without a process group.

    No FSDP mixed-precision policy: the parameters are gathered in their own dtypes (bf16
    base, fp32 LoRA, packed bytes untouched) and bf16 compute comes from autocast, as in a
    single process, so the numerics do not depend on the process count.
    """

    kind = strategy(env, cfg.fsdp)
    if kind == "ddp":
        return td.wrap_ddp(model, env=env)
    if kind != "fsdp":
        return model

    model = td.wrap_fsdp(model, env=env, cpu_offload=cfg.cpu_offload)
    # FSDP2 picks its root at the first forward, which must go through the root module;
    # generation (answers before training) calls the inner causal LM. One token, no
    # gradients, eval mode (no dropout draws), through the root, settles it.
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=env.device), use_cache=False)
    model.train(was_training)
    return model


# ---------------------------------------------------------------------------------------
# agreeing across ranks
# ---------------------------------------------------------------------------------------


def on_main(env, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error.

    For what must happen once (run-folder checks and writes, reading a file whose existence
    decides what every rank does next): the other ranks wait for rank 0 and follow it.
    """
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    if env.distributed:
        box: list[Any] = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def all_reduce(env, values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (or maxed) over the ranks, in float64 (the identity alone)."""
    if not env.distributed:
        return list(values)

    t = torch.tensor(values, dtype=torch.float64, device=comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_objects(env, obj: Any) -> list[Any]:
    """``[rank 0's obj, rank 1's obj, ...]`` on every rank (``[obj]`` alone)."""
    if not env.distributed:
        return [obj]

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_rows(idx: list[int], env) -> tuple[list[int], bool]:
    """This rank's rows of a global batch ``idx`` and whether they count: rows
    ``rank, rank + N, ...``; a rank left without any row gets the batch's first row at
    weight 0 (``False``), so that it still joins the collectives of the step."""
    if not env.distributed:
        return list(idx), True
    mine = list(idx[env.rank :: env.world_size])
    if mine:
        return mine, True
    return list(idx[:1]), False


@contextlib.contextmanager
def gradient_sync(model, sync: bool) -> Iterator[None]:
    """Backward inside gets its gradients reduced across ranks only if ``sync`` (the last
    micro-batch of a step): DDP's ``no_sync()`` and FSDP2's ``set_requires_gradient_sync``
    otherwise, so accumulation costs no communication."""

    if isinstance(model, DistributedDataParallel):
        with contextlib.nullcontext() if sync else model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if callable(setter):
        setter(sync)
        try:
            yield
        finally:
            setter(True)
        return
    yield


@contextlib.contextmanager
def inference_model(model) -> Iterator[Any]:
    """The module to run evaluation or generation on: DDP's inner module (no collectives
    needed without gradients); an FSDP2 model as it is, its root group gathered for the
    duration (``generate`` calls the inner causal LM, past the root's own forward hooks)
    and every group resharded afterwards."""

    info = td.parallel_info(model)
    if info is None or info.strategy != "fsdp":
        yield td.unwrap(model)
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()
