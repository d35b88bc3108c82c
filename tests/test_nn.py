"""QLoraLinear / Linear4bit: state handling, and parity with PEFT's LoRA over bitsandbytes.

bitsandbytes' bytes and state are the baseline; its CPU dequantization is not (wrong for some
shapes on AVX-512 machines, docs/bitsandbytes-cpu.md), so outputs are compared with the
float64 computation over the dequantized bytes (``reference_format``).
"""

from __future__ import annotations

import math

import pytest
import reference_format as ref
import torch
from helpers_models import exact_4bit_reference
from torch import nn

import trilora
from trilora.nn import Linear4bit, QLoraLinear
from trilora.ops import qlora_linear

BF16_TOL = 2e-2  # relative to the output's max magnitude: both stacks round W and x to bf16


def _layer(k=136, n=72, r=8, bias=True, **kw) -> QLoraLinear:
    linear = nn.Linear(k, n, bias=bias)
    layer = QLoraLinear.from_linear(linear, r=r, lora_alpha=16, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1 / math.sqrt(r))  # non-zero, so the LoRA path counts
    return layer


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


# --- parity with the real baseline ----------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_peft_lora_over_bitsandbytes(seed, dropout, use_rslora, bias):
    # PEFT's LoRA layer over bitsandbytes' Linear4bit holding our bytes, computed exactly
    # (float64 over the dequantized bytes): trilora's bf16 op must match it within bf16
    # rounding. bitsandbytes' own CPU forward is not the reference (see the module docstring).
    from trilora.bench.baselines import peft_lora_over_bnb

    pytest.importorskip("bitsandbytes")
    layer = _layer(
        bias=bias, lora_dropout=dropout, use_rslora=use_rslora, compute_dtype=torch.bfloat16
    )
    peft_model, _ = peft_lora_over_bnb(layer)
    peft_model = exact_4bit_reference(peft_model)
    lora = peft_model.base_model.model.proj
    assert type(lora.base_layer) is nn.Linear
    peft_model.train()
    x = torch.randn(3, 11, layer.in_features, dtype=torch.bfloat16)
    mask = torch.rand(x.shape) >= dropout

    class SameMask(nn.Module):
        """PEFT's dropout slot, replaying our keep-mask so both sides drop the same values."""

        def forward(self, t):
            return t * mask.to(t.dtype) / (1 - dropout) if dropout else t

    lora.lora_dropout["default"] = SameMask()
    xa = x.clone().requires_grad_()
    ya = qlora_linear(
        xa,
        layer.quantized_weight(),
        layer.lora_A,
        layer.lora_B,
        layer.scaling,
        layer.bias,
        dropout_p=dropout,
        training=True,
        dropout_mask=mask if dropout else None,
    )
    xb = x.double().requires_grad_()
    yb = peft_model(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy.double())
    pa, pb = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    assert layer.scaling == lora.scaling["default"]
    assert _rel(ya, yb) < BF16_TOL
    assert _rel(xa.grad, xb.grad) < BF16_TOL
    assert _rel(layer.lora_A.grad, pa.grad) < BF16_TOL
    assert _rel(layer.lora_B.grad, pb.grad) < BF16_TOL


def test_module_forward_is_the_op(seed):
    layer = _layer(compute_dtype=torch.float32).eval()
    x = torch.randn(4, layer.in_features)
    expected = qlora_linear(
        x, layer.quantized_weight(), layer.lora_A, layer.lora_B, layer.scaling, layer.bias
    )
    torch.testing.assert_close(layer(x), expected)
    base = Linear4bit.from_quantized(
        layer.quantized_weight(), layer.bias, compute_dtype=torch.float32
    )
    torch.testing.assert_close(base(x), qlora_linear(x, layer.quantized_weight(), bias=layer.bias))


