"""LoRA settings a user may pass that used to end in raw PEFT errors or silently wrong models:
PiSSA / OLoRA / LoftQ initializations, LoRA on the output head, and the user-error classes.

References are PEFT's own initializations on the same full-precision model and the format's
definition (trilora.quantize, which tests/test_quant.py holds to bitsandbytes' bytes).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers_models import random_batch, save_tiny_model, tiny_config
from torch import nn

import trilora
from trilora.io import UserError
from trilora.loading import CheckpointError
from trilora.peft import TriloraLoraLayer, UnsupportedLoraSetting

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

warnings.filterwarnings("ignore")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp_model(seed: int):
    """A tiny full-precision Llama (fp32), weights drawn fresh."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden=64), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


def lora_layers(pm) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in pm.base_model.model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def packed(layer) -> torch.Tensor:
    return layer.weight.data.view(torch.uint8)


def test_user_errors_share_one_base_class():
    for cls in (UnsupportedLoraSetting, CheckpointError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
        assert cls.exit_code == 1


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_base_rewriting_inits_quantize_peft_residual(init, seed):
    """PiSSA / OLoRA on a full-precision model: PEFT's own initialization, then the
    rewritten (residual) weight quantized, i.e. QPiSSA."""
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJ), init_lora_weights=init)
    reference_model = fp_model(seed)
    model = copy.deepcopy(reference_model)
    torch.manual_seed(seed + 1)  # pissa_niter_K draws random projections
    ref = peft.get_peft_model(reference_model, copy.deepcopy(cfg))
    torch.manual_seed(seed + 1)
    pm = trilora.get_peft_model(model, cfg, compute_dtype=torch.float32)
    ours, theirs = lora_layers(pm), lora_layers(ref)
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    for name, layer in ours.items():
        assert isinstance(layer, TriloraLoraLayer), name
        base = layer.get_base_layer()
        assert isinstance(base, trilora.Linear4bit), name
        want = theirs[name]
        torch.testing.assert_close(layer.lora_A["default"].weight, want.lora_A["default"].weight)
        torch.testing.assert_close(layer.lora_B["default"].weight, want.lora_B["default"].weight)
        residual = want.get_base_layer().weight.detach()
        expect = trilora.quantize(residual, "nf4", 64, True)
        assert torch.equal(packed(base), expect.packed.view(torch.uint8)), name
    # The function at initialization is the full-precision model's up to the 4-bit rounding
    # of the residual: comparable to plain QLoRA's rounding of W (PiSSA's is usually smaller).
    plain = trilora.get_peft_model(
        fp_model(seed), LoraConfig(r=8, target_modules=list(PROJ)), compute_dtype=torch.float32
    )
    ids = random_batch(256, seed=seed)
    with torch.no_grad():
        exact = fp_model(seed)(ids).logits
        err = float((pm(ids).logits - exact).norm() / exact.norm())
        err_plain = float((plain(ids).logits - exact).norm() / exact.norm())
    print(f"{init}: logits rel. error {err:.3f}, plain QLoRA {err_plain:.3f}")
    assert err < 1.5 * err_plain


