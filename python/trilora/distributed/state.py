"""Saving a distributed run: the adapter in PEFT format, and resumable state through DCP.

* :func:`save_adapter` gathers the LoRA parameters (FSDP shards included) and rank 0 writes
  them with PEFT's own ``save_pretrained``: the folder loads with
  ``PeftModel.from_pretrained`` like any adapter.
* :func:`save_state` / :func:`load_state` write and read the *training* state: the
  trainable parameters, the optimizer state and the caller's extra state (step counter,
  data position, RNG) through ``torch.distributed.checkpoint`` (DCP). DCP stores every
  tensor with its global shape and each rank's piece of it, and reads back whatever piece
  the *loading* rank needs, so a run saved on N ranks resumes on M ranks, FSDP or DDP, or
  in a single process without any process group.

Per-element optimizer state (the AdamW moments, fp32 masters: tensors shaped like their
parameter) is saved with the parameter's layout and resharded on load. Scalar state
(``step``) is replicated. Any other state tensor (blockwise statistics of an 8-bit
optimizer, say) belongs to one shard of one rank; it is saved per rank, and resuming such a
run on another number of ranks is refused with a clear error.

The folder also holds ``trilora_state.json``: the world size, the optimizer's param groups
and a fingerprint of the model (architecture, trainable parameter shapes and a checksum of
every frozen base tensor that does not depend on how it is sharded). Loading into another
model is a :class:`~trilora.io.UserError` that names the first difference.

Saving is atomic: everything is written into a temporary sibling folder that rank 0
renames at the end; the folder must be on a filesystem every rank can write.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import PeftModel
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor import empty as dtensor_empty

from trilora.distributed.env import DistEnv, current_env
from trilora.distributed.sharding import parallel_info, unwrap
from trilora.io import UserError, atomic_directory, atomic_write_json

__all__ = [
    "STATE_FILE",
    "gather_state_dict",
    "load_state",
    "model_fingerprint",
    "save_adapter",
    "save_state",
]

STATE_FILE = "trilora_state.json"
FORMAT = "trilora-distributed-state"
VERSION = 1
_ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def _env_of(model: nn.Module) -> DistEnv:
    info = parallel_info(model)
    return info.env if info is not None else current_env()


def _is_dtensor(t: Any) -> bool:

    return isinstance(t, DTensor)


def comm_device(env: DistEnv) -> torch.device:
    return env.device if env.backend == "nccl" else torch.device("cpu")


def _agree(env: DistEnv, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (so no rank waits forever in a collective)."""
    if not env.distributed:
        if error is not None:
            raise error
        return
    flags: list[Any] = [None] * env.world_size
    mine = None if error is None else (isinstance(error, UserError), str(error))
    dist.all_gather_object(flags, mine)
    if error is not None:
        raise error
    failed = [(r, f) for r, f in enumerate(flags) if f is not None]
    if failed:
        rank, (user, msg) = failed[0]
        if user:
            raise UserError(msg)
        raise RuntimeError(f"rank {rank} failed while saving or loading: {msg}")


def _is_checkpoint_exception(exc: BaseException) -> bool:

    return isinstance(exc, CheckpointException)


def _first_failure(exc: BaseException) -> BaseException:
    """The underlying error of a DCP ``CheckpointException`` (a full disk's ``OSError``,
    say), rank 0's when it has one; DCP gathers them from every rank."""
    failures = getattr(exc, "failures", None) or {}
    for rank in sorted(failures):
        wrapped = failures[rank]
        inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
        if isinstance(inner, BaseException):
            return inner
    return RuntimeError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


# ---------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------


