"""State-dict layouts of :class:`trilora.optim.AdamW`: parsing, FSDP2 sharding, bitsandbytes.

An entry of ``state_dict()["state"]`` is torch's AdamW layout for 32-bit state::

    {"step": tensor(), "exp_avg": fp32 S, "exp_avg_sq": fp32 S}

and bitsandbytes' ``AdamW8bit`` layout for 8-bit state::

    {"step": tensor(), "state1": uint8 S, "state2": uint8 S, "absmax1": fp32 [ceil(n/256)],
     "absmax2": fp32 [ceil(n/256)], "qmap1": fp32 [256], "qmap2": fp32 [256]}

``step`` is a tensor, as in torch: checkpoint tools call ``.cpu()`` on it (bitsandbytes keeps
an ``int``, which broke FSDP resume, bitsandbytes #1381). :func:`to_bitsandbytes` converts a
state dict to what ``bitsandbytes.optim.AdamW8bit.load_state_dict`` takes;
``AdamW.load_state_dict`` reads bitsandbytes' state dicts as they are (FSDP-wrapped
quantization state, ``int`` steps, 32-bit ``state1``/``state2``).

FSDP2 (DTensor parameters sharded on dim 0): every tensor shaped like the parameter is a
DTensor sharded like it; ``absmax1``/``absmax2``, whose blocks run over each rank's shard, are
DTensors of shape ``[world, blocks of the largest shard]`` sharded on dim 0 (one zero-padded
row per rank), so distributed checkpointing saves every rank's scales and loads them back on
the same world size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from trilora.optim.blockwise import nblocks, quant_maps
from trilora.optim.errors import OptimizerInputError, StateDictLayoutError

FSDP_WRAPPED_KEY = "__bnb_optimizer_quant_state__"
"""Key under which bitsandbytes hides its quantization state from FSDP."""

_KEYS_32 = ("exp_avg", "exp_avg_sq")
_KEYS_8 = ("state1", "state2", "absmax1", "absmax2")
_SHAPED = ("exp_avg", "exp_avg_sq", "state1", "state2", "master")


def unwrap(state_dict: Any, owner: str) -> tuple[list[dict], dict[Any, dict]]:
    """``(param_groups, state)`` of an optimizer state dict, with bitsandbytes' FSDP-wrapped
    quantization state folded back into each entry (the input is not modified)."""
    if (
        not isinstance(state_dict, dict)
        or "param_groups" not in state_dict
        or "state" not in state_dict
    ):
        raise StateDictLayoutError(
            f"{owner}.load_state_dict expects a dict with 'state' and 'param_groups' (an "
            f"optimizer state dict), got {type(state_dict).__name__}"
        )
    state = {}
    for key, entry in state_dict["state"].items():
        if isinstance(entry, dict) and FSDP_WRAPPED_KEY in entry:
            entry = {k: v for k, v in entry.items() if k != FSDP_WRAPPED_KEY}
            entry.update(state_dict["state"][key][FSDP_WRAPPED_KEY])
        state[key] = entry
    return list(state_dict["param_groups"]), state


def _dtensor_local(value: Any) -> Any:
    to_local = getattr(value, "to_local", None)
    return to_local() if callable(to_local) and hasattr(value, "placements") else value


def parse_entry(
    entry: Any, slot: Any, index: Any, owner: str, state_bits: int
) -> tuple[float, dict[str, torch.Tensor], torch.Tensor | None]:
    """Validate one saved state entry against the parameter of ``slot``.

    Returns ``(step, tensors, master)``: ``tensors`` maps this optimizer's component names
    (``exp_avg``... or ``state1``...) to local tensors with the right element counts.
    Raises :class:`StateDictLayoutError` (one sentence) on any mismatch.
    """
    where = f"state of parameter {index} (shape {tuple(slot.param.shape)})"
    if not isinstance(entry, dict):
        raise StateDictLayoutError(f"{where} must be a dict, got {type(entry).__name__}")
    keys = set(entry)
    first = entry.get("state1")
    if first is not None and isinstance(first, torch.Tensor) and first.dtype == torch.uint8:
        bits, names = 8, dict(zip(_KEYS_8, _KEYS_8))
    elif all(k in entry for k in _KEYS_32):
        bits, names = 32, dict(zip(_KEYS_32, _KEYS_32))
    elif first is not None and "state2" in entry:  # bitsandbytes' 32-bit AdamW
        bits, names = 32, {"exp_avg": "state1", "exp_avg_sq": "state2"}
    else:
        raise StateDictLayoutError(
            f"{where} has keys {sorted(keys)}; expected AdamW state: step with exp_avg and "
            "exp_avg_sq (32-bit) or with state1, state2, absmax1 and absmax2 (8-bit)"
        )
    if "step" not in entry:
        raise StateDictLayoutError(f"{where} has no 'step' (keys: {sorted(keys)})")
    step = entry["step"]
    step = float(_dtensor_local(step).item() if isinstance(step, torch.Tensor) else step)
    if bits != slot.bits:
        reason = "it has fewer than min_8bit_size elements" if state_bits == 8 else "state_bits=32"
        raise StateDictLayoutError(
            f"{where} is {bits}-bit in the state dict but this {owner} keeps {slot.bits}-bit "
            f"state for it ({reason}); build the optimizer with the layout it was saved with"
        )
    tensors = {}
    for ours, theirs in names.items():
        value = entry.get(theirs)
        if not isinstance(value, torch.Tensor):
            raise StateDictLayoutError(f"{where} lacks the tensor {theirs!r}")
        value = _dtensor_local(value)
        expected = slot.numel
        if ours.startswith("absmax"):
            expected = nblocks(slot.numel)
            if value.dim() == 2 and value.shape[0] == 1:  # an FSDP2 shard row
                value = value[0, :expected]
            elif value.dim() == 2:
                raise StateDictLayoutError(
                    f"{where} has {theirs} for {value.shape[0]} ranks but it is loaded on one "
                    "rank of another world size; 8-bit state reloads on the world size it was "
                    "saved with"
                )
        if value.numel() != expected:
            raise StateDictLayoutError(
                f"{where} has {theirs} of {value.numel()} elements, expected {expected}"
            )
        if bits == 8 and ours.startswith("state") and value.dtype != torch.uint8:
            raise StateDictLayoutError(
                f"{where} has {theirs} of dtype {value.dtype}, expected uint8"
            )
        if not value.is_floating_point() and not (bits == 8 and ours.startswith("state")):
            raise StateDictLayoutError(
                f"{where} has {theirs} of dtype {value.dtype}, expected fp32"
            )
        tensors[ours] = value.detach()
    if bits == 8:
        maps = quant_maps("cpu")
        for key, ref in (("qmap1", maps.qmap1), ("qmap2", maps.qmap2)):
            saved = entry.get(key)
            if saved is not None and not torch.equal(
                _dtensor_local(saved).detach().cpu().float(), ref
            ):
                raise StateDictLayoutError(
                    f"{where} was quantized with another {key} than bitsandbytes' dynamic map; "
                    "trilora reads only dynamic-map 8-bit state"
                )
    master = entry.get("master")
    if master is not None:
        master = _dtensor_local(master).detach()
        if master.numel() != slot.numel:
            master = None
    return step, tensors, master


def largest_shard_blocks(param: Any) -> int:
    """Absmax blocks of the largest dim-0 shard of a DTensor parameter."""
    world = param.device_mesh.size()
    rows = param.shape[0] if param.dim() else 1
    per_row = math.prod(param.shape[1:]) if param.dim() > 1 else 1
    return nblocks(min(rows, -(-rows // world)) * per_row)


def check_8bit_dtensor(param: Any, owner: str) -> None:
    """8-bit state of a DTensor parameter needs FSDP2's layout: one mesh dimension, Shard(0)."""

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise OptimizerInputError(
            f"{owner}: 8-bit state supports DTensor parameters sharded on dim 0 over one mesh "
            f"dimension (FSDP2), got placements {placements}; use state_bits=32 for them"
        )