def test_only_lora_factors_train(seed):
    layer = _layer(compute_dtype=torch.float32)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert isinstance(layer, nn.Linear)
    layer(torch.randn(2, layer.in_features)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_scaling():
    assert _layer(r=16).scaling == 16 / 16
    assert _layer(r=16, use_rslora=True).scaling == 16 / 4


# --- state: state_dict, .to(), storage dtype -----------------------------------------


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
def test_state_dict_round_trip(seed, storage):
    layer = _layer(compute_dtype=torch.float32, quant_storage=storage)
    sd = layer.state_dict()
    assert {
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    } <= set(sd)
    fresh = QLoraLinear(
        layer.in_features,
        layer.out_features,
        r=8,
        lora_alpha=16,
        compute_dtype=torch.float32,
        weight_dtype=torch.float32,
        quant_storage=storage,
    )
    fresh.load_state_dict(sd)
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert fresh.weight.dtype == storage and not fresh.weight.requires_grad


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_a_bitsandbytes_checkpoint(seed, quant_type, double_quant):
    from bitsandbytes.functional import QuantState

    layer = _layer(quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    sd = layer.state_dict()
    # bitsandbytes parses it into our state, field for field ...
    state = QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}, "cpu"
    )
    qw = layer.quantized_weight()
    assert (state.quant_type, state.blocksize, tuple(state.shape), state.dtype) == (
        qw.quant_type,
        qw.blocksize,
        tuple(qw.shape),
        qw.dtype,
    )
    assert ref.same_bytes(state.absmax, qw.absmax) and ref.same_bytes(state.code, qw.code)
    assert state.nested == double_quant
    if double_quant:
        assert ref.same_bytes(state.state2.absmax, qw.nested_absmax)
        assert ref.same_bytes(state.state2.code, qw.nested_code)
        assert float(state.offset) == float(qw.offset)
    # ... and the weight it defines is ours.
    values = ref.dequantize_bnb(sd["weight"], state)
    w = layer.dequantized_weight()
    assert torch.equal(w, ref.expected(values, w.dtype))


def test_dtype_casts_leave_quantized_state_alone(seed):
    layer = _layer(compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.float16)
    layer.half()
    after = layer.state_dict()
    for key in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax"):
        assert after[key].dtype == before[key].dtype, key
        assert torch.equal(after[key].view(torch.uint8), before[key].view(torch.uint8)), key
    assert layer.lora_A.dtype == torch.float16  # the trainable parts do follow the cast


def test_meta_device_construction():
    layer = QLoraLinear(4096, 14336, bias=False, r=32, device="meta")
    assert layer.weight.device.type == "meta" and layer.weight.shape == (4096 * 14336 // 2, 1)
    y = layer(torch.empty(2, 8, 4096, device="meta", dtype=torch.bfloat16))
    assert y.shape == (2, 8, 14336)


def test_load_state_dict_errors(seed):
    layer = _layer()
    sd = layer.state_dict()
    other = QLoraLinear(layer.in_features + 8, layer.out_features, r=8)
    with pytest.raises(RuntimeError, match="checkpoint weight has shape"):
        other.load_state_dict({k: v for k, v in sd.items() if k.startswith("weight")}, strict=False)
    broken = dict(sd)
    del broken["weight.quant_map"]
    with pytest.raises(RuntimeError, match=r"missing \['weight.quant_map'\]"):
        _layer().load_state_dict(broken)
    with pytest.raises(RuntimeError, match="Missing key"):
        _layer().load_state_dict({k: v for k, v in sd.items() if not k.startswith("weight")})


def test_bad_construction():
    with pytest.raises(ValueError, match="positive integer"):
        QLoraLinear(8, 8, r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        QLoraLinear(8, 8, lora_dropout=1.5)
    with pytest.raises(TypeError, match=r"expects an nn\.Linear"):
        QLoraLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Linear4bit(64, 64, blocksize=100)


def test_from_pretrained_style_shell_loads_bitsandbytes_layer(seed):
    """A Linear4bit built empty loads what bitsandbytes' Linear4bit saves."""
    import bitsandbytes as bnb

    linear = nn.Linear(96, 40)
    theirs = bnb.nn.Linear4bit(96, 40, compute_dtype=torch.float32, quant_type="fp4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # quantizes
    shell = Linear4bit(
        96, 40, quant_type="fp4", compute_dtype=torch.float32, weight_dtype=torch.float32
    )
    shell.load_state_dict(theirs.state_dict())
    assert (
        trilora.QuantizedWeight.from_bnb(theirs.weight, theirs.weight.quant_state).numel == 96 * 40
    )
    # The layer bitsandbytes' bytes define, in float64 (96 columns at blocksize 64: a shape
    # bitsandbytes' own CPU dequantization gets wrong on AVX-512 machines).
    exact = exact_4bit_reference(theirs)
    x = torch.randn(3, 96)
    torch.testing.assert_close(shell(x).double(), exact(x.double()), rtol=1e-5, atol=1e-5)
