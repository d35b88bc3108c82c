"""nn modules over trilora's ops: frozen quantized linears and the QLoRA linear.

:class:`QuantizedLinear` is format-generic (the format object of :mod:`trilora.formats`
says what it stores); :class:`Linear4bit` (bitsandbytes NF4/FP4) and :class:`Linear8bit`
(bitsandbytes LLM.int8 weights) are its two formats. All are ``nn.Linear`` subclasses, so
code that looks for linear layers (PEFT's ``target_modules="all-linear"``, transformers'
tied-weight logic, optimizers' parameter groups) treats them as such. The codes are a
frozen ``nn.Parameter`` named ``weight`` (4-bit: storage dtype selectable, e.g. bf16 so
FSDP shards the bytes untouched); the rest of the quantization state lives in buffers, so
it follows ``.to()`` and ``state_dict()``; ``state_dict()`` uses bitsandbytes' key names,
so a trilora model saves checkpoints that transformers + bitsandbytes load as they are.

Modules never launch kernels; they call :mod:`trilora.ops` through their format.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trilora.formats import QuantConfig, QuantizedTensor, format_of, get_format
from trilora.formats.int8 import Int8Weight
from trilora.quant import QuantizedWeight, quantize
from trilora.quant import pack_storage as pack_storage


def restore_quantized_dtypes(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """After ``nn.Module._apply`` (``.to()``, ``.half()``): give back to each quantized tensor
    of ``module`` named in ``before`` (name -> tensor before the call) its own dtype, on the
    device the call moved it to. A dtype cast would reinterpret packed bytes and round the
    scales; the frozen codes stay the ``weight`` parameter."""
    for name, old in before.items():
        after = getattr(module, name)
        after = after.data if isinstance(after, nn.Parameter) else after
        if after.dtype != old.dtype:
            restored = old.to(device=after.device)
            if name == "weight":
                module.weight = nn.Parameter(restored, requires_grad=False)
            else:
                setattr(module, name, restored)


class QuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight is stored in a quantized format.

    Format-generic: the layer's format (:mod:`trilora.formats`) says what it holds: its
    codes as the frozen ``nn.Parameter`` ``weight`` (FSDP shards it along dim 0), the rest
    of its state as buffers (replicated), and the state-dict keys (bitsandbytes'). Computes
    ``y = x @ dequantize(W).T + bias`` through the format's fused op, in ``compute_dtype``
    (``x.dtype`` when None), and returns ``x.dtype``. Code above asks
    ``isinstance(m, QuantizedLinear)`` and ``m.format``, never for a format's class.

    Build one with :meth:`from_quantized` / :meth:`from_linear_config` (both pick the layer
    class of the weight's format), :meth:`shell`, or a subclass's constructor (zero-filled
    state of the right shapes, for loading or the meta device).
    """

    def _init_shell(self, in_features, out_features, bias, config, weight_dtype, device) -> None:
        # nn.Linear.__init__ would allocate a full-precision weight; skip straight to Module.
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = config.compute_dtype
        fmt = get_format(config)
        self.set_quantized_weight(
            fmt.empty((out_features, in_features), config, weight_dtype, device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # --- construction -------------------------------------------------------------------

    @property
    def format(self):
        """This layer's :class:`~trilora.formats.base.WeightFormat`."""
        return get_format(self.format_name)

    def set_quantized_weight(self, qw: QuantizedTensor) -> None:
        """Replace the layer's weight and its state with ``qw`` (shape ``[out, in]``, this
        layer's format), without copying; the bias and any LoRA factors are kept."""
        if tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight has shape {tuple(qw.shape)}, layer expects "
                f"({self.out_features}, {self.in_features})"
            )
        fmt = format_of(qw)
        old = getattr(self, "format_name", None)
        if old is not None and old != fmt.name:
            raise ValueError(f"a {old} layer cannot hold a {fmt.name} weight")
        storage, buffers, attributes = fmt.layer_tensors(qw)
        self.format_name = fmt.name
        self.weight_dtype = qw.dtype
        self._format_attributes = dict(attributes)
        for key, value in attributes.items():
            setattr(self, key, value)
        self.weight = nn.Parameter(storage, requires_grad=False)
        for name, t in buffers.items():
            self.register_buffer(name, t)

    @classmethod
    def from_quantized(
        cls,
        qweight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = torch.bfloat16,
    ) -> QuantizedLinear:
        """Wrap ``qweight`` (shape ``[out, in]``) without copying it. Called on
        :class:`QuantizedLinear` itself, the layer class of ``qweight``'s format is used."""
        if len(qweight.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D, got shape {tuple(qweight.shape)}")
        if cls is QuantizedLinear:
            cls = LAYER_CLASSES[format_of(qweight).name]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = qweight.shape
        layer.compute_dtype = compute_dtype
        layer.set_quantized_weight(qweight)
        if bias is None:
            layer.register_parameter("bias", None)
        else:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_linear_config(cls, linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
        """Quantize a float ``nn.Linear`` with ``config`` (any format)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        qw = get_format(config).quantize(linear.weight.detach(), config)
        return QuantizedLinear.from_quantized(qw, linear.bias, config.compute_dtype)

    @staticmethod
    def shell(
        in_features: int,
        out_features: int,
        bias: bool,
        config: QuantConfig,
        weight_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> QuantizedLinear:
        """A zero-filled layer of ``config``'s format (for loading or the meta device)."""
        layer_cls = LAYER_CLASSES[config.format_name]
        layer = layer_cls.__new__(layer_cls)
        layer._init_shell(in_features, out_features, bias, config, weight_dtype, device)
        return layer

    # --- state --------------------------------------------------------------------------

    @property
    def quant_config(self) -> QuantConfig:
        """The :class:`~trilora.formats.QuantConfig` this layer's weight has."""
        return self.format.config_of(self.quantized_weight(), self.compute_dtype)

    def quantized_weight(self) -> QuantizedTensor:
        """The layer's weight as its format's weight object (a view, no copy)."""
        return self.format.from_layer_tensors(
            self.weight.data,
            self._buffers,
            self._format_attributes,
            torch.Size([self.out_features, self.in_features]),
            self.weight_dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[out, in]`` float weight (default: the dtype it was quantized from)."""
        return self.quantized_weight().dequantize(dtype)

    def _state_buffer_names(self) -> list[str]:
        return list(self.format.layer_tensors(self.quantized_weight())[1])

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() must move the quantized state between devices but never
        # cast it: a dtype cast would reinterpret packed bytes and round the scales.
        frozen = {name: t for name, t in self._quantized_tensors() if t is not None}
        super()._apply(fn, recurse)
        restore_quantized_dtypes(self, frozen)
        return self

    def _quantized_tensors(self):
        yield "weight", self.weight.data
        for name in self._state_buffer_names():
            yield name, getattr(self, name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, param in self._parameters.items():
            if param is not None and name != "weight":
                destination[prefix + name] = param if keep_vars else param.detach()
        qsd = self.quantized_weight().to_state_dict(prefix + "weight")
        for key, value in qsd.items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        wprefix = prefix + "weight"
        # The weight's checkpoint keys: "weight", "weight.*" (4-bit) and the 8-bit extras
        # bitsandbytes stores beside it ("SCB", "weight_format").
        extras = {prefix + "SCB", prefix + "weight_format"}
        own = {
            k: v
            for k, v in state_dict.items()
            if k == wprefix or k.startswith(wprefix + ".") or k in extras
        }
        # Everything but the quantized weight (bias, LoRA factors) loads the standard way;
        # the weight and its state are hidden from nn.Module meanwhile, because their
        # checkpoint form (bitsandbytes keys, flat packed shape) differs from the buffers.
        names = self._state_buffer_names()
        hidden_param = self._parameters.pop("weight")
        hidden_buffers = {name: self._buffers.pop(name) for name in names}
        rest = {k: v for k, v in state_dict.items() if k not in own}
        try:
            super()._load_from_state_dict(
                rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._parameters["weight"] = hidden_param
            self._buffers.update(hidden_buffers)
        if not own:
            if strict:
                missing_keys.append(wprefix)
            return
        try:
            qw = self.format.from_state_dict(own, wprefix)
            if tuple(qw.shape) != (self.out_features, self.in_features):
                raise ValueError(
                    f"checkpoint weight has shape {tuple(qw.shape)}, layer is "
                    f"({self.out_features}, {self.in_features})"
                )
        except (KeyError, ValueError) as exc:
            error_msgs.append(f"while loading {wprefix}: {exc}")
            return
        self.set_quantized_weight(qw.to(self.weight.device).with_storage(self.weight.dtype))

    # --- compute ------------------------------------------------------------------------

    def lora_forward(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor | None = None,
        lora_b: torch.Tensor | None = None,
        scale: float = 1.0,
        dropout_p: float = 0.0,
        training: bool | None = None,
    ) -> torch.Tensor:
        """This layer plus one LoRA adapter, in one fused op.

        ``x`` ``[..., in]`` runs in ``compute_dtype`` (``x.dtype`` when None) and the result
        comes back as ``x.dtype``; ``lora_a`` ``[r, in]``, ``lora_b`` ``[out, r]``. Dropout
        with probability ``dropout_p`` applies to the LoRA branch when ``training`` (default:
        this module's mode).
        """
        cdt = x.dtype if self.compute_dtype is None else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(cdt)
        y = self.format.linear(
            x.to(cdt),
            self.quantized_weight(),
            lora_a,
            lora_b,
            scale,
            bias,
            dropout_p,
            self.training if training is None else training,
        )
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_forward(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format_name}, "
            f"compute_dtype={self.compute_dtype}"
        )


class Linear4bit(QuantizedLinear):
    """A frozen linear layer whose weight is stored in bitsandbytes' 4-bit format.

    Computes ``y = x @ dequantize(W).T + bias`` through :func:`trilora.ops.qlora_linear`,
    in ``compute_dtype`` (or ``x.dtype`` when None), and returns ``x.dtype``.

    Build one with :meth:`from_linear` (quantizes a float layer), :meth:`from_quantized`
    (wraps an existing :class:`~trilora.quant.QuantizedWeight`) or the constructor, which
    allocates zero-filled state of the right shapes (for loading a checkpoint into it, or for
    the meta device / FakeTensorMode).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        weight_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        if quant_type == "int8":
            raise ValueError("Linear4bit holds nf4/fp4 weights; use Linear8bit for int8")
        config = QuantConfig(quant_type, blocksize, double_quant, compute_dtype, quant_storage)
        self._init_shell(in_features, out_features, bias, config, weight_dtype, device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        compute_dtype: torch.dtype | None = torch.bfloat16,
    ) -> Linear4bit:
        """Quantize a float ``nn.Linear`` (on its device; CUDA uses the Triton quantizer)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        qw = quantize(linear.weight.detach(), quant_type, blocksize, double_quant, quant_storage)
        return cls.from_quantized(qw, linear.bias, compute_dtype)

    def quantized_weight(self) -> QuantizedWeight:
        """The layer's 4-bit weight as a :class:`~trilora.quant.QuantizedWeight` view."""
        return super().quantized_weight()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
            f"double_quant={self.weight_nested_absmax is not None}, compute_dtype={self.compute_dtype}"
        )


class Linear8bit(QuantizedLinear):
    """A frozen linear layer in bitsandbytes' 8-bit (LLM.int8) format: int8 codes
    ``[out, in]`` (the ``weight`` parameter) and fp32 row absmax (buffer ``weight_scb``,
    checkpoint key ``SCB``); its state dict is what ``bitsandbytes.nn.Linear8bitLt``
    writes. Compute is weight-only (activations are not quantized)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        weight_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        config = QuantConfig("int8", compute_dtype=compute_dtype)
        self._init_shell(in_features, out_features, bias, config, weight_dtype, device)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, compute_dtype: torch.dtype | None = torch.bfloat16
    ) -> Linear8bit:
        """Quantize a float ``nn.Linear`` to int8 (the codes and SCB bitsandbytes gives)."""
        return cls.from_linear_config(linear, QuantConfig("int8", compute_dtype=compute_dtype))

    def quantized_weight(self) -> Int8Weight:
        """The layer's weight as an :class:`~trilora.formats.int8.Int8Weight` view."""
        return super().quantized_weight()


LAYER_CLASSES: dict[str, type[QuantizedLinear]] = {"4bit": Linear4bit, "int8": Linear8bit}
"""Format name -> its layer class (a new format adds its class here)."""


class _LoraAdapter:
    """The LoRA half of a quantized layer with an adapter (mixed into a format's layer class).

    ``y = x @ W.T + bias + s * lora_B(lora_A(dropout(x)))`` with ``lora_A`` ``[r, in]``,
    ``lora_B`` ``[out, r]`` (zero-initialized, so a new adapter starts as the identity
    change), and ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA. All of it
    runs in one fused op of the layer's format; only the LoRA factors (and the bias, if
    unfrozen) get gradients.
    """

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, lora_dtype, device) -> None:
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(
            torch.empty(r, self.in_features, dtype=lora_dtype, device=device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, r, dtype=lora_dtype, device=device)
        )
        if device is None or torch.device(device).type != "meta":
            # PEFT's default: kaiming-uniform A (a = sqrt(5)) and zero B.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_base(
        cls,
        base: QuantizedLinear,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ):
        """Attach a fresh LoRA adapter to an existing quantized layer of this class's
        format (sharing its state)."""
        layer = cls.from_quantized(base.quantized_weight(), None, base.compute_dtype)
        if base.bias is not None:
            layer.bias = base.bias
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, base.weight.device)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_forward(x, self.lora_A, self.lora_B, self.scaling, self.lora_dropout)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}"
        )


