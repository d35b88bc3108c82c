"""trilora as the backend of PEFT LoRA models.

:class:`TriloraLoraLayer` is a PEFT ``LoraLayer`` over a :class:`trilora.nn.Linear4bit`
base: its forward runs the base matmul and the active adapter's LoRA term in one
:func:`trilora.ops.qlora_linear` call. It is plugged in through PEFT's extension point
``LoraConfig._register_custom_module`` (consulted before PEFT's own dispatchers), never by
monkeypatching PEFT, and nothing global changes at import time.

* :func:`get_peft_model` registers the layer on the config and calls ``peft.get_peft_model``.
* Targeted layers that bitsandbytes never quantizes (the output head ``lm_head``, weights
  tied to the embeddings) keep their 16-bit base, with the LoRA on top, exactly as with
  transformers + bitsandbytes + PEFT.
* ``init_lora_weights="pissa"`` (and ``pissa_niter_K``), ``"olora"`` and ``"corda"`` rewrite
  the base weight as ``W - scale * B @ A``: on a full-precision ``nn.Linear`` PEFT's own
  initialization runs first and the rewritten weight is then quantized (QPiSSA).
  ``"loftq"`` picks the 4-bit weight ``Q`` and the adapter together with trilora's own
  quantizer (``Q = quant(W - scale * B @ A)``, ``scale * B @ A = rank-r SVD of W - Q``,
  ``loftq_iter`` times), so the adapter corrects the very bytes the layer holds. All of
  them need the full-precision weight: on an already 4-bit base they raise
  :class:`UnsupportedLoraSetting`.
* :func:`patch` converts an existing ``PeftModel`` in place: every LoRA layer over a
  bitsandbytes ``Linear4bit`` (same bytes, no re-quantization), a plain ``nn.Linear``
  (quantized now) or a trilora ``Linear4bit`` becomes a :class:`TriloraLoraLayer` that keeps
  the very same ``lora_A``/``lora_B`` modules, so module and parameter names (and adapter
  files) are unchanged.

Module names stay PEFT's: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn

from trilora import patches
from trilora.formats import QuantConfig, get_format
from trilora.formats.int8 import Int8Weight
from trilora.io import UserError
from trilora.loading import default_skip_modules
from trilora.moe import (
    QuantizedExperts,
    expert_lora,
    experts_tensors,
    is_experts_module,
    quantize_experts,
    use_trilora_experts,
)
from trilora.nn import Linear4bit, QLoraLinear, QuantizedLinear
from trilora.ops.grouped_qlora import peft_expert_factors
from trilora.quant import QuantizedWeight

try:  # PEFT is a dependency, but keep `import trilora.peft` failing with a clear message.
    from peft import LoraConfig, PeftModel
    from peft import get_peft_model as _peft_get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, ParamWrapper
    from peft.utils import PeftType
except ImportError as exc:  # pragma: no cover
    raise ImportError("trilora.peft needs the `peft` package (pip install peft)") from exc

__all__ = [
    "QuantOptions",
    "TriloraExpertsLora",
    "TriloraLoraLayer",
    "UnsupportedLoraSetting",
    "check_lora_config",
    "experts_as_parameters",
    "get_peft_model",
    "load_adapter",
    "patch",
    "rewrites_base_weights",
    "target_experts",
]


class UnsupportedLoraSetting(UserError):
    """A LoRA setting trilora does not implement; raised instead of computing something else.

    A :class:`trilora.io.UserError` (so also a ``ValueError``): the CLI prints it as one line.
    """


def rewrites_base_weights(init_lora_weights: Any) -> bool:
    """Whether PEFT's ``init_lora_weights`` value rewrites the base weight (PiSSA, OLoRA,
    CorDA, LoftQ) instead of only initializing the adapter."""
    if not isinstance(init_lora_weights, str):
        return False
    init = init_lora_weights.lower()
    return init.startswith(("pissa", "corda")) or init in ("olora", "loftq")


@dataclass(frozen=True)
class QuantOptions:
    """How plain ``nn.Linear`` base layers are quantized when a LoRA layer is put on them."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = torch.bfloat16
    # id() of the plain nn.Linear layers that stay 16-bit when targeted (output head, tied
    # weights: what bitsandbytes never quantizes); see _full_precision_bases.
    full_precision: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.config  # noqa: B018 - validates, through the one QuantConfig

    @property
    def config(self) -> QuantConfig:
        """These options as the :class:`~trilora.formats.QuantConfig` they validate as."""
        return QuantConfig(self.quant_type, self.blocksize, self.double_quant, self.compute_dtype)


