"""trilora as the backend of PEFT LoRA models.

:class:`TriloraLoraLayer` is a PEFT ``LoraLayer`` over a :class:`trilora.nn.Linear4bit`
base: its forward runs the base matmul and the active adapter's LoRA term in one
:func:`trilora.ops.qlora_linear` call. It is plugged in through PEFT's extension point
``LoraConfig._register_custom_module`` (consulted before PEFT's own dispatchers), never by
monkeypatching PEFT, and nothing global changes at import time.

* :func:`get_peft_model` registers the layer on the config and calls ``peft.get_peft_model``.
* :func:`patch` converts an existing ``PeftModel`` in place: every LoRA layer over a
  bitsandbytes ``Linear4bit`` (same bytes, no re-quantization), a plain ``nn.Linear``
  (quantized now) or a trilora ``Linear4bit`` becomes a :class:`TriloraLoraLayer` that keeps
  the very same ``lora_A``/``lora_B`` modules, so module and parameter names (and adapter
  files) are unchanged.

Module names stay PEFT's: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trilora.nn import Linear4bit, QLoraLinear
from trilora.quant import BLOCKSIZES, QUANT_TYPES

try:  # PEFT is a dependency, but keep `import trilora.peft` failing with a clear message.
    from peft import LoraConfig, PeftModel
    from peft import get_peft_model as _peft_get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
    from peft.utils import PeftType
except ImportError as exc:  # pragma: no cover
    raise ImportError("trilora.peft needs the `peft` package (pip install peft)") from exc

__all__ = [
    "QuantOptions",
    "TriloraLoraLayer",
    "UnsupportedLoraSetting",
    "check_lora_config",
    "get_peft_model",
    "patch",
]


class UnsupportedLoraSetting(ValueError):
    """A LoRA setting trilora does not implement; raised instead of computing something else."""


@dataclass(frozen=True)
class QuantOptions:
    """How plain ``nn.Linear`` base layers are quantized when a LoRA layer is put on them."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = torch.bfloat16

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")


_SUPPORTED = "r, lora_alpha, lora_dropout, use_rslora, target_modules, modules_to_save, bias='none'"
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
    "target_parameters": (lambda v: bool(v), "LoRA on nn.Parameters (ParamWrapper)"),
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


def _register(config: LoraConfig, options: QuantOptions) -> None:
    config._register_custom_module({nn.Linear: TriloraLoraLayer})
    # Not a dataclass field, so it never reaches adapter_config.json.
    config._trilora_quant_options = options


# ---------------------------------------------------------------------------------------
# base layers
# ---------------------------------------------------------------------------------------


def _is_bnb(module: nn.Module, name: str) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == name


def _bnb_to_trilora(layer: nn.Module) -> Linear4bit:
    """A trilora ``Linear4bit`` over the exact bytes of a bitsandbytes ``Linear4bit``."""
    from trilora.quant import QuantizedWeight

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


