"""trilora.patch / get_peft_model against transformers + bitsandbytes + PEFT on the CPU.

The baseline is PEFT's model over bitsandbytes' 4-bit bytes, computed exactly: every
bitsandbytes ``Linear4bit`` replaced by the float64 dequantization of its bytes
(``exact_4bit_reference``). bitsandbytes' own CPU outputs are not the truth: its CPU
dequantization is wrong for some shapes on AVX-512 machines and its CPU inference path rounds
the scales to bf16 (docs/bitsandbytes-cpu.md).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers_models import (
    ARCHS,
    exact_4bit_reference,
    load_bnb_4bit,
    random_batch,
    save_tiny_model,
)
from torch import nn

import trilora
from trilora.peft import TriloraLoraLayer, UnsupportedLoraSetting

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel  # noqa: E402

warnings.filterwarnings("ignore")


def _lora(**kw) -> LoraConfig:
    # init_lora_weights=False draws lora_B non-zero, so the LoRA path changes the output.
    base = dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    base.update(kw)
    return LoraConfig(**base)


def _pair(tmp_path, arch, seed, **lora_kw):
    """``(path, ref, ours)``: PEFT over bitsandbytes, and trilora's patch of a copy of it."""
    path = save_tiny_model(tmp_path / arch, arch, seed=seed)
    torch.manual_seed(seed)
    ref = peft.get_peft_model(load_bnb_4bit(path), _lora(**lora_kw))
    ours = trilora.patch(copy.deepcopy(ref), compute_dtype=torch.float32)
    return path, ref, ours


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        (a.detach().double() - b.double()).norm() / b.detach().double().norm().clamp_min(1e-30)
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_logits_loss_grads(tmp_path, arch, seed):
    # Same 4-bit bytes and the same LoRA factors; trilora computes in fp32, the reference in
    # float64, so differences are fp32 rounding only: ~1e-7 relative per op, amplified by at
    # most a few orders of magnitude through two layers and softmax. 1e-5 relative leaves
    # margin yet catches any wrong term (a missing scale or bias is O(1e-1)).
    _, ref, ours = _pair(tmp_path, arch, seed, use_rslora=arch == "mistral")
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    n_lora = sum(isinstance(m, TriloraLoraLayer) for m in ours.modules())
    assert n_lora == 14
    ref = exact_4bit_reference(ref)
    ids = random_batch(256, seed=seed)
    out_r, out_o = ref(ids, labels=ids), ours(ids, labels=ids)
    assert _rel(out_o.logits, out_r.logits) < 1e-5
    assert abs(out_o.loss.item() - out_r.loss.item()) < 1e-5 * out_r.loss.item()
    out_r.loss.backward()
    out_o.loss.backward()
    grads_o = dict(ours.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        if p.requires_grad:
            assert "lora_" in name
            assert _rel(grads_o[name].grad, p.grad) < 1e-4, name
            checked += 1
    assert checked == 2 * n_lora
    # disable_adapter(): the base model alone, still identical.
    with torch.no_grad(), ref.disable_adapter(), ours.disable_adapter():
        base_r, base_o = ref(ids).logits, ours(ids).logits
    assert _rel(base_o, base_r) < 1e-5
    assert _rel(base_o, out_o.logits.detach()) > 1e-3  # the adapter did change the output


def test_plain_linear_base_is_quantized(tmp_path, seed):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "m", "llama", seed=seed)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    ours = trilora.get_peft_model(
        plain, _lora(target_modules=["q_proj", "down_proj"]), compute_dtype=torch.float32
    )
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, TriloraLoraLayer) and isinstance(layer.base_layer, trilora.Linear4bit)
    assert type(ours.base_model.model.model.layers[0].self_attn.k_proj) is nn.Linear  # not targeted
    # Against bnb + PEFT on the same fp32 weights: bitsandbytes quantizes to the same bytes.
    ref = load_bnb_4bit(path)
    ref = peft.get_peft_model(ref, _lora(target_modules=["q_proj", "down_proj"]))
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    ids = random_batch(256, seed=seed)
    # The bnb reference also quantized k/v/o/gate/up; ours kept them in fp32, so only the
    # targeted layers are compared directly: same bytes, and the same LoRA layer computed
    # exactly over them.
    lo = ours.base_model.model.model.layers[1].self_attn.q_proj
    lr = ref.base_model.model.model.layers[1].self_attn.q_proj
    mine = lo.base_layer.quantized_weight()
    theirs = trilora.QuantizedWeight.from_bnb(
        lr.base_layer.weight, lr.base_layer.weight.quant_state
    )
    assert torch.equal(mine.packed.view(torch.uint8), theirs.packed.view(torch.uint8))
    assert torch.equal(mine.scales(), theirs.scales())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert _rel(lo(x), exact_4bit_reference(lr)(x.double())) < 1e-6
    assert ours(ids).logits.isfinite().all()