def _byte_sums(t: torch.Tensor) -> torch.Tensor:
    """``[sum of bytes, sum of squared bytes]`` (int64): independent of how ``t`` is split
    into shards, so every sharding of the same weights gives the same numbers.

    From the histogram of the byte values: no temporary larger than 256 counters. (Widening
    64 MiB chunks to int32 and squaring them cost a 1 GiB spike at every checkpoint save.)
    """
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    counts = torch.bincount(flat, minlength=256)
    values = torch.arange(256, dtype=torch.int64, device=counts.device)
    return torch.stack(((counts * values).sum(), (counts * values * values).sum()))


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture fields, trainable parameter names and global shapes, and per frozen
    tensor the sum and sum of squares of its bytes (sharding-independent; a collective
    under FSDP, so every rank must call it)."""
    env = _env_of(model)
    m = unwrap(model)
    config = getattr(m, "config", None)
    if config is None and hasattr(m, "get_base_model"):
        config = getattr(m.get_base_model(), "config", None)
    arch = {}
    if config is not None:
        for name in _ARCH_FIELDS:
            value = getattr(config, name, None)
            if value is not None:
                arch[name] = value
    trainable, frozen_names, sharded, sums = {}, [], [], []
    for name, p in m.named_parameters():
        if p.requires_grad:
            trainable[name] = list(p.shape)
            continue
        frozen_names.append(name)
        local = p.to_local() if _is_dtensor(p) else p
        sums.append(_byte_sums(local).cpu())
        sharded.append(_is_dtensor(p))
    table = torch.stack(sums) if sums else torch.zeros((0, 2), dtype=torch.int64)
    if env.distributed and any(sharded):
        mask = torch.tensor(sharded, dtype=torch.bool)
        part = table[mask].to(comm_device(env))
        dist.all_reduce(part)
        table[mask] = part.cpu()
    frozen = {n: [int(a), int(b)] for n, (a, b) in zip(frozen_names, table.tolist())}
    return {"architecture": arch, "trainable": trainable, "frozen": frozen}


def _compare_fingerprints(saved: dict, current: dict, path: Path) -> None:
    where = f"checkpoint {path} was saved from another model"
    for key in sorted(set(saved["architecture"]) | set(current["architecture"])):
        a, b = saved["architecture"].get(key), current["architecture"].get(key)
        if a != b:
            raise UserError(f"{where}: config {key} is {a} there and {b} here")
    st, ct = saved["trainable"], current["trainable"]
    if st != ct:
        missing = sorted(set(st) - set(ct))
        extra = sorted(set(ct) - set(st))
        if missing or extra:
            name = (missing or extra)[0]
            side = "only in the checkpoint" if missing else "only in this model"
            raise UserError(f"{where} or other LoRA settings: trainable parameter {name} is {side}")
        name = next(n for n in st if st[n] != ct[n])
        raise UserError(
            f"{where} or other LoRA settings: {name} has shape {st[name]} there and {ct[name]} here"
        )
    sf, cf = saved["frozen"], current["frozen"]
    if set(sf) != set(cf):
        name = sorted(set(sf) ^ set(cf))[0]
        raise UserError(f"{where}: base tensor {name} exists in only one of them")
    for name in sf:
        if sf[name] != cf[name]:
            raise UserError(f"{where}: the base weight {name} has other values (checksum differs)")


# ---------------------------------------------------------------------------------------
# adapter
# ---------------------------------------------------------------------------------------


def gather_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's full tensors on rank 0's CPU, gathered one tensor at a time.

    Every rank must call it (FSDP2 shards are all-gathered); rank 0 gets the state dict
    (trainable parameters by ``named_parameters`` name with ``trainable_only``, else the
    whole ``state_dict()``), the other ranks an empty dict. Without a process group it is
    simply a CPU copy.
    """
    env = _env_of(model)
    m = unwrap(model)
    if trainable_only:
        items = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    else:
        items = list(m.state_dict().items())
    full: dict[str, torch.Tensor] = {}
    for name, t in items:
        t = t.full_tensor() if _is_dtensor(t) else t.detach()
        if env.rank == 0:
            full[name] = t.to("cpu", copy=True)
    return full


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write the LoRA adapter of a (wrapped) PEFT model in PEFT format, from rank 0.

    Every rank must call it (sharded parameters are gathered one at a time, each rank
    contributing its shard); only rank 0 writes, through a temporary folder renamed at the
    end. ``add_files(folder)``, called on rank 0 before the rename, may write more files
    into the same folder (a tokenizer, say), so the folder appears complete or not at all.
    Returns ``path``.

    Raises:
        UserError: the model is not a PEFT model, or ``path`` is taken and ``overwrite`` is
            false (raised on every rank).
    """
    env = _env_of(model)
    m = unwrap(model)

    if not isinstance(m, PeftModel):
        raise UserError(
            f"save_adapter needs a PEFT model (trilora.get_peft_model), got {type(m).__name__}"
        )
    full = gather_state_dict(model, trainable_only=True)
    error = None
    if env.rank == 0:
        try:
            with atomic_directory(path, overwrite=overwrite) as tmp:
                m.save_pretrained(tmp, state_dict=full)
                if add_files is not None:
                    add_files(tmp)
        except Exception as exc:
            error = exc
    _agree(env, error)
    return Path(path)


# ---------------------------------------------------------------------------------------
# training state
# ---------------------------------------------------------------------------------------


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in unwrap(model).named_parameters()}


def _optimizer_params(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    fqns = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            fqns.append(names[id(p)])
    return fqns


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _dcp_kwargs(env: DistEnv) -> dict[str, Any]:

    if env.has_group or "no_dist" not in inspect.signature(dcp.save).parameters:
        return {}  # older torch infers a single process from the missing process group
    return {"no_dist": True}


@contextlib.contextmanager
def _quiet_single_process(env: DistEnv):
    # DCP warns that it "assumes the intent is to save/load in a single process": it is.
    with warnings.catch_warnings():
        if not env.has_group:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save the trainable parameters, the optimizer state and ``extra`` to folder ``path``.

    Every rank must call it. ``extra`` holds the caller's state (step, epoch, data
    position, RNG states): tensors go through DCP, everything else must be JSON-serializable;
    rank 0's values are kept.

    Raises:
        UserError: ``path`` is taken and ``overwrite`` is false (on every rank).
    """

    env = _env_of(model)
    info = parallel_info(model)
    m = unwrap(model)
    names = _param_names(m)
    fingerprint = model_fingerprint(model)
    sd: dict[str, Any] = {}
    for name, p in m.named_parameters():
        if p.requires_grad:
            sd[f"model/{name}"] = p.detach()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "world_size": env.world_size,
        "strategy": info.strategy if info is not None else "single",
        "fingerprint": fingerprint,
        "optimizer": None,
        "extra": {},
    }
    if optimizer is not None:
        fqns = _optimizer_params(optimizer, names)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        osd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        layout_bound: dict[str, dict[str, Any]] = {}
        for index, entry in osd["state"].items():
            fqn, p = fqns[index], params[index]
            tensors = [v for v in entry.values() if isinstance(v, torch.Tensor)]
            # Elementwise state (AdamW moments, masters) can be resharded; anything else (an
            # 8-bit optimizer's blockwise codes and scales) only reloads into the layout it
            # was saved from: the same sharding over the same number of ranks.
            elementwise = all(v.dim() == 0 or tuple(v.shape) == tuple(p.shape) for v in tensors)
            if not elementwise:
                layout_bound[fqn] = {"sharded": _is_dtensor(p)}
            for key, value in entry.items():
                if not isinstance(value, torch.Tensor):
                    scalars.setdefault(fqn, {})[key] = _jsonable(value)
                elif _is_dtensor(value) or value.dim() == 0 or not _is_dtensor(p):
                    sd[f"optim/{fqn}/{key}"] = value
                else:  # a plain tensor of this rank's shard (ShardedOptimizer's blockwise state)
                    sd[f"optim/{fqn}/{key}@rank{env.rank}"] = value
        groups = []
        start = 0
        for g in osd["param_groups"]:
            n = len(g["params"])
            hp = {k: _jsonable(v) for k, v in g.items() if k != "params"}
            groups.append({**hp, "params": fqns[start : start + n]})
            start += n
        meta["optimizer"] = {
            "class": type(optimizer).__name__,
            "param_groups": groups,
            "scalars": scalars,
            "layout_bound": layout_bound,
        }
    for key, value in (extra or {}).items():
        if isinstance(value, torch.Tensor):
            if env.rank == 0:  # rank 0's value, whatever the others hold
                sd[f"extra/{key}"] = value.detach().cpu()
        else:
            meta["extra"][key] = value
    error, tmp_name, context = None, [None], None
    if env.rank == 0:
        try:
            for key, value in meta["extra"].items():
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as exc:
                    raise UserError(
                        f"extra state {key!r} must be a tensor or JSON-serializable, got "
                        f"{type(value).__name__}"
                    ) from exc
            context = atomic_directory(path, overwrite=overwrite)
            tmp_name[0] = str(context.__enter__())
        except Exception as exc:
            error = exc
    _agree(env, error)
    if env.distributed:
        dist.broadcast_object_list(tmp_name, src=0)
    try:
        with _quiet_single_process(env):
            dcp.save(sd, checkpoint_id=tmp_name[0], **_dcp_kwargs(env))
        if env.rank == 0:
            atomic_write_json(Path(tmp_name[0]) / STATE_FILE, meta)
    except Exception as exc:
        error = exc
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if not _is_checkpoint_exception(exc):
            raise
        error = _first_failure(exc)
    try:
        _agree(env, error)
    except BaseException as exc:
        if context is not None:
            context.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if context is not None:
        context.__exit__(None, None, None)
    if env.distributed:
        dist.barrier()
    return Path(path)


