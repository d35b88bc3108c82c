"""Peak device memory of a QLoRA step on a mixture-of-experts model, computed analytically.

The traced model (:mod:`trilora.memory.trace`) runs the model's own forward on fake tensors;
an MoE model's expert forward is not traceable there yet (trilora's grouped expert kernel is
not in this tree, and transformers' expert loops have data-dependent shapes), so
``trilora mem`` answers MoE models from this model instead, and the traced paths refuse them
(:func:`check_traceable`). Everything static is exact, read off the model built on the meta
device: which tensors exist, their shapes, and the bytes of each in its format
(``trilora.formats.get_format(...).nbytes`` per expert matrix, the same as per linear). The
activations are a count of the tensors the step holds at its peak, documented term by term
below and in ``docs/memory.md``.

What each provider holds:

* **trilora**: every ``nn.Linear`` but the head and every expert matrix quantized (each
  ``[out, in]`` expert matrix of a fused 3-D ``[E, out, in]`` parameter separately, in the
  same format); routers, norms, embeddings and biases 16-bit. LoRA on each targeted linear
  (``A [r, in]``, ``B [out, r]``) and on each expert parameter in PEFT's
  ``target_parameters`` layout (``A [r*E, in]``, ``B [out, r*E]``: rank ``r`` per expert),
  fp32. The grouped expert kernel dequantizes one tile at a time: no 16-bit copy of an
  expert matrix ever exists.
* **bitsandbytes + PEFT**: the linears 4-bit, the expert parameters **16-bit**
  (bitsandbytes does not quantize 3-D parameters), LoRA on them through PEFT's
  ``ParamWrapper``. With one adapter on a 16-bit base, PEFT folds the factors into the
  weight with one ``baddbmm`` per forward (``_LoraFactorsProxy``): ``W + s * B @ A``, a full
  16-bit ``[E, out, in]`` tensor per targeted expert parameter, which the grouped matmul
  saves for backward (held until the layer's backward ends), and whose gradient, another
  ``[E, out, in]``, backward produces before reducing it to the factors. (With several
  adapters or an fp8 base PEFT materializes the delta itself as well; not modelled.)

Routing is assumed **balanced**: each of the ``E`` experts receives ``T * k / E`` of the
``T * k`` token copies, so no expert's share is larger than the mean (real routers are
uneven; the activations below do not depend on the split, only the per-expert scratch
would). The expert activations per MoE layer, ``T`` tokens repeated ``k`` times and sorted
by expert: the gathered input ``[T*k, H]``, the gate/up output ``[T*k, 2I]``, the activation
output ``[T*k, I]``, the down output ``[T*k, H]`` before the weighted sum over ``k``, plus
the router logits ``[T, E]`` (16-bit) and their fp32 softmax, the top-k weights and indices
and the sort permutation.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import torch
from torch import nn

from trilora.formats import QuantConfig, get_format
from trilora.memory import optimizer_model
from trilora.memory.fitting import largest_fitting
from trilora.memory.report import (
    OVERHEADS,
    MemOptions,
    MemReport,
    compute_dtype,
    format_bytes,
    overheads_of,
    provider_options,
)

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "experts_per_token", "moe_top_k")
ROUTING = "balanced routing assumed: each expert gets T*k/E of the T*k token copies"
LORA_BYTES = 4  # fp32 adapters: trilora's lora_shell default, PEFT's upcast for 16-bit bases


def is_moe(config) -> bool:
    """Whether ``config`` (a transformers config) describes a mixture-of-experts model."""
    return any((getattr(config, f, None) or 0) > 1 for f in EXPERT_COUNT_FIELDS)


def check_traceable(config) -> None:
    """Raise ValueError, in one line, for a model the fake-tensor trace cannot run (MoE)."""
    if is_moe(config):
        raise ValueError(
            "the traced memory model does not run mixture-of-experts models yet (their expert "
            "forward is not traceable); trilora mem answers them from the analytical MoE model: "
            "drop --confirm / --world-size / --fsdp / --measure"
        )


# ---------------------------------------------------------------------------------------
# the model's tensors
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertParam:
    """One fused expert parameter of one layer: ``experts`` matrices of ``[out, in]``."""

    name: str  # the parameter's own name (gate_up_proj, down_proj)
    experts: int
    out_features: int
    in_features: int
    # LoRA rank of each expert in units of r: PEFT gives a fused gate_up_proj rank 2r (the
    # two rank-r adapters of transformers 4's gate_proj and up_proj), see _peft_ranks
    rank_factor: int = 1


@dataclass(frozen=True)
class Linear:
    name: str  # the module's own name (q_proj, shared_expert.gate_proj's gate_proj)
    layer: int | None  # decoder layer index; None outside the layers
    out_features: int
    in_features: int


@dataclass(frozen=True)
class MoELayout:
    """The tensors of an MoE causal LM, as built by transformers on the meta device."""

    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    top_k: int
    experts: tuple[tuple[int, ExpertParam], ...]  # (layer, parameter), in module order
    linears: tuple[Linear, ...]  # every nn.Linear but the output head
    frozen_numel: int  # 16-bit tensors: embeddings, head, norms, routers, biases, sinks
    embedding_numel: int  # the input-embedding table (what --offload-embeddings moves)

    @property
    def moe_layers(self) -> int:
        return len({layer for layer, _ in self.experts})

    def layer_experts(self) -> list[ExpertParam]:
        """The expert parameters of one MoE layer (all MoE layers are alike)."""
        first = self.experts[0][0]
        return [p for layer, p in self.experts if layer == first]

    def expert_numel(self) -> int:
        return sum(p.experts * p.out_features * p.in_features for _, p in self.experts)


def _top_k(config) -> int:
    for f in TOP_K_FIELDS:
        value = getattr(config, f, None)
        if value:
            return int(value)
    raise ValueError(f"MoE config has none of {', '.join(TOP_K_FIELDS)} (experts per token)")


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


_RANKS: dict[str, dict] = {}


def _peft_ranks_cached(key: str, model: nn.Module) -> dict[tuple[int | None, str], int]:
    # A search evaluates dozens of reports of one config; PEFT's injection runs once.
    if key not in _RANKS:
        _RANKS[key] = _peft_ranks(model)
    return _RANKS[key]


def _peft_ranks(model: nn.Module) -> dict[tuple[int | None, str], int]:
    """``{(layer, experts parameter): rank / r}`` as ``trilora.get_peft_model`` with
    ``target_modules="all-linear"`` sets them up on ``model`` (meta device): PEFT's own
    mapping of all-linear onto MoE experts decides, e.g. rank 2r for a fused gate_up_proj."""
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    from trilora.peft import target_experts

    cfg = peft.LoraConfig(r=1, lora_alpha=1, target_modules="all-linear")
    target_experts(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, cfg, low_cpu_mem_usage=True)
    ranks = {}
    for name, mod in wrapped.named_modules():
        if isinstance(mod, ParamWrapper) and getattr(mod, "num_experts", 1) > 1:
            layer = _layer_index(name)
            ranks[(layer, mod.parameter_name)] = (
                mod.lora_A["default"].out_features // mod.num_experts
            )
    return ranks


def moe_layout(config) -> MoELayout:
    """The :class:`MoELayout` of ``config``, read off its causal LM on the meta device.

    An expert parameter is a 3-D parameter ``[E, out, in]`` (transformers' fused experts);
    a module that sets ``is_transposed`` (gpt-oss) stores ``[E, in, out]``, as PEFT reads it.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    experts, linears, seen = [], [], set()
    frozen = 0
    for mod_name, mod in model.named_modules():
        if type(mod) is nn.Linear and mod is not head:
            linears.append(
                Linear(
                    mod_name.rsplit(".", 1)[-1],
                    _layer_index(mod_name),
                    mod.out_features,
                    mod.in_features,
                )
            )
            seen.add(id(mod.weight))
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p.ndim == 3:
                e, a, b = p.shape
                out_f, in_f = (b, a) if getattr(mod, "is_transposed", False) else (a, b)
                experts.append((_layer_index(mod_name), ExpertParam(p_name, e, out_f, in_f)))
                seen.add(id(p))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            frozen += p.numel()
    if not experts:
        raise ValueError("not a mixture-of-experts model: no 3-D expert parameters")
    ranks = _peft_ranks_cached(model.config.to_json_string(), model)
    experts = [
        (layer, replace(p, rank_factor=ranks.get((layer, p.name), 1))) for layer, p in experts
    ]
    c = model.config
    heads = c.num_attention_heads
    return MoELayout(
        hidden=c.hidden_size,
        vocab=c.vocab_size,
        layers=c.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        top_k=_top_k(c),
        experts=tuple(experts),
        linears=tuple(linears),
        frozen_numel=frozen,
        embedding_numel=embed.weight.numel(),
    )


# ---------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def quantized_bytes(out_features: int, in_features: int, quant: QuantConfig) -> tuple[int, int]:
    """``(codes, state)`` bytes of one ``[out, in]`` matrix in ``quant``'s format (their
    sum is ``get_format(quant).nbytes((out, in), quant)``)."""
    fmt = get_format(quant)
    qw = fmt.empty((out_features, in_features), quant, torch.bfloat16, "meta")
    storage, _, _ = fmt.layer_tensors(qw)
    total = fmt.nbytes((out_features, in_features), quant)
    codes = storage.numel() * storage.element_size()
    return codes, total - codes


def _targeted(name: str, opts: MemOptions) -> bool:
    return opts.targets is None or name in opts.targets


def lora_numels(layout: MoELayout, opts: MemOptions) -> list[int]:
    """Elements of every trainable tensor: ``A``, ``B`` of each targeted linear and expert
    parameter (rank ``r`` per expert, ``2r`` where PEFT fuses two, :func:`_peft_ranks`:
    ``A [rank*E, in]``, ``B [out, rank*E]``)."""
    r = opts.r
    out = []
    for lin in layout.linears:
        if _targeted(lin.name, opts):
            out += [r * lin.in_features, lin.out_features * r]
    for _, p in layout.experts:
        if _targeted(p.name, opts):
            rank = r * p.rank_factor
            out += [rank * p.experts * p.in_features, p.out_features * rank * p.experts]
    return out


def static_bytes(layout: MoELayout, opts: MemOptions, provider: str) -> dict[str, int]:
    """The model's own tensors: ``base_weights`` (codes; 16-bit experts for bnb_peft),
    ``quant_state``, ``lora_params``, ``other_frozen``, and ``expert_weights`` (the experts'
    share of the first two)."""
    quant = QuantConfig(opts.quant_type, opts.blocksize, opts.double_quant)
    dt = compute_dtype(opts).itemsize
    codes = state = 0
    for lin in layout.linears:
        c, s = quantized_bytes(lin.out_features, lin.in_features, quant)
        codes, state = codes + c, state + s
    expert_bytes = 0
    for _, p in layout.experts:
        if provider == "trilora":
            c, s = quantized_bytes(p.out_features, p.in_features, quant)
            codes, state = codes + p.experts * c, state + p.experts * s
            expert_bytes += p.experts * (c + s)
        else:  # bitsandbytes does not quantize 3-D parameters: they stay 16-bit
            b = p.experts * p.out_features * p.in_features * dt
            codes += b
            expert_bytes += b
    frozen = layout.frozen_numel
    if opts.offload_embeddings and provider == "trilora":
        frozen -= layout.embedding_numel
    return {
        "base_weights": codes,
        "quant_state": state,
        "lora_params": LORA_BYTES * sum(lora_numels(layout, opts)),
        "other_frozen": frozen * dt,
        "expert_weights": expert_bytes,
    }


def _attention_saved(layout: MoELayout, tokens: int, dt: int) -> int:
    """One layer's attention tensors kept for backward: its input norm's output, q, k, v,
    the attention output and the fp32 per-row logsumexp (flash attention), the output
    projection's result and the residual sum."""
    qo = layout.heads * layout.head_dim
    kv = layout.kv_heads * layout.head_dim
    return tokens * ((3 * layout.hidden + 2 * qo + 2 * kv) * dt + 4 * layout.heads)


def _moe_saved(layout: MoELayout, tokens: int, dt: int, opts: MemOptions) -> int:
    """One MoE layer's expert-side tensors kept for backward (balanced routing): the router
    logits and fp32 probabilities, top-k weights, indices and sort order, and per token
    copy the gathered input, gate/up output, activation output and down output (and each
    targeted expert matrix's LoRA intermediate ``x @ A``, ``[T*k, r]``)."""
    e = layout.layer_experts()
    experts = e[0].experts
    up, down = e[0], e[-1]
    copies = tokens * layout.top_k
    router = tokens * experts * (dt + 4)
    routing = copies * (4 + 8 + 8)  # fp32 weights, int64 expert ids, int64 sort permutation
    per_copy = up.in_features + up.out_features + down.in_features + down.out_features
    lora = sum(opts.r for p in e if _targeted(p.name, opts))
    return router + routing + copies * (per_copy + lora) * dt


def _moe_backward(layout: MoELayout, tokens: int, dt: int) -> int:
    """The expert backward's own transients at their largest: the gradients of the up
    projection's output and of its gathered input (``[T*k, 2I]`` and ``[T*k, H]``)."""
    up = layout.layer_experts()[0]
    return tokens * layout.top_k * (up.out_features + up.in_features) * dt


def _shared_saved(layout: MoELayout, tokens: int, dt: int) -> int:
    """A dense shared expert's activations (Qwen2-MoE style): the output of every linear of
    one MoE layer that is not an attention projection (the shared expert's gate, up and down
    projections and its gate); 0 for models without one."""
    first = min(layer for layer, _ in layout.experts)
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return (
        tokens
        * dt
        * sum(
            lin.out_features
            for lin in layout.linears
            if lin.layer == first and lin.name not in attention
        )
    )


def _peft_materialized(layout: MoELayout, opts: MemOptions, dt: int) -> tuple[int, int]:
    """bitsandbytes + PEFT, per MoE layer: ``(held, transient)`` bytes of the folded
    weights ``W + s * B @ A`` (``[E, out, in]``, 16-bit, one per targeted expert parameter,
    saved by the grouped matmul) and of the largest one's gradient in backward."""
    mats = [
        p.experts * p.out_features * p.in_features * dt
        for p in layout.layer_experts()
        if _targeted(p.name, opts)
    ]
    return sum(mats), max(mats, default=0)


def _peft_lora_inputs(layout: MoELayout, tokens: int, opts: MemOptions) -> int:
    """PEFT casts each LoRA linear's input to the adapters' fp32 and keeps it for
    ``lora_A``'s backward: one ``[T, in]`` fp32 copy per targeted linear of a layer."""
    first = min(layer for layer, _ in layout.experts)
    return (
        tokens
        * LORA_BYTES
        * sum(
            lin.in_features
            for lin in layout.linears
            if lin.layer == first and _targeted(lin.name, opts)
        )
    )


def _loss_bytes(layout: MoELayout, tokens: int, dt: int, fused: bool) -> int:
    """The loss's transients: trilora's fused loss holds fp32 logits and their gradient for
    one chunk of rows; the stock loss holds 16-bit logits, their fp32 upcast, the fp32
    log-probabilities and the fp32 gradient over every token."""
    if fused:
        from trilora.ops.linear_cross_entropy import default_chunk_size

        chunk = min(tokens, default_chunk_size(tokens, layout.vocab))
        return 2 * chunk * layout.vocab * 4 + 3 * tokens * layout.hidden * dt
    return tokens * layout.vocab * (dt + 3 * 4) + 2 * tokens * layout.hidden * dt


def moe_report(
    config, opts: MemOptions, provider: str = "trilora", name: str = "", layout=None
) -> MemReport:
    """The analytical :class:`MemReport` of one training step of MoE ``config``.

    ``provider``: ``"trilora"`` or ``"bnb_peft"`` (bitsandbytes 4-bit linears, 16-bit
    experts, PEFT LoRA with its folded expert weights; transformers' reentrant
    checkpointing when ``opts.checkpointing``, no offload, the stock loss). The peak is the
    larger of two moments: the loss (every checkpointed layer input live, plus the loss's
    transients) and one MoE layer's backward (the layer inputs, that layer's recomputed
    activations and the expert backward's transients; without checkpointing every layer's
    activations). ``options["moe"]`` holds the expert weight bytes and the routing
    assumption.
    """
    from trilora.memory.report import PROVIDERS

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    opts.validate()
    opts = provider_options(provider, opts)
    layout = layout or moe_layout(config)
    dt = compute_dtype(opts).itemsize
    tokens = opts.batch * opts.seq_len
    trilora = provider == "trilora"
    static = static_bytes(layout, opts, provider)
    experts_bytes = static.pop("expert_weights")
    numels = lora_numels(layout, opts)
    held = optimizer_model.optimizer_bytes(opts.optimizer, numels, LORA_BYTES)
    grads = LORA_BYTES * sum(numels) if held.gradients_on_device else 0

    layer_input = tokens * layout.hidden * dt
    saved = (
        _attention_saved(layout, tokens, dt)
        + _moe_saved(layout, tokens, dt, opts)
        + _shared_saved(layout, tokens, dt)
    )
    transient = _moe_backward(layout, tokens, dt) + 2 * layer_input  # + incoming gradients
    if not trilora:
        folded, folded_grad = _peft_materialized(layout, opts, dt)
        saved += folded + _peft_lora_inputs(layout, tokens, opts)
        transient += folded_grad
    offload = trilora and opts.offload and opts.checkpointing
    host_pinned = 0
    if opts.checkpointing:
        # the inputs of the layers: on the device, or pinned host memory with the current
        # and the prefetched one on the device
        inputs = 2 * layer_input if offload else layout.layers * layer_input
        host_pinned = layout.layers * layer_input if offload else 0
        layer_activations = saved
    else:
        inputs = 0
        layer_activations = layout.layers * saved
    fused = trilora and opts.fused_ce
    loss_phase = inputs + layer_activations * (not opts.checkpointing)
    loss_transient = _loss_bytes(layout, tokens, dt, fused)
    if loss_phase + loss_transient > inputs + layer_activations + transient:
        activations, temporaries = loss_phase, loss_transient
    else:
        activations, temporaries = inputs + layer_activations, transient
    categories = {
        **static,
        "gradients": grads,
        "optimizer_state": held.device,
        "activations": activations,
        "temporaries": temporaries,
    }
    weights = static["base_weights"] + static["quant_state"]
    options = asdict(opts)
    options["moe"] = {
        "expert_weights": experts_bytes,
        "weights": weights,
        "experts": layout.layer_experts()[0].experts,
        "top_k": layout.top_k,
        "moe_layers": layout.moe_layers,
        "routing": ROUTING,
    }
    return MemReport(
        provider=provider,
        model=name,
        options=options,
        categories=categories,
        overheads=overheads_of(categories),
        host_pinned=host_pinned,
        layers_traced=0,
        layers=layout.layers,
        host_embedding=layout.embedding_numel * dt if opts.offload_embeddings and trilora else 0,
        host_optimizer=held.host,
        method="analytical",
    )


def minimum_moe_bytes(config, opts: MemOptions, provider: str = "trilora", layout=None) -> int:
    """Device bytes before any activation (weights, LoRA, gradients, optimizer state,
    overheads): the floor of a budget search."""
    layout = layout or moe_layout(config)

    opts = provider_options(provider, opts)
    static = static_bytes(layout, opts, provider)
    static.pop("expert_weights")
    numels = lora_numels(layout, opts)
    floor = optimizer_model.device_floor(opts.optimizer, numels, LORA_BYTES)
    return sum(static.values()) + floor + sum(OVERHEADS.values())


def find_max_moe(
    config,
    opts: MemOptions,
    budget: int,
    search: str = "seq_len",
    provider: str = "trilora",
    name: str = "",
    multiple: int = 1024,
) -> tuple[int, MemReport | None]:
    """Largest ``seq_len`` (a multiple of ``multiple``) or ``batch`` whose analytical step
    fits ``budget`` bytes, and its report (``options["search"]`` as in
    :func:`trilora.memory.search.find_max`). Raises ValueError when even the weights do not
    fit, naming the minimum."""

    layout = moe_layout(config)
    floor = minimum_moe_bytes(config, opts, provider, layout)
    if budget <= floor:
        lora = lora_numels(layout, opts)
        expert_lora = sum(lora) - sum(lora_numels(layout, _linears_only(layout, opts)))
        trained = optimizer_model.device_floor(
            provider_options(provider, opts).optimizer, lora, LORA_BYTES
        ) + LORA_BYTES * sum(lora)
        raise ValueError(
            f"budget {format_bytes(budget)} is smaller than the model's fixed footprint "
            f"(weights, LoRA, gradients, optimizer state, CUDA overheads) of "
            f"{format_bytes(floor)}; the minimum budget is above {format_bytes(floor)}. "
            f"LoRA with its gradients and optimizer state is {format_bytes(trained)} of it, "
            f"{expert_lora / max(1, sum(lora)):.0%} of that on the experts (r={opts.r} for "
            "each expert): a lower -r, an 8-bit or offloaded --optimizer, or --targets "
            "without gate_up_proj/down_proj lowers it"
            + _lower_rank_hint(config, opts, budget, search, provider, name, multiple)
        )
    step = multiple if search == "seq_len" else 1

    def report(v: int) -> MemReport:
        return moe_report(config, replace(opts, **{search: v}), provider, name, layout)

    value, seen = largest_fitting(
        lambda v: report(v).total, budget, step, max(step, getattr(opts, search))
    )
    if value == 0:
        return 0, None
    rep = report(value)
    nxt = value + step
    rep.options["search"] = {
        "dimension": search,
        "budget": budget,
        "method": "analytical",
        "precision": step,
        "next_value": nxt,
        "next_total": seen.get(nxt, report(nxt).total),
        "evaluated": {str(k): v for k, v in sorted(seen.items())},
    }
    return value, rep


def _lower_rank_hint(config, opts: MemOptions, budget, search, provider, name, multiple) -> str:
    """``"; at -r 8 (the rest as given): <value>"``: the largest power-of-two rank below
    ``opts.r`` whose step fits ``budget``, and what fits with it ("" when none does)."""
    r = 1 << max(0, (opts.r - 1).bit_length() - 1)
    while r >= 1 and r < opts.r:
        lower = replace(opts, r=r)
        if minimum_moe_bytes(config, lower, provider) < budget:
            value, _ = find_max_moe(config, lower, budget, search, provider, name, multiple)
            if value:
                unit = " tokens" if search == "seq_len" else ""
                return f"; at -r {r} (the rest as given) the longest {search} is {value:,}{unit}"
        r //= 2
    return ""


def _linears_only(layout: MoELayout, opts: MemOptions) -> MemOptions:
    """``opts`` with the expert parameters taken out of the LoRA targets."""

    names = {lin.name for lin in layout.linears if _targeted(lin.name, opts)}
    return replace(opts, targets=tuple(sorted(names)))


def experts_line(rep: MemReport) -> str:
    """``experts: X GiB of Y GiB weights (E experts, top-k, L MoE layers)`` for a report of
    :func:`moe_report`."""
    m = rep.options["moe"]
    return (
        f"experts: {format_bytes(m['expert_weights'])} of {format_bytes(m['weights'])} weights "
        f"({m['experts']} experts, top-{m['top_k']}, {m['moe_layers']} MoE layers)"
    )


__all__ = [
    "ROUTING",
    "MoELayout",
    "check_traceable",
    "experts_line",
    "find_max_moe",
    "is_moe",
    "lora_numels",
    "minimum_moe_bytes",
    "moe_layout",
    "moe_report",
    "quantized_bytes",
    "static_bytes",
]
