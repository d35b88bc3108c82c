"""Loading a quantized model for a distributed run: rank 0 reads, every other rank builds a shell.

Only rank 0 opens the checkpoint (:func:`trilora.from_pretrained`, which streams the shards
and quantizes each linear weight as it arrives, so even rank 0 never holds the 16-bit
model). It then broadcasts the model's *description*: the transformers config, the dtype
and the settings of every quantized layer. The other ranks build the very same module tree with
every parameter and quantization buffer on the meta device (no memory, no file access, so
nodes without the checkpoint work too); a mixture of experts gets its
:class:`~trilora.moe.QuantizedExperts` shells and trilora's experts forward, as
:func:`trilora.from_pretrained` gives rank 0. :func:`trilora.distributed.wrap_fsdp` and
:func:`~trilora.distributed.wrap_ddp` then materialize the other ranks and send them their
data from rank 0: a shard of every tensor under FSDP, a full copy under DDP.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM

from trilora.distributed.env import DistEnv, bind_device, current_env
from trilora.io import UserError
from trilora.loading import CheckpointError, from_pretrained, params_on_meta
from trilora.moe import (
    QuantizedExperts,
    experts_modules,
    register_trilora_experts,
    use_trilora_experts,
)
from trilora.nn import QuantizedLinear

__all__ = ["build_shell", "describe_model", "load_pretrained"]


def describe_model(model: nn.Module) -> dict[str, Any]:
    """What another rank needs to rebuild ``model`` (a :func:`trilora.from_pretrained` result)
    on the meta device: its config, dtype and the construction settings (the
    :class:`~trilora.formats.QuantConfig`, any format) of each quantized layer and of each
    quantized experts tensor (:class:`~trilora.moe.QuantizedExperts`: ``num_experts``,
    ``rows``, ``cols``, config, weight dtype).
    """

    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            layers[name] = dict(
                in_features=m.in_features,
                out_features=m.out_features,
                bias=m.bias is not None,
                config=m.quant_config,
                weight_dtype=m.weight_dtype,
            )
    experts = {
        name: dict(
            num_experts=m.num_experts,
            rows=m.rows,
            cols=m.cols,
            config=m.quant_config(),
            weight_dtype=m.weight_dtype,
        )
        for name, m in model.named_modules()
        if isinstance(m, QuantizedExperts)
    }
    dtypes = {p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    non_quantized = [
        p.dtype
        for name, p in model.named_parameters()
        if p.is_floating_point()
        and name.rpartition(".")[0] not in layers
        and name.rpartition(".")[0] not in experts
    ]
    dtype = non_quantized[0] if non_quantized else (dtypes.pop() if dtypes else torch.float32)
    return {
        "config": model.config,
        "dtype": dtype,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "layers": layers,
        "experts": experts,
        "quantized_modules": list(getattr(model, "trilora_quantized_modules", layers)),
        "quantized_experts": list(getattr(model, "trilora_quantized_experts", experts)),
    }


def build_shell(description: dict[str, Any]) -> nn.Module:
    """The model of :func:`describe_model` with every parameter and quantized state on meta.

    Non-persistent buffers computed at construction (rotary tables) are real, as in
    :func:`trilora.from_pretrained`; :func:`~trilora.distributed.wrap_fsdp` overwrites them
    with rank 0's anyway. Quantized experts tensors replace the 3-D experts parameters, and
    the model runs trilora's experts forward (:func:`trilora.moe.use_trilora_experts`).
    """

    # Rank 0's config of a mixture of experts names trilora's experts implementation, which
    # transformers checks while building the model: a fresh rank registers it first.
    register_trilora_experts()
    kwargs = {}
    if description.get("attn_implementation"):
        kwargs["attn_implementation"] = description["attn_implementation"]
    with params_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(
            description["config"], dtype=description["dtype"], **kwargs
        )
    for name, spec in description["layers"].items():
        old = model.get_submodule(name)
        shell = QuantizedLinear.shell(**spec, device="meta")
        if spec["bias"] and getattr(old, "bias", None) is not None:
            shell.bias = nn.Parameter(old.bias.to("meta"), requires_grad=False)
        model.set_submodule(name, shell)
    experts = description.get("experts", {})
    for name, spec in experts.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        delattr(owner, attribute)  # the 3-D parameter the experts replace
        setattr(owner, attribute, QuantizedExperts.shell(**spec, device="meta"))
    if experts_modules(model):  # as trilora.from_pretrained decides
        use_trilora_experts(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    model.trilora_quantized_modules = list(description["quantized_modules"])
    model.trilora_quantized_experts = list(description.get("quantized_experts", experts))
    return model


def load_pretrained(
    name_or_path: str | Path,
    *,
    env: DistEnv | None = None,
    device: torch.device | str = "cpu",
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """:func:`trilora.from_pretrained` on rank 0, a meta-device shell of the same model elsewhere.

    Args:
        name_or_path: the checkpoint folder (or Hub id), read by rank 0 only.
        env: the run's :class:`~trilora.distributed.DistEnv` (default: the current group).
        device: where rank 0 puts the loaded quantized model. The default, ``"cpu"``, keeps
            rank 0's GPU free until :func:`~trilora.distributed.wrap_fsdp` moves each
            rank's shard there; ``"cuda"`` quantizes on the GPU (faster for 16-bit
            checkpoints) but needs the whole quantized model to fit rank 0's GPU.
        **from_pretrained_kwargs: passed to :func:`trilora.from_pretrained` on rank 0
            (``compute_dtype``, ``dtype``, ``quantization_config``, ...).

    Returns:
        The model: loaded on rank 0, on the meta device on the other ranks. In a
        single-process run this is simply :func:`trilora.from_pretrained`.

    Raises:
        UserError: on every rank, when rank 0 found the checkpoint missing or corrupt (its
            message; likewise in a single process); other failures of rank 0 are re-raised
            there and reported on the other ranks as a RuntimeError.
    """

    env = env or current_env()
    if not env.distributed:
        try:
            return from_pretrained(name_or_path, device=device, **from_pretrained_kwargs)
        except (CheckpointError, OSError) as exc:
            raise UserError(f"could not load {name_or_path}: {exc}") from exc
    bind_device(env)
    payload: list[Any] = [None]
    model = None
    if env.rank == 0:
        try:
            model = from_pretrained(name_or_path, device=device, **from_pretrained_kwargs)
            payload[0] = describe_model(model)
        except Exception as exc:  # every rank must hear about it, or they hang
            payload[0] = exc
    dist.broadcast_object_list(payload, src=0)
    found = payload[0]
    if isinstance(found, BaseException):
        # A missing or corrupt checkpoint is the user's input: one line on every rank.
        if isinstance(found, CheckpointError | OSError | UserError):
            raise UserError(f"rank 0 could not load {name_or_path}: {found}") from (
                found if env.rank == 0 else None
            )
        if env.rank == 0:
            raise found
        raise RuntimeError(f"rank 0 failed to load {name_or_path}: {found}")
    if env.rank == 0:
        return model
    return build_shell(found)