def read_state_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trilora_state.json`` of a :func:`save_state` folder.

    Raises:
        UserError: the folder is missing or is not a trilora training state.
    """
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise UserError(
            f"{path} is not a trilora training state (no {STATE_FILE}); expected a folder "
            "written by trilora.distributed.save_state"
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{file} is not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{file} is not a trilora training state (format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise UserError(
            f"{file} has format version {meta['version']}; this trilora reads up to {VERSION}"
        )
    return meta


def load_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a :func:`save_state` folder into ``model`` (and ``optimizer``); return ``extra``.

    Works on any number of ranks (every rank must call it) and in a single process. The
    trainable parameters are overwritten in place; the optimizer gets its state and its
    groups' hyperparameters.

    Raises:
        UserError: the folder is not a training state, was saved from another model or with
            other LoRA settings, holds per-rank optimizer state saved on another number of
            ranks, or the optimizer's parameter groups differ from the saved ones.
    """

    env = _env_of(model)
    path = Path(path)
    meta = read_state_meta(path)
    _compare_fingerprints(meta["fingerprint"], model_fingerprint(model), path)
    m = unwrap(model)
    names = _param_names(m)
    by_name = dict(m.named_parameters())
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sd: dict[str, Any] = {}
    for name, p in by_name.items():
        if p.requires_grad:
            sd[f"model/{name}"] = p.detach()
    saved_opt = meta.get("optimizer")
    if optimizer is not None and saved_opt is None:
        raise UserError(f"{path} holds no optimizer state; resume without an optimizer state")
    if optimizer is not None:
        fqns = _optimizer_params(optimizer, names)
        saved_groups = saved_opt["param_groups"]
        current = []
        start = 0
        for g in optimizer.param_groups:
            current.append(fqns[start : start + len(g["params"])])
            start += len(g["params"])
        if [sorted(g["params"]) for g in saved_groups] != [sorted(g) for g in current]:
            raise UserError(
                f"{path}: the optimizer's parameter groups differ from the saved ones "
                f"({len(saved_groups)} groups saved, {len(current)} here)"
            )
        bound = saved_opt.get("layout_bound", {})
        for fqn, how in bound.items():
            p = by_name[fqn]
            if how["sharded"] != _is_dtensor(p) or (
                how["sharded"] and meta["world_size"] != env.world_size
            ):
                saved_on = (
                    f"{meta['world_size']} FSDP ranks" if how["sharded"] else "unsharded parameters"
                )
                here = f"{env.world_size} FSDP ranks" if _is_dtensor(p) else "unsharded parameters"
                raise UserError(
                    f"{path} holds optimizer state that is not elementwise (blockwise, e.g. "
                    f"8-bit) for {fqn}, saved on {saved_on}; it cannot be resharded to {here}: "
                    f"resume with the same layout ({meta['strategy']} on {meta['world_size']} "
                    "ranks) or with a fresh optimizer"
                )
        for key, md in stored.items():
            if not key.startswith("optim/"):
                continue
            fqn, _, leaf = key[len("optim/") :].rpartition("/")
            rank_key = "@rank" in leaf
            if rank_key and not leaf.endswith(f"@rank{env.rank}"):
                continue
            p = by_name[fqn]
            size = tuple(md.size)
            dtype = md.properties.dtype
            if _is_dtensor(p) and size == tuple(p.shape):
                template = torch.empty_like(p.detach(), dtype=dtype)
            elif rank_key or len(size) == 0:
                device = p.to_local().device if _is_dtensor(p) else p.device
                template = torch.empty(size, dtype=dtype, device=device)
            elif _is_dtensor(p):
                # blockwise state of a shard: [ranks, ...] sharded along dim 0 on the mesh

                template = dtensor_empty(
                    *size, dtype=dtype, device_mesh=p.device_mesh, placements=[Shard(0)]
                )
            else:
                template = torch.empty(size, dtype=dtype, device=p.device)
            sd[key] = template
    extras_stored = [k for k in stored if k.startswith("extra/")]
    for key in extras_stored:
        md = stored[key]
        sd[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    missing = [k for k in sd if k.startswith("model/") and k not in stored]
    if missing:
        raise UserError(
            f"{path} lacks {missing[0][len('model/') :]}; it was saved from another model"
        )
    with _quiet_single_process(env):
        try:
            dcp.load(sd, checkpoint_id=str(path), **_dcp_kwargs(env))
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if not _is_checkpoint_exception(exc):
                raise
            raise UserError(f"{path} cannot be read: {_first_failure(exc)}") from None
    if optimizer is not None:
        state: dict[int, dict[str, Any]] = {}
        index_of = {fqn: i for i, fqn in enumerate(fqns)}
        for key, value in sd.items():
            if not key.startswith("optim/"):
                continue
            fqn, _, leaf = key[len("optim/") :].rpartition("/")
            state.setdefault(index_of[fqn], {})[leaf.split("@rank")[0]] = value
        for fqn, entries in saved_opt["scalars"].items():
            state.setdefault(index_of[fqn], {}).update(entries)
        groups = []
        start = 0
        for g, saved in zip(optimizer.param_groups, saved_groups):
            hp = {k: v for k, v in saved.items() if k != "params"}
            if isinstance(hp.get("betas"), list):
                hp["betas"] = tuple(hp["betas"])
            groups.append({**hp, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    extra = dict(meta.get("extra", {}))
    for key in extras_stored:
        extra[key[len("extra/") :]] = sd[key]
    return extra