def _loftq_config(r: int, iters: int, bits: int = 4) -> LoraConfig:
    """LoraConfig(init_lora_weights="loftq"); PEFT's constructor insists on scipy being
    installed (its own quantizer needs it), trilora's LoftQ does not."""
    try:
        from peft import LoftQConfig

        return LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=list(PROJ),
            init_lora_weights="loftq",
            loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters),
        )
    except ImportError:
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(PROJ))
        cfg.init_lora_weights = "loftq"
        cfg.loftq_config = {"loftq_bits": bits, "loftq_iter": iters}
        return cfg


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_picks_the_4bit_weight_and_the_adapter_together(iters, seed):
    model = fp_model(seed)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(PROJ)}
    r = 8
    pm = trilora.get_peft_model(model, _loftq_config(r, iters), compute_dtype=torch.float32)
    for name, layer in lora_layers(pm).items():
        w = weights[name].double()
        base = layer.get_base_layer()
        assert isinstance(base, trilora.Linear4bit)
        deq = base.dequantized_weight(torch.float32).double()
        scale = layer.scaling["default"]
        delta = scale * (
            layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        )
        # the adapter is the best rank-r fit of what the 4-bit weight misses
        u, s, vh = torch.linalg.svd(w - deq, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert (delta - best).norm() <= 1e-4 * best.norm(), name
        # and so the layer is closer to the full-precision weight than plain QLoRA's
        plain = trilora.quantize(weights[name], "nf4", 64, True).dequantize(torch.float32).double()
        assert (w - deq - delta).norm() < (w - plain).norm(), name
        if iters == 1:  # Q = quant(W): the very bytes plain quantization gives
            expect = trilora.quantize(weights[name], "nf4", 64, True)
            assert torch.equal(packed(base), expect.packed.view(torch.uint8))


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_base_rewriting_inits_on_a_4bit_base_raise(tmp_path, init):
    path = save_tiny_model(tmp_path / "m", "llama")
    model = trilora.from_pretrained(path, compute_dtype=torch.float32, dtype=torch.float32)
    cfg = (
        _loftq_config(4, 1)
        if init == "loftq"
        else LoraConfig(r=4, target_modules=list(PROJ), init_lora_weights=init)
    )
    with pytest.raises(
        UnsupportedLoraSetting, match=rf"init_lora_weights='{init}'.*already quantized"
    ):
        trilora.get_peft_model(model, cfg)


def test_loftq_other_than_4_bits_raises():
    with pytest.raises(UnsupportedLoraSetting, match="loftq_bits=8"):
        trilora.get_peft_model(fp_model(0), _loftq_config(4, 1, bits=8))


# --- LoRA on the output head -------------------------------------------------------------


def _head_config(seed: int) -> LoraConfig:
    torch.manual_seed(seed)
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False
    )


def test_lm_head_lora_keeps_a_16bit_head(tmp_path, seed):
    """transformers + bitsandbytes never quantize lm_head, so neither does trilora: the LoRA
    sits on the 16-bit head."""
    path = save_tiny_model(tmp_path / "m", "llama", seed=seed)
    model = trilora.from_pretrained(path, compute_dtype=torch.float32, dtype=torch.float32)
    head_weight = model.lm_head.weight.detach().clone()
    pm = trilora.get_peft_model(model, _head_config(seed), compute_dtype=torch.float32)
    head = pm.base_model.model.lm_head
    assert isinstance(head, TriloraLoraLayer)
    base = head.get_base_layer()
    assert type(base) is nn.Linear and torch.equal(base.weight, head_weight)
    assert isinstance(
        pm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer(), trilora.Linear4bit
    )
    # forward: PEFT's lora.Linear formula on the exact head weight
    x = torch.randn(3, 5, 64)
    a, b = head.lora_A["default"].weight, head.lora_B["default"].weight
    expect = x @ head_weight.T + head.scaling["default"] * (x @ a.T) @ b.T
    torch.testing.assert_close(head(x), expect)
    # gradients reach the head's adapter, never its frozen weight
    head(x).square().sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and base.weight.grad is None
    # the saved adapter is PEFT's: it loads over transformers + bitsandbytes unchanged
    pm.save_pretrained(tmp_path / "ad")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.lora_A.weight" in keys


def test_patch_keeps_a_16bit_head(tmp_path, seed):
    pytest.importorskip("bitsandbytes")
    from helpers_models import load_bnb_4bit

    path = save_tiny_model(tmp_path / "m", "llama", seed=seed)
    bnb = load_bnb_4bit(path)
    reference = peft.get_peft_model(bnb, _head_config(seed))
    ids = random_batch(256, seed=seed)
    hidden = torch.randn(2, 7, 64)
    with torch.no_grad():
        head_out = reference.base_model.model.lm_head(hidden)
    pm = trilora.patch(reference, compute_dtype=torch.float32)
    head = pm.base_model.model.lm_head
    assert isinstance(head, TriloraLoraLayer) and type(head.get_base_layer()) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), head_out)
        pm(ids)
    # a merge keeps the head 16-bit too, requantized or not
    merged = trilora.merge(copy.deepcopy(pm), dtype=torch.float32, requantize=True)
    assert type(merged.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged.lm_head(hidden), head_out, rtol=1e-5, atol=1e-5)