def to_trilora_base(layer: nn.Module, options: QuantOptions) -> Linear4bit:
    """The trilora 4-bit layer for a LoRA base layer.

    trilora ``Linear4bit``: itself. bitsandbytes ``Linear4bit``: its bytes, untouched.
    Plain ``nn.Linear``: quantized with ``options``. Anything else raises ``TypeError``.
    """
    if isinstance(layer, QLoraLinear):
        raise TypeError(
            "a trilora QLoraLinear already carries its own LoRA adapter; use Linear4bit as the base"
        )
    if isinstance(layer, Linear4bit):
        return layer
    if _is_bnb(layer, "Linear4bit") or _is_bnb(layer, "LinearNF4") or _is_bnb(layer, "LinearFP4"):
        return _bnb_to_trilora(layer)
    if type(layer) is nn.Linear:
        new = Linear4bit.from_linear(
            layer, options.quant_type, options.blocksize, options.double_quant,
            compute_dtype=options.compute_dtype,
        )  # fmt: skip
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        return new
    raise TypeError(
        f"trilora puts LoRA on bitsandbytes Linear4bit, trilora Linear4bit or plain nn.Linear base "
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
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 r: int = 0, lora_alpha: int = 1, **kwargs) -> None:  # fmt: skip
        check_lora_config(config)
        options = getattr(config, "_trilora_quant_options", None) or QuantOptions()
        super().__init__()
        LoraLayer.__init__(self, to_trilora_base(base_layer, options))
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

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
        LoraLayer.__init__(new, to_trilora_base(old.get_base_layer(), options))
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
        new._active_adapter = old._active_adapter
        new._disable_adapters = old._disable_adapters
        new.merged_adapters = []
        new.train(old.training)
        return new

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs
    ) -> None:
        # Also reached by add_adapter/load_adapter on an existing layer: check every config.
        check_lora_config(config)
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
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        base = self.get_base_layer()
        if self.disable_adapters:
            return base(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return base(x, *args, **kwargs)
        first, rest = active[0], active[1:]
        y = base.lora_forward(
            x, self.lora_A[first].weight, self.lora_B[first].weight, self.scaling[first],
            _dropout_p(self.lora_dropout[first]), self.training,
        )  # fmt: skip
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


def patch(peft_model: PeftModel, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
          compute_dtype: torch.dtype | None = torch.bfloat16,
          fused_cross_entropy: bool = True, fused_rms_norm: bool = True) -> PeftModel:  # fmt: skip
    """Swap trilora in as the compute backend of a PEFT LoRA model, in place.

    Every LoRA layer becomes a :class:`TriloraLoraLayer` with the same adapter modules, so
    ``named_parameters()``, ``state_dict()`` keys and saved adapters are unchanged.
    bitsandbytes ``Linear4bit`` layers (targeted or not) are rewrapped without touching
    their bytes; targeted plain ``nn.Linear`` base layers are quantized with the given
    options (``compute_dtype`` also applies to them only). Idempotent: call it again after
    ``load_adapter`` adds LoRA layers on modules that had none.

    With ``fused_cross_entropy`` (default) a causal LM computes its training loss straight
    from the final hidden states (:func:`trilora.fused_loss.enable_fused_cross_entropy`): in
    training mode with ``labels``, full ``[tokens, vocab]`` logits never exist and the
    output's ``logits`` is None. Eval mode and calls without labels are unchanged.

    With ``fused_rms_norm`` (default) every Llama-style RMSNorm (Llama, Qwen2/3, Mistral and
    the other transformers norms with the same forward; see :mod:`trilora.fused_norm`) runs
    through :func:`trilora.ops.rms_norm`: same outputs, a fraction of the activation memory.

    Returns:
        ``peft_model`` itself.

    Raises:
        UnsupportedLoraSetting: an adapter uses a setting trilora does not implement
            (DoRA, lora_bias, fan_in_fan_out, bias != "none", ...), checked before any change.
        TypeError: a LoRA layer on something other than a linear layer.
    """
    options = QuantOptions(quant_type, blocksize, double_quant, compute_dtype)
    configs = _lora_configs(peft_model)
    for cfg in configs.values():
        check_lora_config(cfg)
    root = peft_model.base_model.model
    lora_layers = []
    for name, module in root.named_modules():
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
        if _is_bnb(module, "Linear4bit") and not inside and not isinstance(module, LoraLayer):
            root.set_submodule(name, _bnb_to_trilora(module))
    for cfg in configs.values():
        _register(cfg, options)
    if fused_cross_entropy and callable(getattr(root, "get_output_embeddings", None)):
        from trilora.fused_loss import enable_fused_cross_entropy

        enable_fused_cross_entropy(peft_model)
    if fused_rms_norm:
        from trilora.fused_norm import enable_fused_rms_norm

        enable_fused_rms_norm(root)
    return peft_model


def get_peft_model(model: nn.Module, lora_config: LoraConfig, adapter_name: str = "default",
                   quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = torch.bfloat16, fused_cross_entropy: bool = True,
                   **kwargs) -> PeftModel:  # fmt: skip
    """``peft.get_peft_model`` with trilora LoRA layers.

    ``model``'s targeted linear layers may be trilora or bitsandbytes ``Linear4bit`` or plain
    ``nn.Linear`` (quantized with the given options). ``lora_config`` is registered with
    :class:`TriloraLoraLayer` through ``LoraConfig._register_custom_module``; ``kwargs`` go
    to ``peft.get_peft_model``; ``fused_cross_entropy`` is as in :func:`patch`.

    Raises:
        UnsupportedLoraSetting: ``lora_config`` uses a setting trilora does not implement.
    """
    check_lora_config(lora_config)
    _register(lora_config, QuantOptions(quant_type, blocksize, double_quant, compute_dtype))
    peft_model = _peft_get_peft_model(model, lora_config, adapter_name=adapter_name, **kwargs)
    return patch(
        peft_model, quant_type, blocksize, double_quant, compute_dtype, fused_cross_entropy
    )


def lora_scale(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