class QLoraLinear(_LoraAdapter, Linear4bit):
    """A 4-bit frozen linear with a trainable LoRA adapter on top (see :class:`_LoraAdapter`
    for the computation; :class:`Int8LoraLinear` is the same over int8 weights)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> None:
        Linear4bit.__init__(self, in_features, out_features, bias=bias, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, self.weight.device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        lora_dtype: torch.dtype = torch.float32,
    ) -> QLoraLinear:
        """Quantize a float ``nn.Linear`` and attach a fresh LoRA adapter to it."""
        base = Linear4bit.from_linear(
            linear, quant_type, blocksize, double_quant, quant_storage, compute_dtype
        )
        return cls.from_base(base, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)


class Int8LoraLinear(_LoraAdapter, Linear8bit):
    """An int8 (bitsandbytes LLM.int8 bytes) frozen linear with a trainable LoRA adapter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> None:
        Linear8bit.__init__(self, in_features, out_features, bias=bias, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, self.weight.device)


LORA_LAYER_CLASSES: dict[str, type[QuantizedLinear]] = {
    "4bit": QLoraLinear,
    "int8": Int8LoraLinear,
}
"""Format name -> its layer class with a LoRA adapter."""


def lora_shell(
    in_features: int,
    out_features: int,
    bias: bool,
    config: QuantConfig,
    r: int,
    lora_alpha: float,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    lora_dtype: torch.dtype = torch.float32,
) -> QuantizedLinear:
    """A zero-filled quantized layer of ``config``'s format with a fresh LoRA adapter
    (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` in ``lora_dtype``), e.g. on meta."""
    base = QuantizedLinear.shell(in_features, out_features, bias, config, weight_dtype, device)
    return LORA_LAYER_CLASSES[config.format_name].from_base(
        base, r, lora_alpha, lora_dtype=lora_dtype
    )
