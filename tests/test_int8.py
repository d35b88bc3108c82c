"""The 8-bit format (bitsandbytes LLM.int8 weights): bytes, compute, checkpoints, PEFT.

Fresh random weights of awkward shapes every run; references are bitsandbytes itself (the
bytes) and float64 from the format's definition (the compute).
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers_models import save_tiny_model
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import trilora
from trilora.formats import QuantConfig, get_format
from trilora.formats.int8 import quantize
from trilora.nn import Linear8bit, QuantizedLinear
from trilora.ops.int8_linear import int8_lora_linear
from trilora.peft import TriloraLoraLayer

SHAPES = [(1, 1), (7, 33), (65, 130), (129, 3)]


def _weight(shape, dtype):
    # rows of very different magnitudes, so the per-row scales matter
    return (torch.randn(shape) * torch.rand(shape[0], 1) * 4).to(dtype)


def _bnb_quantize(w):
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return p.data, p.SCB


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codes_and_scb_equal_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    codes, scb = _bnb_quantize(w)
    qw = quantize(w)
    assert qw.codes.dtype == torch.int8 and qw.scb.dtype == torch.float32
    assert torch.equal(qw.codes, codes)
    assert torch.equal(qw.scb, scb)
    # the definition in float64: SCB is the fp16 row absmax, codes round w16 * 127 / SCB
    w16 = w.to(torch.float16).double()
    assert torch.equal(qw.scb.double(), w16.abs().amax(1))
    exact = w16 * 127 / qw.scb.double()[:, None]
    assert (qw.codes.double() - exact).abs().max() <= 0.5 + 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_equals_bitsandbytes_and_float64(dtype):
    qw = quantize(_weight((37, 70), torch.float32))
    want = bnbf.int8_vectorwise_dequant(qw.codes, qw.scb).to(dtype)
    assert torch.equal(qw.dequantize(dtype), want)
    w64 = qw.codes.double() * qw.scb.double()[:, None] / 127
    assert torch.equal(qw.dequantize(torch.float64), w64)


def test_zero_row_and_bad_input():
    w = torch.randn(4, 9)
    w[2] = 0
    qw = quantize(w)
    assert qw.scb[2] == 0 and not qw.codes[2].any()
    assert not qw.dequantize(torch.float32)[2].any()
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.full((2, 3), 1e6))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(5))


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_outputs_and_grads_match_float64(dropout, bias):
    n, k, r = 45, 38, 5
    qw = quantize(_weight((n, k), torch.float32))
    x = torch.randn(2, 7, k, requires_grad=True)
    a = (torch.randn(r, k) / k**0.5).requires_grad_()
    b = torch.randn(n, r).requires_grad_()
    bb = torch.randn(n).requires_grad_() if bias else None
    mask = torch.rand(2, 7, k) > 0.3 if dropout else None
    p = 0.3 if dropout else 0.0
    y = int8_lora_linear(x, qw.codes, qw.scb, a, b, 0.7, bb, dropout_p=p, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    bb64 = bb.detach().double().requires_grad_() if bias else None
    w64 = qw.codes.double() * qw.scb.double()[:, None] / 127
    xd = x64 * mask / (1 - p) if dropout else x64
    y64 = x64 @ w64.T + 0.7 * (xd @ a64.T) @ b64.T + (bb64 if bias else 0)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-4)
    for got, want in ((x, x64), (a, a64), (b, b64), (bb, bb64)):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-4)


def test_layer_state_dict_is_linear8bitlt_both_ways():
    lin = torch.nn.Linear(33, 21)
    ours = Linear8bit.from_linear(lin, compute_dtype=torch.float32)
    theirs = bnb.nn.Linear8bitLt(33, 21, has_fp16_weights=False)
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours) == sorted(sd_theirs) == ["SCB", "bias", "weight", "weight_format"]
    for key in sd_ours:
        assert torch.equal(sd_ours[key], sd_theirs[key]), key
    back = Linear8bit(33, 21, compute_dtype=torch.float32, weight_dtype=torch.float32)
    back.load_state_dict(sd_theirs)
    assert torch.equal(back.weight, ours.weight) and torch.equal(back.weight_scb, ours.weight_scb)
    assert isinstance(back, QuantizedLinear) and back.format is get_format("int8")


def test_quant_config_round_trips_bitsandbytes_config():
    cfg = QuantConfig.from_bnb(BitsAndBytesConfig(load_in_8bit=True))
    assert cfg.quant_type == "int8" and cfg.format_name == "int8"
    assert QuantConfig.from_bnb(cfg.to_bnb()) == cfg
    four = QuantConfig("fp4", double_quant=False, compute_dtype=torch.float16)
    assert QuantConfig.from_bnb(BitsAndBytesConfig(**four.to_bnb())) == four
    with pytest.raises(ValueError, match="has_fp16_weight"):
        QuantConfig.from_bnb({"load_in_8bit": True, "llm_int8_has_fp16_weight": True})


@pytest.fixture(scope="module")
def bnb_8bit_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    path = save_tiny_model(root / "fp", "llama")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.float32,
        device_map="cpu",
    )
    model.save_pretrained(root / "bnb8")
    return path, root / "bnb8", model


def _int8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_bitsandbytes_8bit_checkpoint_loads_as_is(bnb_8bit_checkpoint, tmp_path):
    fp_path, bnb_path, bnb_model = bnb_8bit_checkpoint
    ours = trilora.from_pretrained(bnb_path, device="cpu", compute_dtype=torch.float32)
    layers = _int8_layers(ours)
    assert layers and all(m.format_name == "int8" for m in layers.values())
    for name, m in layers.items():
        theirs = bnb_model.get_submodule(name)
        assert torch.equal(m.weight, theirs.weight.data), name
        assert torch.equal(m.weight_scb, theirs.weight.SCB), name
    # quantizing the 16-bit checkpoint gives the same bytes bitsandbytes loaded
    fresh = trilora.from_pretrained(
        fp_path, quant_type="int8", device="cpu", compute_dtype=torch.float32
    )
    for name, m in _int8_layers(fresh).items():
        assert torch.equal(m.weight, layers[name].weight), name
    # and what trilora saves, transformers + bitsandbytes 8-bit loads with the same bytes
    trilora.save_quantized(fresh, tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu")
    for name, m in layers.items():
        assert torch.equal(again.get_submodule(name).weight.data, m.weight), name
    ids = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.isfinite(ours(ids).logits).all()


def test_adapter_round_trip_with_vanilla_peft_over_bnb_8bit(bnb_8bit_checkpoint, tmp_path):
    _, bnb_path, _ = bnb_8bit_checkpoint

    def vanilla():
        base = AutoModelForCausalLM.from_pretrained(bnb_path, device_map="cpu", dtype=torch.float32)
        return base

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft_get_peft_model(vanilla(), cfg)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path / "adapter_theirs")
    # vanilla PEFT -> trilora: patch the PEFT model built on Linear8bitLt
    ours = trilora.patch(
        PeftModel.from_pretrained(vanilla(), tmp_path / "adapter_theirs", is_trainable=True),
        compute_dtype=torch.float32,
    )
    lora_layers = [m for m in ours.modules() if isinstance(m, TriloraLoraLayer)]
    assert lora_layers and all(m.get_base_layer().format_name == "int8" for m in lora_layers)
    # trilora's output is the weight-only definition: a float model holding the dequantized weights
    ref = PeftModel.from_pretrained(vanilla(), tmp_path / "adapter_theirs")
    for name, m in list(ref.named_modules()):
        if isinstance(m, bnb.nn.Linear8bitLt):
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight.data = bnbf.int8_vectorwise_dequant(m.weight.data, m.weight.SCB)
            if m.bias is not None:
                dense.bias.data = m.bias.data
            ref.get_submodule(name.rpartition(".")[0]).__setattr__(name.rpartition(".")[2], dense)
    ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    # trilora -> vanilla PEFT: train a step, save, load into PEFT over bitsandbytes 8-bit
    ours.train()
    loss = ours(ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in ours.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    ours.save_pretrained(tmp_path / "adapter_ours")
    back = PeftModel.from_pretrained(vanilla(), tmp_path / "adapter_ours")
    want = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in back.state_dict().items() if "lora_" in k}
    assert sorted(got) == sorted(want)
    changed = 0
    for key in want:
        assert torch.equal(got[key], want[key]), key
        changed += "lora_A" in key
    assert changed


def test_patch_over_bnb_8bit_computes_in_the_input_dtype_as_bitsandbytes(bnb_8bit_checkpoint):
    # Linear8bitLt has no compute dtype; patch's default compute_dtype (bf16, for layers it
    # quantizes itself) must not turn an fp32 model's int8 layers into bf16 ones.
    _, bnb_path, _ = bnb_8bit_checkpoint
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "up_proj"])

    def peft_model():
        base = AutoModelForCausalLM.from_pretrained(bnb_path, device_map="cpu", dtype=torch.float32)
        return peft_get_peft_model(base, cfg)

    theirs = peft_model()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ours = trilora.patch(peft_model())
    ours.load_state_dict(theirs.state_dict())
    bases = [m.get_base_layer() for m in ours.modules() if isinstance(m, TriloraLoraLayer)]
    assert bases and all(b.format_name == "int8" and b.compute_dtype is None for b in bases)
    ids = torch.randint(0, ours.config.vocab_size, (3, 13))
    # training mode: bitsandbytes' CPU training matmul (MatMul8bitFp) dequantizes the weight
    # to the input's dtype, the definition trilora computes (in eval mode it runs LLM.int8)
    ours.train(), theirs.train()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