def test_adapter_files_interoperate(tmp_path, seed):
    path, ref, ours = _pair(tmp_path, "qwen2", seed)
    ids = random_batch(256, seed=seed)
    with torch.no_grad():
        expect = ours(ids).logits
    # trilora -> vanilla PEFT + bitsandbytes: the model it loads is ours
    ours.save_pretrained(tmp_path / "ad")
    fresh = PeftModel.from_pretrained(load_bnb_4bit(path), tmp_path / "ad")
    with torch.no_grad():
        assert _rel(expect, exact_4bit_reference(fresh)(ids).logits) < 1e-5
    # vanilla PEFT -> trilora (a base loaded by trilora itself)
    ref.save_pretrained(tmp_path / "ad_ref")
    base = trilora.from_pretrained(path, compute_dtype=torch.float32, dtype=torch.float32)
    mine = trilora.patch(
        PeftModel.from_pretrained(base, tmp_path / "ad_ref"), compute_dtype=torch.float32
    )
    assert sum(isinstance(m, TriloraLoraLayer) for m in mine.modules()) == 14
    with torch.no_grad():
        assert _rel(mine(ids).logits, exact_4bit_reference(ref)(ids).logits) < 1e-5


def _add_second_adapter(ref, ours, seed: int) -> None:
    """A second adapter, "other" (r=2 on q_proj/v_proj), with the same weights on both."""
    torch.manual_seed(seed + 1)
    second = _lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    ref.add_adapter("other", second)
    ours.add_adapter("other", copy.deepcopy(second))
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)


def test_multiple_adapters(tmp_path, seed):
    _, ref, ours = _pair(tmp_path, "llama", seed)
    _add_second_adapter(ref, ours, seed)
    ref = exact_4bit_reference(ref)
    ids = random_batch(256, seed=seed)
    with torch.no_grad():
        for name in ("other", "default"):
            ref.set_adapter(name)
            ours.set_adapter(name)
            assert _rel(ours(ids).logits, ref(ids).logits) < 1e-5, name
        # Both active at once: the second adapter is added with plain torch ops.
        for model in (ref, ours):
            model.base_model.set_adapter(["default", "other"])
        both = ours(ids).logits
        assert _rel(both, ref(ids).logits) < 1e-5
        ours.set_adapter("default")
        assert _rel(both, ours(ids).logits) > 1e-4


def test_lora_dropout_masks_the_lora_input(seed):
    # Square layer with lora_A = I, lora_B = I, scale 1: the LoRA term is drop(x) itself,
    # so every element of (y - base(x)) must be 0 or x / (1 - p), and about p of them 0.
    p = 0.3
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    cfg = LoraConfig(r=64, lora_alpha=64, target_modules=["0"], lora_dropout=p)
    pm = trilora.get_peft_model(model, cfg, compute_dtype=torch.float32)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(64))
        layer.lora_B["default"].weight.copy_(torch.eye(64))
    x = torch.randn(256, 64)
    base = layer.base_layer(x)
    pm.train()
    term = layer(x) - base
    kept = (term - x / (1 - p)).abs() < 1e-4
    dropped = term.abs() < 1e-6
    assert bool((kept | dropped).all())
    assert abs(dropped.float().mean().item() - p) < 0.02  # 16384 draws: std ~0.0036
    pm.eval()
    torch.testing.assert_close(layer(x) - base, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        (dict(use_dora=True), "use_dora"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(bias="all"), "bias='all'"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out"),
        (dict(use_qalora=True), "use_qalora"),
    ],
)
def test_unsupported_settings_raise(tmp_path, setting, match):
    path = save_tiny_model(tmp_path / "m", "llama")
    model = trilora.from_pretrained(path, compute_dtype=torch.float32, dtype=torch.float32)
    with pytest.raises(UnsupportedLoraSetting, match=match):
        trilora.get_peft_model(model, _lora(**setting))
    if setting in (dict(use_dora=True), dict(bias="all")):
        # Patching an existing PEFT model with the setting is refused before any change.
        pm = peft.get_peft_model(load_bnb_4bit(path), _lora(**setting))
        with pytest.raises(UnsupportedLoraSetting, match=match):
            trilora.patch(pm)
        assert not any(isinstance(m, TriloraLoraLayer) for m in pm.modules())


