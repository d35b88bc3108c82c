"""nn modules over trilora's ops: a frozen 4-bit linear and the QLoRA linear.

Both are ``nn.Linear`` subclasses, so code that looks for linear layers (PEFT's
``target_modules="all-linear"``, transformers' tied-weight logic, optimizers' parameter
groups) treats them as such. The packed 4-bit bytes are a frozen ``nn.Parameter`` named
``weight`` whose storage dtype is selectable: with ``quant_storage=torch.bfloat16`` it
matches an FSDP mixed-precision param dtype, so sharding along dim 0 and the all-gather
move the bytes untouched. The quantization state lives in buffers, so it follows ``.to()``
and ``state_dict()``; ``state_dict()`` uses the transformers/bitsandbytes key names
(``weight.absmax``, ``weight.quant_map``, ...), so a trilora model saves checkpoints that
transformers + bitsandbytes load as they are.

Modules never launch kernels; they call :mod:`trilora.ops`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trilora.ops.qlora_linear import qlora_linear
from trilora.quant import QuantizedWeight, code_table, quantize
from trilora.quant import pack_storage as pack_storage

# buffer name -> QuantizedWeight field; bitsandbytes' checkpoint key is "weight." + suffix
_STATE_BUFFERS = {
    "weight_absmax": ("absmax", "absmax"),
    "weight_quant_map": ("code", "quant_map"),
    "weight_nested_absmax": ("nested_absmax", "nested_absmax"),
    "weight_nested_quant_map": ("nested_code", "nested_quant_map"),
    "weight_offset": ("offset", None),
}


class Linear4bit(nn.Linear):
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
        # nn.Linear.__init__ would allocate a full-precision weight; skip straight to Module.
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        nblocks = -(-n // blocksize)
        qw = QuantizedWeight(
            packed=pack_storage(
                torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device), quant_storage
            ),
            absmax=torch.zeros(
                nblocks, dtype=torch.uint8 if double_quant else torch.float32, device=device
            ),
            code=code_table(quant_type, device),
            quant_type=quant_type,
            blocksize=blocksize,
            shape=torch.Size([out_features, in_features]),
            dtype=weight_dtype,
            nested_absmax=torch.zeros(-(-nblocks // 256), device=device) if double_quant else None,
            nested_code=torch.zeros(256, device=device) if double_quant else None,
            offset=torch.zeros((), device=device) if double_quant else None,
        )
        self.set_quantized_weight(qw)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # --- construction -------------------------------------------------------------------

    def set_quantized_weight(self, qw: QuantizedWeight) -> None:
        """Replace the layer's 4-bit weight and its state with ``qw`` (shape ``[out, in]``),
        without copying; the bias and any LoRA factors are kept."""
        if tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight has shape {tuple(qw.shape)}, layer expects "
                f"({self.out_features}, {self.in_features})"
            )
        self.quant_type = qw.quant_type
        self.blocksize = qw.blocksize
        self.weight_dtype = qw.dtype
        self.weight = nn.Parameter(qw.packed, requires_grad=False)
        for name, (field, _) in _STATE_BUFFERS.items():
            self.register_buffer(name, getattr(qw, field))

    @classmethod
    def from_quantized(
        cls,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = torch.bfloat16,
    ) -> Linear4bit:
        """Wrap ``qweight`` (shape ``[out, in]``) without copying it."""
        if len(qweight.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D, got shape {tuple(qweight.shape)}")
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

    # --- state --------------------------------------------------------------------------

    def quantized_weight(self) -> QuantizedWeight:
        """The layer's 4-bit weight as a :class:`~trilora.quant.QuantizedWeight` view."""
        return QuantizedWeight(
            packed=self.weight.data,
            absmax=self.weight_absmax,
            code=self.weight_quant_map,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            shape=torch.Size([self.out_features, self.in_features]),
            dtype=self.weight_dtype,
            nested_absmax=self.weight_nested_absmax,
            nested_code=self.weight_nested_quant_map,
            offset=self.weight_offset,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[out, in]`` float weight (default: the dtype it was quantized from)."""
        return self.quantized_weight().dequantize(dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() must move the quantized state between devices but never
        # cast it: a dtype cast would reinterpret packed bytes and round the scales.
        frozen = {name: t for name, t in self._quantized_tensors() if t is not None}
        super()._apply(fn, recurse)
        for name, before in frozen.items():
            after = getattr(self, name)
            after = after.data if isinstance(after, nn.Parameter) else after
            if after.dtype != before.dtype:
                restored = before.to(device=after.device)
                if name == "weight":
                    self.weight = nn.Parameter(restored, requires_grad=False)
                else:
                    setattr(self, name, restored)
        return self

    def _quantized_tensors(self):
        yield "weight", self.weight.data
        for name in _STATE_BUFFERS:
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
        own = {k: v for k, v in state_dict.items() if k == wprefix or k.startswith(wprefix + ".")}
        # Everything but the quantized weight (bias, LoRA factors) loads the standard way;
        # the packed weight and its state are hidden from nn.Module meanwhile, because their
        # checkpoint form (bitsandbytes keys, flat packed shape) differs from the buffers.
        hidden_param = self._parameters.pop("weight")
        hidden_buffers = {name: self._buffers.pop(name) for name in _STATE_BUFFERS}
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
            qw = QuantizedWeight.from_state_dict(own, wprefix)
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
        y = qlora_linear(
            x.to(cdt),
            self.quantized_weight(),
            lora_a,
            lora_b,
            scale,
            bias,
            dropout_p=dropout_p,
            training=self.training if training is None else training,
        )
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_forward(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
            f"double_quant={self.weight_nested_absmax is not None}, compute_dtype={self.compute_dtype}"
        )


class QLoraLinear(Linear4bit):
    """A 4-bit frozen linear with a trainable LoRA adapter on top.

    ``y = x @ W.T + bias + s * lora_B(lora_A(dropout(x)))`` with ``lora_A`` ``[r, in]``,
    ``lora_B`` ``[out, r]`` (zero-initialized, so a new adapter starts as the identity
    change), and ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA. All of it
    runs in one fused op; only the LoRA factors (and the bias, if unfrozen) get gradients.
    """

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
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, self.weight.device)

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

    @classmethod
    def from_base(
        cls,
        base: Linear4bit,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ) -> QLoraLinear:
        """Attach a fresh LoRA adapter to an existing :class:`Linear4bit` (sharing its state)."""
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