_SUPPORTED = (
    "r, lora_alpha, lora_dropout, use_rslora, target_modules, target_parameters (MoE experts), "
    "modules_to_save, bias='none'"
)
# LoraConfig field -> (is it set?, what it is)
_UNSUPPORTED = {
    "use_dora": (lambda v: bool(v), "DoRA"),
    "lora_bias": (lambda v: bool(v), "a trainable bias on lora_B"),
    "fan_in_fan_out": (lambda v: bool(v), "Conv1D-style transposed weights"),
    "use_qalora": (lambda v: bool(v), "QA-LoRA"),
    "velora_config": (lambda v: v is not None, "VeLoRA"),
    "alora_invocation_tokens": (lambda v: v is not None, "activated LoRA (aLoRA)"),
    "monteclora_config": (lambda v: v is not None, "MonteCLoRA"),
    "use_bdlora": (lambda v: bool(v), "block-diagonal LoRA"),
    "arrow_config": (lambda v: v is not None, "Arrow routing"),
    "kasa_config": (lambda v: v is not None, "KaSA"),
    "layer_replication": (lambda v: bool(v), "layer replication"),
    "megatron_config": (lambda v: v is not None, "Megatron parallel layers"),
}


def check_lora_config(config: Any) -> None:
    """Raise :class:`UnsupportedLoraSetting` naming the first setting trilora cannot honour."""
    if not isinstance(config, LoraConfig) or config.peft_type != PeftType.LORA:
        kind = getattr(config, "peft_type", type(config).__name__)
        raise UnsupportedLoraSetting(
            f"trilora supports LoRA adapters (LoraConfig) only, got {kind}"
        )
    for field, (is_set, what) in _UNSUPPORTED.items():
        value = getattr(config, field, None)
        if is_set(value):
            raise UnsupportedLoraSetting(
                f"trilora does not support LoraConfig.{field}={value!r} ({what}); supported settings: {_SUPPORTED}"
            )
    if config.bias != "none":
        raise UnsupportedLoraSetting(
            f"trilora does not support LoraConfig.bias={config.bias!r} (trainable base-layer biases); "
            "use bias='none'"
        )
    if config.init_lora_weights == "mica":
        raise UnsupportedLoraSetting(
            "trilora does not support LoraConfig.init_lora_weights='mica' (a LoRA variant)"
        )
    if config.init_lora_weights == "loftq":
        loftq = config.loftq_config or {}
        loftq = loftq if isinstance(loftq, dict) else vars(loftq)
        if loftq.get("loftq_bits", 4) != 4:
            raise UnsupportedLoraSetting(
                f"trilora's LoftQ quantizes to 4 bits (its base format); got "
                f"loftq_config.loftq_bits={loftq.get('loftq_bits')!r}"
            )
        if int(loftq.get("loftq_iter", 1)) < 1:
            raise UnsupportedLoraSetting(
                f"loftq_config.loftq_iter must be at least 1, got {loftq.get('loftq_iter')!r}"
            )


_MIXED_BATCH = "mixed-adapter batches (forward(..., adapter_names=...))"


def _peft_hook(obj: Any, name: str, purpose: str) -> Any:
    """``obj.<name>``: one of the PEFT extension hooks that have no public name.

    The compatibility point for PEFT's private names: ``LoraConfig._register_custom_module``
    (PEFT's documented custom-module dispatch) and ``LoraLayer._check_forward_args`` /
    ``_mixed_batch_forward`` (mixed-adapter batches). All exist from PEFT 0.20 to the newest
    release; where a release lacks one, a :class:`~trilora.io.UserError` names the PEFT
    version and ``purpose``, the feature that needs it.
    """
    hook = getattr(obj, name, None)
    if not callable(hook):
        raise UserError(
            f"PEFT {peft.__version__} has no {type(obj).__name__}.{name}, which trilora needs "
            f"for {purpose}; install a PEFT release that has it (trilora is tested with 0.20 "
            "and newer)"
        )
    return hook