def test_lora_on_embedding_rejected(tmp_path):
    path = save_tiny_model(tmp_path / "m", "llama")
    pm = peft.get_peft_model(load_bnb_4bit(path), _lora(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(TypeError, match="linear layers only"):
        trilora.patch(pm)


def test_merge_in_place_refused(tmp_path, seed):
    _, _, ours = _pair(tmp_path, "llama", seed)
    with pytest.raises(NotImplementedError, match=r"trilora\.merge"):
        ours.merge_adapter()


def test_adapter_shape_mismatch(tmp_path, seed):
    _, _, ours = _pair(tmp_path, "llama", seed)
    ours.save_pretrained(tmp_path / "ad")
    other = save_tiny_model(tmp_path / "wide", "llama", hidden=128)
    base = trilora.from_pretrained(other, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"size mismatch.*lora_A"):
        PeftModel.from_pretrained(base, tmp_path / "ad")


def test_patch_keeps_adapter_state(tmp_path, seed):
    """patch() goes through PEFT's public set_adapter/enable_adapters, which also set the
    adapters' requires_grad flags: the active adapter, the disabled state and every flag
    (frozen adapters, a frozen single parameter) must come through unchanged."""
    path = save_tiny_model(tmp_path / "m", "llama", seed=seed)
    torch.manual_seed(seed)
    ref = peft.get_peft_model(load_bnb_4bit(path), _lora())
    ref.add_adapter("other", _lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    ref.set_adapter("other")
    q_proj = ref.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.lora_A["other"].weight.requires_grad_(False)  # frozen by hand
    ref.base_model.disable_adapter_layers()
    for disabled in (True, False):
        if not disabled:
            ref.base_model.enable_adapter_layers()
            q_proj.lora_A["other"].weight.requires_grad_(False)
        flags = {n: p.requires_grad for n, p in ref.named_parameters()}
        layers = {n: m for n, m in ref.named_modules() if hasattr(m, "lora_A")}
        state = {n: (list(m.active_adapters), m.disable_adapters) for n, m in layers.items()}
        assert (
            any(flags.values()) != disabled
            and not flags["base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight"]
        )
        ours = trilora.patch(copy.deepcopy(ref), compute_dtype=torch.float32)
        assert sum(isinstance(m, TriloraLoraLayer) for m in ours.modules()) == len(layers)
        assert {n: p.requires_grad for n, p in ours.named_parameters()} == flags
        for n, m in ours.named_modules():
            if n in state:
                assert (list(m.active_adapters), m.disable_adapters) == state[n], n


def test_mixed_adapter_batch(tmp_path, seed):
    # forward(..., adapter_names=[...]): one adapter per sample, through PEFT's own hooks.
    _, ref, ours = _pair(tmp_path, "llama", seed)
    _add_second_adapter(ref, ours, seed)
    ref = exact_4bit_reference(ref).eval()  # PEFT refuses adapter_names in training mode
    ours.eval()
    ids = random_batch(256, batch=4, seed=seed)
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        got = ours(ids, adapter_names=names).logits
        assert _rel(got, ref(ids, adapter_names=names).logits) < 1e-5
        for i, name in enumerate(names):  # each row as if its adapter alone were active
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(ids[i : i + 1]).logits
            else:
                ours.set_adapter(name)
                alone = ours(ids[i : i + 1]).logits
            assert _rel(got[i : i + 1], alone) < 1e-5, name
        with pytest.raises(ValueError, match="adapter_names"):
            ours(ids, adapter_names=names[:1])


def test_peft_hook_missing_names_the_version():
    from trilora.io import UserError
    from trilora.peft import _peft_hook

    config = _lora()
    assert callable(_peft_hook(config, "_register_custom_module", "x"))
    with pytest.raises(UserError, match=rf"PEFT {peft.__version__} has no LoraConfig\._gone"):
        _peft_hook(config, "_gone", "its LoRA layers")