def to_dtensors(entry: dict[str, Any], param: Any) -> dict[str, Any]:
    """An exported entry of a DTensor parameter with DTensor values (module docstring)."""

    mesh = param.device_mesh
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _SHAPED:
            out[key] = DTensor.from_local(
                value.view(param.to_local().shape),
                mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
        elif key.startswith("absmax"):
            world, width = mesh.size(), largest_shard_blocks(param)
            row = torch.zeros((1, width), dtype=torch.float32, device=value.device)
            row[0, : value.numel()] = value
            out[key] = DTensor.from_local(
                row,
                mesh,
                [Shard(0)],
                run_check=False,
                shape=torch.Size((world, width)),
                stride=(width, 1),
            )
        else:
            out[key] = value
    return out


def to_bitsandbytes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A trilora AdamW state dict in the layout ``bitsandbytes.optim.AdamW8bit`` (or
    ``AdamW`` with ``optim_bits=32``) loads: ``int`` steps, 32-bit moments as fp32
    ``state1``/``state2``, group keys bitsandbytes expects. Tensors are copied to the CPU."""
    groups = []
    for group in state_dict["param_groups"]:
        g = dict(group)
        g.setdefault("alpha", 0.0)
        g.setdefault("t_alpha", None)
        g.setdefault("t_beta3", None)
        groups.append(g)
    state: dict[Any, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        out: dict[str, Any] = {"step": int(float(entry["step"]))}
        if "exp_avg" in entry:
            out["state1"] = entry["exp_avg"].detach().float().cpu().clone()
            out["state2"] = entry["exp_avg_sq"].detach().float().cpu().clone()
        else:
            for key in (*_KEYS_8, "qmap1", "qmap2"):
                out[key] = entry[key].detach().cpu().clone()
        state[index] = out
    return {"state": state, "param_groups": groups}


__all__ = ["FSDP_WRAPPED_KEY", "parse_entry", "to_bitsandbytes", "unwrap"]