def _register(config: LoraConfig, options: QuantOptions) -> None:
    register = _peft_hook(config, "_register_custom_module", "its LoRA layers (custom modules)")
    register({nn.Linear: TriloraLoraLayer})
    # Not a dataclass field, so it never reaches adapter_config.json.
    config._trilora_quant_options = options


# ---------------------------------------------------------------------------------------
# base layers
# ---------------------------------------------------------------------------------------


def _is_bnb(module: nn.Module, name: str) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == name


def _bnb_to_trilora(layer: nn.Module) -> Linear4bit:
    """A trilora ``Linear4bit`` over the exact bytes of a bitsandbytes ``Linear4bit``."""

    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError(
            "bitsandbytes Linear4bit has no quant_state (its weight was never quantized)"
        )
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks weights for its AVX512-BF16 CPU kernel on the first eval
        # forward; undo it the way its own state_dict() does.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = state
    qw = QuantizedWeight.from_bnb(weight.data, state)
    new = Linear4bit.from_quantized(qw, None, layer.compute_dtype)
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def _bnb8_to_trilora(layer: nn.Module, options: QuantOptions) -> QuantizedLinear:
    """A trilora int8 layer over the exact codes and SCB of a bitsandbytes ``Linear8bitLt``."""
    if getattr(getattr(layer, "state", None), "has_fp16_weights", False):
        raise UnsupportedLoraSetting(
            "bitsandbytes Linear8bitLt with has_fp16_weights=True trains 16-bit weights; "
            "trilora's int8 base is frozen int8 (build it with has_fp16_weights=False)"
        )
    weight = layer.weight
    if getattr(weight, "SCB", None) is None and getattr(layer.state, "SCB", None) is not None:
        weight.SCB = layer.state.SCB  # bitsandbytes moves SCB to its state after a forward
    dtype = layer.bias.dtype if layer.bias is not None else options.compute_dtype
    qw = Int8Weight.from_bnb(weight, dtype=dtype or torch.bfloat16)
    # Linear8bitLt has no compute dtype: it computes in its input's dtype, and so does its
    # trilora layer (``options.compute_dtype`` is for layers trilora quantizes itself; bf16
    # there would make an fp32 model compute in bf16, which CPUs without AVX512-BF16
    # multiply an order of magnitude slower).
    new = QuantizedLinear.from_quantized(qw, None, None)
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def _full_precision_bases(model: nn.Module) -> frozenset[int]:
    """``id()`` of the plain ``nn.Linear`` layers of ``model`` that bitsandbytes never
    quantizes (its default skip list: output head, tied weights); LoRA on them keeps a
    16-bit base. Works on a bare model and on a PEFT-wrapped one."""

    ids = set()
    for name in default_skip_modules(model):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        if type(module) is nn.Linear:
            ids.add(id(module))
    return frozenset(ids)


def _require_full_precision(layer: nn.Module, init: str) -> None:
    if type(layer) is nn.Linear and layer.weight.is_floating_point():
        return
    what = (
        "chooses the 4-bit weight together with the adapter"
        if init == "loftq"
        else "rewrites the base weight as W - scale * B @ A"
    )
    raise UnsupportedLoraSetting(
        f"init_lora_weights={init!r} {what}, which needs the full-precision weight, but this "
        f"base layer is already quantized ({type(layer).__module__}.{type(layer).__name__}); "
        "load the model in 16/32 bits and call trilora.get_peft_model, which quantizes afterwards"
    )


