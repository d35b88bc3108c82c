"""trilora's experts implementation for transformers' MoE layers, and their conversion.

transformers 5 routes every MoE experts module (a class decorated with
``transformers.integrations.use_experts_implementation``) through the implementation named
by ``model.set_experts_implementation(name)``, looked up in the public registry
``transformers.integrations.moe.ExpertsInterface``. trilora registers ``"trilora"`` there:
:func:`experts_forward` sorts the (token, expert) pairs by expert and runs each projection
as one :func:`trilora.ops.grouped_qlora.grouped_lora_linear`, over
:class:`~trilora.moe.experts.QuantizedExperts` or 16-bit experts, with the LoRA factors the
PEFT layer (:class:`trilora.peft.TriloraExpertsLora`) lends it for the call. Nothing here is
model-specific: the module's own attributes, set by transformers' decorator, say the layout
(``has_gate``, ``has_bias``, ``is_transposed``), and its own gating function applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from trilora.formats import QuantConfig
from trilora.moe.experts import QuantizedExperts
from trilora.ops.grouped_qlora import grouped_lora_linear

__all__ = [
    "IMPLEMENTATION",
    "expert_lora",
    "experts_forward",
    "experts_modules",
    "experts_summary",
    "experts_tensors",
    "is_experts_module",
    "quantize_experts",
    "register_trilora_experts",
    "use_trilora_experts",
]

IMPLEMENTATION = "trilora"
"""The name trilora's experts forward is registered under in transformers."""

_LORA = "trilora_expert_lora"
# What transformers' experts decorator sets on every experts module it wraps.
_DECORATOR_ATTRIBUTES = ("has_gate", "has_bias", "is_transposed")


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module with 3-D (or quantized) experts."""
    if not all(hasattr(module, a) for a in _DECORATOR_ATTRIBUTES):
        return False
    return any(True for _ in experts_tensors(module))


def experts_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor | QuantizedExperts]]:
    """``(name, tensor)`` of the module's own experts tensors: its 3-D parameters and its
    :class:`QuantizedExperts` children."""
    for name, p in module.named_parameters(recurse=False):
        if p.dim() == 3:
            yield name, p
    for name, child in module.named_children():
        if isinstance(child, QuantizedExperts):
            yield name, child


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every experts module of ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_experts_module(m)]


def quantize_experts(model: nn.Module, config: QuantConfig, skip=lambda name: False) -> list[str]:
    """Replace every 3-D experts parameter of ``model`` by a :class:`QuantizedExperts` in
    ``config``'s format (expert by expert, bitsandbytes' bytes), in place.

    Returns the names of the replaced parameters (``model.layers.0.mlp.experts.down_proj``).
    """
    done = []
    for mname, module in experts_modules(model):
        for pname, p in list(experts_tensors(module)):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(p, QuantizedExperts) or skip(full):
                continue
            q = QuantizedExperts.quantize(p.data, config)
            delattr(module, pname)
            setattr(module, pname, q)
            done.append(full)
    return done


def experts_summary(model: nn.Module) -> str | None:
    """One line naming what the MoE experts of ``model`` hold (None without experts), e.g.
    ``"experts: 96 tensors of 128 experts, 13.94 GiB (4bit)"``."""
    tensors = [t for _, m in experts_modules(model) for _, t in experts_tensors(m)]
    if not tensors:
        return None
    nbytes = sum(
        t.nbytes if isinstance(t, QuantizedExperts) else t.numel() * t.element_size()
        for t in tensors
    )
    kinds = sorted(
        {
            t.quant_config().quant_type if isinstance(t, QuantizedExperts) else str(t.dtype)
            for t in tensors
        }
    )
    counts = sorted({t.shape[0] for t in tensors})
    size = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
    return (
        f"experts: {len(tensors)} tensors of {'/'.join(map(str, counts))} experts, {size} "
        f"({', '.join(kinds).replace('torch.', '')})"
    )


def register_trilora_experts() -> bool:
    """Register trilora's experts forward with transformers' experts registry under
    :data:`IMPLEMENTATION` (idempotent); False where transformers has no such registry.

    A model whose config names ``"trilora"`` (a distributed rank rebuilding rank 0's model)
    can only be built once it is registered."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # pragma: no cover - transformers 5 has it
        return False
    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    return True


def use_trilora_experts(model: nn.Module) -> None:
    """Register trilora's experts forward with transformers and select it for ``model``.

    Raises:
        RuntimeError: the installed transformers has no experts interface (it predates
            transformers 5's MoE layout), so quantized experts cannot run.
    """
    if not register_trilora_experts():
        raise RuntimeError(
            "this transformers has no ExpertsInterface; quantized MoE experts need transformers 5"
        )
    if not hasattr(model, "set_experts_implementation"):
        raise RuntimeError(f"{type(model).__name__} cannot select an experts implementation")
    model.set_experts_implementation(IMPLEMENTATION)


@contextlib.contextmanager
def expert_lora(
    module: nn.Module,
    name: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> Iterator[None]:
    """Within the block, ``module``'s experts tensor ``name`` carries the LoRA factors
    ``lora_a`` ``[E, r, in]``, ``lora_b`` ``[E, out, r]`` scaled by ``scale``."""
    table = module.__dict__.setdefault(_LORA, {})
    if name in table:
        raise RuntimeError(f"{name} of {type(module).__name__} already has an active LoRA")
    table[name] = (lora_a, lora_b, scale)
    try:
        yield
    finally:
        del table[name]


def _default_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _project(module, name, x, expert_ends, sorted_ids):
    weight = getattr(module, name)
    lora_a, lora_b, scale = module.__dict__.get(_LORA, {}).get(name, (None, None, 1.0))
    # 16-bit experts in another dtype than x are cast expert by expert inside the op, never
    # as a whole [E, out, in] copy.
    y = grouped_lora_linear(
        x, expert_ends, weight, lora_a, lora_b, scale, transposed=bool(module.is_transposed)
    )
    if module.has_bias:
        bias = getattr(module, f"{name}_bias")
        y = y + bias.to(y.dtype)[sorted_ids.clamp(max=bias.shape[0] - 1)]
    return y


def experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts of one MoE layer on ``hidden_states`` ``[T, H]``.

    ``top_k_index`` ``[T, k]`` (int) and ``top_k_weights`` ``[T, k]`` are the router's
    choices; returns ``[T, H]`` in ``hidden_states.dtype``: the routing-weighted sum of
    each token's k experts, as transformers' own implementations compute it. Indices at or
    past the number of experts (expert-parallel sentinels) contribute nothing.
    """
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = self.num_experts
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    counts = torch.bincount(sorted_ids.clamp(max=num_experts), minlength=num_experts + 1)
    expert_ends = counts[:num_experts].cumsum(0)
    x = hidden_states[order // top_k]
    if self.has_gate:
        h = _project(self, "gate_up_proj", x, expert_ends, sorted_ids)
        gate = getattr(self, "_apply_gate", None)
        h = gate(h) if gate is not None else _default_gate(self, h)
    else:
        h = self.act_fn(_project(self, "up_proj", x, expert_ends, sorted_ids))
    out = _project(self, "down_proj", h, expert_ends, sorted_ids)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    weights = top_k_weights.reshape(-1)[order].masked_fill(sorted_ids >= num_experts, 0)
    weighted = out * weights.to(out.dtype).unsqueeze(-1)
    restored = weighted[torch.argsort(order)]
    return restored.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)