def to_trilora_base(layer: nn.Module, options: QuantOptions) -> QuantizedLinear:
    """The trilora quantized layer for a LoRA base layer.

    A trilora quantized layer (``Linear4bit``, ``Linear8bit``): itself. bitsandbytes
    ``Linear4bit`` / ``Linear8bitLt``: its bytes, untouched. Plain ``nn.Linear``: quantized
    with ``options``. Anything else raises ``TypeError``.
    """
    if isinstance(layer, QLoraLinear):
        raise TypeError(
            "a trilora QLoraLinear already carries its own LoRA adapter; use Linear4bit as the base"
        )
    if isinstance(layer, QuantizedLinear):
        return layer
    if _is_bnb(layer, "Linear4bit") or _is_bnb(layer, "LinearNF4") or _is_bnb(layer, "LinearFP4"):
        return _bnb_to_trilora(layer)
    if _is_bnb(layer, "Linear8bitLt"):
        return _bnb8_to_trilora(layer, options)
    if type(layer) is nn.Linear:
        new = QuantizedLinear.from_linear_config(layer, options.config)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        return new
    raise TypeError(
        f"trilora puts LoRA on bitsandbytes Linear4bit / Linear8bitLt, trilora quantized or plain "
        "nn.Linear base "
        f"layers; got {type(layer).__module__}.{type(layer).__name__}"
    )


# ---------------------------------------------------------------------------------------
# the LoRA layer
# ---------------------------------------------------------------------------------------


class TriloraLoraLayer(nn.Module, LoraLayer):
    """PEFT LoRA layer over a trilora 4-bit base, computed by the fused QLoRA op.

    ``y = base(x) + sum_a s_a * lora_B[a](lora_A[a](drop_a(x)))`` over the active adapters
    ``a``: the first one is fused with the base matmul in :func:`trilora.ops.qlora_linear`
    (which draws the dropout mask itself), further active adapters are added with plain
    torch ops. ``x`` is ``[..., in_features]``; the result has ``x.dtype``. The base runs in
    the base layer's ``compute_dtype``, the LoRA branch in the factors' dtype.

    A base that bitsandbytes would keep in 16 bits (the output head; see
    :class:`QuantOptions`) stays a plain ``nn.Linear``, and the layer computes PEFT's
    ``lora.Linear`` forward over it.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs,
    ) -> None:
        check_lora_config(config)
        options = getattr(config, "_trilora_quant_options", None) or QuantOptions()
        super().__init__()
        keep = id(base_layer) in options.full_precision
        if keep or rewrites_base_weights(config.init_lora_weights):
            # 16-bit head; or an initialization that needs the full-precision weight: it
            # runs first (update_layer), and the base is quantized after it.
            LoraLayer.__init__(self, base_layer)
        else:
            LoraLayer.__init__(self, to_trilora_base(base_layer, options))
        self.fan_in_fan_out = False
        # Before update_layer, which re-activates self.active_adapters (no adapter modules
        # exist yet, so no requires_grad flag changes here).
        self.set_adapter(adapter_name)
        self._quant_options = options
        self._keeps_16bit_base = keep
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)
        if not keep and type(self.base_layer) is nn.Linear:
            self.base_layer = to_trilora_base(self.base_layer, options)

    @torch.no_grad()
    def _loftq_init(self, adapter: str, config: LoraConfig) -> None:
        """LoftQ (Li et al. 2023) with trilora's quantizer: alternately ``Q = quant(W - L)``
        and ``L = scale * B @ A = rank-r SVD of (W - dequant(Q))``; the base becomes ``Q``
        itself, so the adapter corrects exactly the bytes the layer computes with."""
        base, options = self.base_layer, self._quant_options
        loftq = config.loftq_config or {}
        loftq = loftq if isinstance(loftq, dict) else vars(loftq)
        iters = int(loftq.get("loftq_iter", 1))
        scale, r = self.scaling[adapter], self.r[adapter]
        weight = base.weight.detach().float()
        low_rank = torch.zeros_like(weight)
        for _ in range(iters):
            config = options.config
            qw = get_format(config).quantize((weight - low_rank).to(base.weight.dtype), config)
            u, sv, vh = torch.linalg.svd(weight - qw.dequantize(torch.float32), full_matrices=False)
            root = (sv[:r] / scale).sqrt()
            lora_b, lora_a = u[:, :r] * root, root[:, None] * vh[:r]
            low_rank = scale * (lora_b @ lora_a)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        a.data = lora_a.to(a.dtype).contiguous()
        b.data = lora_b.to(b.dtype).contiguous()
        self.base_layer = QuantizedLinear.from_quantized(qw, base.bias, options.compute_dtype)

    @classmethod
    def from_lora_layer(cls, old: LoraLayer, options: QuantOptions) -> TriloraLoraLayer:
        """Convert a PEFT ``lora.Linear`` / ``lora.bnb.Linear4bit``, keeping its adapter modules."""
        if old.merged:
            raise ValueError(
                f"cannot patch a LoRA layer with merged adapters {old.merged_adapters}; unmerge first"
            )
        if getattr(old, "fan_in_fan_out", False):
            raise UnsupportedLoraSetting(
                "trilora does not support fan_in_fan_out=True (Conv1D-style weights)"
            )
        if old.lora_variant:
            raise UnsupportedLoraSetting(
                f"trilora does not support LoRA variants (DoRA, aLoRA, ...); adapters "
                f"{sorted(old.lora_variant)} use {sorted(type(v).__name__ for v in old.lora_variant.values())}"
            )
        biased = [a for a, b in old.lora_bias.items() if b]
        if biased:
            raise UnsupportedLoraSetting(
                f"trilora does not support lora_bias=True (adapters {biased})"
            )
        if len(old.lora_embedding_A):
            raise TypeError("trilora supports LoRA on linear layers only, not embeddings")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        base = old.get_base_layer()
        keep = id(base) in options.full_precision
        LoraLayer.__init__(new, base if keep else to_trilora_base(base, options))
        new._quant_options = options
        new._keeps_16bit_base = keep
        new.fan_in_fan_out = False
        for attr in ("r", "lora_alpha", "scaling", "use_dora", "use_rslora", "lora_bias", "kwargs"):
            setattr(new, attr, dict(getattr(old, attr)))
        # The same ModuleDicts: parameter objects, names and optimizer references survive.
        for attr in (
            "lora_dropout",
            "lora_A",
            "lora_B",
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_magnitude_vector",
        ):
            setattr(new, attr, getattr(old, attr))
        # Through PEFT's public setters, which also set the adapters' requires_grad flags:
        # the old layer's flags (frozen adapters, inference mode) are put back afterwards.
        trainable = [(p, p.requires_grad) for p in new.parameters()]
        new.set_adapter(old.active_adapter)
        new.enable_adapters(not old.disable_adapters)
        for p, flag in trainable:
            p.requires_grad_(flag)
        new.merged_adapters = []
        new.train(old.training)
        return new

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs
    ) -> None:
        # Also reached by add_adapter/load_adapter on an existing layer: check every config.
        check_lora_config(config)
        init = config.init_lora_weights
        if rewrites_base_weights(init) and not self._keeps_16bit_base:
            _require_full_precision(self.get_base_layer(), init)
        if init == "loftq":
            # PEFT's LoftQ quantizes with bitsandbytes on CUDA and re-quantizing its result
            # would add error; trilora's picks its own 4-bit weight (a 16-bit head has no
            # quantization error to correct and gets the standard initialization).
            plain = copy.copy(config)
            plain.init_lora_weights = True
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=plain, **kwargs)
            if not self._keeps_16bit_base:
                self._loftq_init(adapter_name, config)
            return
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> None:
        check_lora_config(config)
        return None

    # --- merging ----------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """fp32 ``[out, in]`` ``scaling * lora_B @ lora_A`` of ``adapter``."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "merging a LoRA adapter into a 4-bit trilora layer would re-quantize the base weight and "
            "lose accuracy; call trilora.merge(peft_model) for a 16-bit merged model, or "
            "trilora.merge(peft_model, requantize=True) for a re-quantized 4-bit one"
        )

    def unmerge(self) -> None:
        if self.merged:  # pragma: no cover - merge() never succeeds
            raise RuntimeError("trilora LoRA layers are never merged in place")

    # --- forward ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x`` ``[..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is not None:
            _peft_hook(self, "_check_forward_args", _MIXED_BATCH)(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        base = self.get_base_layer()
        if self.disable_adapters:
            return base(x, *args, **kwargs)
        if adapter_names is not None:
            mixed = _peft_hook(self, "_mixed_batch_forward", _MIXED_BATCH)
            return mixed(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return base(x, *args, **kwargs)
        if not isinstance(base, QuantizedLinear):  # a 16-bit base (output head): PEFT's forward
            y = base(x, *args, **kwargs)
            rest = active
        else:
            first, rest = active[0], active[1:]
            y = base.lora_forward(
                x,
                self.lora_A[first].weight,
                self.lora_B[first].weight,
                self.scaling[first],
                _dropout_p(self.lora_dropout[first]),
                self.training,
            )
        for name in rest:
            a = self.lora_A[name]
            out = (
                self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype))))
                * self.scaling[name]
            )
            y = y + out.to(y.dtype)
        return y

    def __repr__(self) -> str:
        return "trilora." + super().__repr__()


class TriloraExpertsLora(ParamWrapper):
    """PEFT's ``ParamWrapper`` (LoRA on an MoE experts parameter, ``target_parameters``)
    computed by trilora: same modules, parameters and adapter files as vanilla PEFT.

    Vanilla PEFT parametrizes the experts tensor as ``W + scale * B @ A`` for the whole call,
    materializing a full ``[E, out, in]`` delta and the sum in 16 bits. Here the forward lends
    the factors to the experts module (:func:`trilora.moe.expert_lora`) and trilora's experts
    forward applies them group by group (:func:`trilora.ops.grouped_qlora.grouped_lora_linear`),
    over 4-bit (:class:`trilora.moe.QuantizedExperts`) or 16-bit experts. One active adapter
    per call; PEFT itself refuses dropout on experts.
    """

    @classmethod
    def adopt(cls, wrapper: ParamWrapper) -> TriloraExpertsLora:
        """Make a PEFT ``ParamWrapper`` on an experts tensor compute through trilora, in place
        (its class changes; every module and parameter stays)."""
        if not isinstance(wrapper, ParamWrapper):
            raise TypeError(f"expected a peft ParamWrapper, got {type(wrapper).__name__}")
        wrapper.__class__ = cls
        return wrapper

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise UnsupportedLoraSetting(f"LoRA on MoE experts does not support {_MIXED_BATCH}")
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise UnsupportedLoraSetting(
                f"LoRA on MoE experts runs one active adapter at a time, got {active}"
            )
        adapter = active[0]
        lora_a, lora_b = peft_expert_factors(
            self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.num_experts
        )
        scale = self.scaling[adapter]
        with expert_lora(self.get_base_layer(), self.parameter_name, lora_a, lora_b, scale):
            return self.base_layer(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if isinstance(self.get_param(), QuantizedExperts):
            raise UnsupportedLoraSetting(
                f"merging a LoRA into 4-bit experts ({self.parameter_name}) would re-quantize "
                "them; save the adapter and merge it into the 16-bit model instead"
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


@contextlib.contextmanager
def experts_as_parameters(model: nn.Module):
    """Within the block, every :class:`trilora.moe.QuantizedExperts` of ``model`` stands as a
    3-D parameter of its shape and dtype (a zero-stride view, no memory), so PEFT's
    ``target_parameters`` injection (``peft.get_peft_model``, ``PeftModel.from_pretrained``,
    ``load_adapter``) finds the experts as it does on a 16-bit model. The quantized experts
    are put back at the end, under any LoRA wrapper PEFT added meanwhile; then call
    :func:`patch`."""
    swapped = []
    for module in list(model.modules()):
        if isinstance(module, ParamWrapper):
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedExperts):
                stand_in = torch.empty((), dtype=child.dtype, device=child.device)
                delattr(module, name)
                module.register_parameter(
                    name, nn.Parameter(stand_in.expand(child.shape), requires_grad=False)
                )
                swapped.append((module, name, child))
    try:
        yield
    finally:
        for module, name, child in swapped:
            delattr(module, name)
            setattr(module, name, child)


def load_adapter(model: nn.Module, adapter: str | Path, **kwargs: Any) -> PeftModel:
    """``peft.PeftModel.from_pretrained(model, adapter, **kwargs)`` on a trilora model, with
    the LoRA on quantized MoE experts found as on the 16-bit model
    (:func:`experts_as_parameters`). Returns the PEFT model, not yet patched."""
    with experts_as_parameters(model):
        return PeftModel.from_pretrained(model, str(adapter), **kwargs)


def _is_experts_wrapper(module: nn.Module) -> bool:
    return isinstance(module, ParamWrapper) and is_experts_module(module.get_base_layer())


def _dropout_p(module: nn.Module) -> float:
    if isinstance(module, nn.Dropout):
        return float(module.p)
    if isinstance(module, nn.Identity):
        return 0.0
    raise UnsupportedLoraSetting(
        f"trilora supports nn.Dropout on the LoRA input, got {type(module).__name__}"
    )


# ---------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------


def _lora_configs(peft_model: PeftModel) -> dict[str, LoraConfig]:
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise TypeError(
            f"expected a peft.PeftModel with LoRA adapters, got {type(peft_model).__name__}"
        )
    return configs


def patch(
    peft_model: PeftModel,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    fused_cross_entropy: bool = True,
    fused_rms_norm: bool = True,
) -> PeftModel:
    """Swap trilora in as the compute backend of a PEFT LoRA model, in place.

    Every LoRA layer becomes a :class:`TriloraLoraLayer` with the same adapter modules, so
    ``named_parameters()``, ``state_dict()`` keys and saved adapters are unchanged.
    bitsandbytes ``Linear4bit`` and ``Linear8bitLt`` layers (targeted or not) are rewrapped
    without touching their bytes and compute as they did (in the ``Linear4bit``'s
    ``compute_dtype``; ``Linear8bitLt`` in its input's dtype); targeted plain ``nn.Linear`` base layers are quantized with the given
    options (``compute_dtype`` also applies to them only), except the output head and
    weights tied to the embeddings, which stay 16-bit as with bitsandbytes. Idempotent: call it again after
    ``load_adapter`` adds LoRA layers on modules that had none.

    With ``fused_cross_entropy`` (default) a causal LM computes its training loss straight
    from the final hidden states (:func:`trilora.patches.fused_loss.enable_fused_cross_entropy`): in
    training mode with ``labels``, full ``[tokens, vocab]`` logits never exist and the
    output's ``logits`` is None. Eval mode and calls without labels are unchanged.

    With ``fused_rms_norm`` (default) every Llama-style RMSNorm (Llama, Qwen2/3, Mistral and
    the other transformers norms with the same forward; see :mod:`trilora.patches.fused_norm`) runs
    through :func:`trilora.ops.rms_norm`: same outputs, a fraction of the activation memory.

    Returns:
        ``peft_model`` itself.

    Raises:
        UnsupportedLoraSetting: an adapter uses a setting trilora does not implement
            (DoRA, lora_bias, fan_in_fan_out, bias != "none", ...), checked before any change.
        TypeError: a LoRA layer on something other than a linear layer.
    """
    configs = _lora_configs(peft_model)
    for cfg in configs.values():
        check_lora_config(cfg)
    root = peft_model.base_model.model
    options = QuantOptions(
        quant_type, blocksize, double_quant, compute_dtype, _full_precision_bases(root)
    )
    lora_layers = []
    for name, module in root.named_modules():
        if isinstance(module, ParamWrapper):
            # LoRA on a parameter: MoE experts compute through trilora below; any other
            # parameter (a router's weight) keeps PEFT's own computation.
            continue
        if isinstance(module, LoraLayer) and not isinstance(module, TriloraLoraLayer):
            if not isinstance(module.get_base_layer(), nn.Linear):
                raise TypeError(
                    f"trilora supports LoRA on linear layers only; {name} wraps a "
                    f"{type(module.get_base_layer()).__name__}"
                )
            lora_layers.append(name)
    for name in lora_layers:
        root.set_submodule(
            name, TriloraLoraLayer.from_lora_layer(root.get_submodule(name), options)
        )
    # Frozen bitsandbytes layers that carry no LoRA: same bytes, trilora kernels.
    from peft.utils.other import ModulesToSaveWrapper

    wrapped = [n for n, m in root.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, module in list(root.named_modules()):
        inside = any(name.startswith(w + ".") for w in wrapped)
        if inside or isinstance(module, LoraLayer):
            continue
        if _is_bnb(module, "Linear4bit"):
            root.set_submodule(name, _bnb_to_trilora(module))
        elif _is_bnb(module, "Linear8bitLt"):
            root.set_submodule(name, _bnb8_to_trilora(module, options))
    _patch_experts(root, options)
    for cfg in configs.values():
        _register(cfg, options)
    patches.apply(
        peft_model,
        patches.PatchOptions(
            fused_cross_entropy=fused_cross_entropy, fused_rms_norm=fused_rms_norm
        ),
    )
    return peft_model


def _patch_experts(root: nn.Module, options: QuantOptions) -> None:
    """MoE experts under LoRA compute through trilora: their PEFT wrappers become
    :class:`TriloraExpertsLora`, targeted 16-bit experts are quantized with ``options`` (as
    targeted linears are), and the model runs trilora's experts forward."""
    experts = {}
    for module in list(root.modules()):
        if _is_experts_wrapper(module):
            TriloraExpertsLora.adopt(module)
            experts[id(module.get_base_layer())] = module.get_base_layer()
    for module in experts.values():
        if any(not isinstance(t, QuantizedExperts) for _, t in experts_tensors(module)):
            quantize_experts(module, options.config)
    if experts or any(is_experts_module(m) for m in root.modules()):
        use_trilora_experts(root)


def target_experts(model: nn.Module, lora_config: LoraConfig) -> None:
    """``target_modules="all-linear"`` also targets every MoE experts tensor (through
    ``target_parameters``), for the models PEFT's own MoE mapping does not cover (gpt-oss)."""
    target = lora_config.target_modules
    if not (isinstance(target, str) and target.lower() == "all-linear"):
        return
    names = set(lora_config.target_parameters or [])
    for mname, module in model.named_modules():
        if is_experts_module(module):
            leaf = mname.rpartition(".")[2]
            names |= {f"{leaf}.{pname}" for pname, _ in experts_tensors(module)}
    if names:
        lora_config.target_parameters = sorted(names)


def get_peft_model(
    model: nn.Module,
    lora_config: LoraConfig,
    adapter_name: str = "default",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    fused_cross_entropy: bool = True,
    **kwargs,
) -> PeftModel:
    """``peft.get_peft_model`` with trilora LoRA layers.

    ``model``'s targeted linear layers may be trilora or bitsandbytes ``Linear4bit`` or plain
    ``nn.Linear`` (quantized with the given options, except the output head and tied weights,
    which keep a 16-bit base as with bitsandbytes). ``init_lora_weights`` "pissa",
    "pissa_niter_K", "olora", "corda" and "loftq" need full-precision targeted layers (see
    the module docstring). ``lora_config`` is registered with
    :class:`TriloraLoraLayer` through ``LoraConfig._register_custom_module``; ``kwargs`` go
    to ``peft.get_peft_model``; ``fused_cross_entropy`` is as in :func:`patch`.

    Raises:
        UnsupportedLoraSetting: ``lora_config`` uses a setting trilora does not implement.
    """
    check_lora_config(lora_config)
    target_experts(model, lora_config)
    _register(
        lora_config,
        QuantOptions(
            quant_type, blocksize, double_quant, compute_dtype, _full_precision_bases(model)
        ),
    )
    with experts_as_parameters(model):
        peft_model = _peft_get_peft_model(model, lora_config, adapter_name=adapter_name, **kwargs)
    return patch(
        peft_model, quant_type, blocksize, double_quant, compute_dtype, fused_cross_entropy
    )


def lora_scale(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
