"""MoE models end to end on tiny random models of each family: loading (per-expert
checkpoints through transformers' conversions), experts bytes against bitsandbytes, the
forward and every LoRA gradient against a float64 reference built from the dequantized
experts, the adapter files with vanilla PEFT, and save/reload byte for byte."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import trilora
import trilora.peft as tp
from trilora.moe import QuantizedExperts
from trilora.patches.fused_loss import disable_fused_cross_entropy

T = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnbf = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("transformers.integrations.moe")


def _config(family: str, rng: random.Random):
    # Awkward expert counts and top-k, drawn fresh; hidden sizes not multiples of 64 so
    # quantization blocks straddle rows.
    experts = rng.choice([3, 5, 6, 7])
    top_k = rng.randint(1, min(3, experts - 1))
    common = dict(
        vocab_size=61,
        hidden_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    inter = rng.choice([20, 24, 36])
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=inter,
            head_dim=10,
            num_experts=experts,
            num_experts_per_tok=top_k,
            mlp_only_layers=[],
        )
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=inter,
            shared_expert_intermediate_size=28,
            num_experts=experts,
            num_experts_per_tok=top_k,
        )
    if family == "mixtral":
        return T.MixtralConfig(
            **common,
            intermediate_size=inter,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
        )
    if family == "olmoe":
        return T.OlmoeConfig(
            **common, intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k
        )
    return T.GptOssConfig(
        **common,
        intermediate_size=inter,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        head_dim=10,
        layer_types=["full_attention"] * 2,
    )


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"]


def _saved(tmp_path, family, seed, dtype=torch.float32):
    cfg = _config(family, random.Random(seed))
    model = T.AutoModelForCausalLM.from_config(cfg).to(dtype)
    # Random non-zero biases (gpt-oss), so they are checked too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


def _float64_reference(model: torch.nn.Module, trilora_model: torch.nn.Module):
    """``model`` in float64 with every weight trilora quantized replaced by the exact
    dequantization of trilora's bytes."""
    ref = copy.deepcopy(model).double()
    # transformers' default grouped_mm has no float64 kernel; its eager loop is the definition.
    ref.set_experts_implementation("eager")
    for name, mod in trilora_model.named_modules():
        name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        if isinstance(mod, QuantizedExperts):
            parent, leaf = name.rsplit(".", 1)
            ref.get_submodule(parent).register_parameter(
                leaf, torch.nn.Parameter(mod.dequantize(torch.float64))
            )
        elif isinstance(mod, trilora.nn.QuantizedLinear):
            ref.get_submodule(name).weight = torch.nn.Parameter(
                mod.dequantized_weight(torch.float64)
            )
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_load_bytes_forward_and_reload(tmp_path, family, seed):
    model, src = _saved(tmp_path, family, seed)
    q = trilora.from_pretrained(
        src, quant_type="nf4", compute_dtype=None, device="cpu", dtype=torch.float32
    )
    experts = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedExperts)}
    assert experts and set(experts) == set(q.trilora_quantized_experts)
    # Routers stay 16-bit; every 3-D experts parameter is quantized.
    assert not [
        n for n, p in q.named_parameters() if p.dim() == 3 and n.rpartition(".")[0] not in experts
    ]
    params = dict(model.named_parameters())
    name = random.Random(seed).choice(sorted(experts))
    e = random.Random(seed + 1).randrange(experts[name].num_experts)
    packed, state = bnbf.quantize_4bit(
        params[name][e].detach(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    ours = experts[name].expert(e)
    assert torch.equal(ours.packed.view(torch.uint8).reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)

    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    ref = _float64_reference(model, q)
    with torch.no_grad():
        got = q(ids).logits.double()
        want = ref(ids).logits
    assert torch.allclose(got, want, atol=2e-5 * want.abs().max().item(), rtol=1e-4)

    out = trilora.save_quantized(q, tmp_path / "q")
    again = trilora.from_pretrained(out, device="cpu")
    a, b = q.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _lora_config(**kw):
    return peft.LoraConfig(r=3, lora_alpha=7, target_modules="all-linear", **kw)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_lora_on_experts_matches_float64(tmp_path, family, seed):
    model, src = _saved(tmp_path, family, seed)
    q = trilora.from_pretrained(
        src, quant_type="nf4", compute_dtype=None, device="cpu", dtype=torch.float32
    )
    pm = tp.get_peft_model(q, _lora_config(init_lora_weights=False), compute_dtype=None)
    wrappers = [m for m in pm.modules() if isinstance(m, tp.TriloraExpertsLora)]
    assert wrappers, "all-linear must put LoRA on the experts"
    # The same targets (trilora adds gpt-oss's experts, which PEFT's all-linear leaves out).
    targets = sorted(pm.peft_config["default"].target_parameters)
    ref = peft.get_peft_model(
        _float64_reference(model, pm), _lora_config(target_parameters=targets)
    )
    peft.set_peft_model_state_dict(
        ref, {k: v.double() for k, v in peft.get_peft_model_state_dict(pm).items()}
    )
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    pm.train()
    ref.train()
    ours = pm(ids, labels=ids)
    theirs = ref(ids, labels=ids)
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-4 * abs(theirs.loss.item())
    ours.loss.backward()
    theirs.loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == want.keys()
    # Routers' LoRA gradients can be ~0 (top-k routing of a tiny random model): fp32
    # rounding there is judged against the largest gradient of the model.
    overall = max(w.abs().max().item() for w in want.values())
    for n in grads:
        scale = want[n].abs().max().item()
        err = (grads[n].double() - want[n]).abs().max().item()
        assert err <= 2e-4 * scale + 1e-6 * overall, n


def test_adapter_files_move_both_ways(tmp_path, seed):
    model, src = _saved(tmp_path, "qwen3_moe", seed)
    q = trilora.from_pretrained(
        src, quant_type="nf4", compute_dtype=None, device="cpu", dtype=torch.float32
    )
    pm = tp.get_peft_model(q, _lora_config(init_lora_weights=False), compute_dtype=None)
    pm.save_pretrained(tmp_path / "adapter")
    # Vanilla PEFT on the 16-bit model reads trilora's adapter as its own ...
    vanilla = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    ours = peft.get_peft_model_state_dict(pm)
    theirs = peft.get_peft_model_state_dict(vanilla)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # ... and trilora reads vanilla PEFT's.
    vanilla2 = peft.get_peft_model(copy.deepcopy(model), _lora_config(init_lora_weights=False))
    vanilla2.save_pretrained(tmp_path / "vanilla")
    q2 = trilora.from_pretrained(
        src, quant_type="nf4", compute_dtype=None, device="cpu", dtype=torch.float32
    )
    back = tp.patch(tp.load_adapter(q2, tmp_path / "vanilla"), compute_dtype=None)
    assert any(isinstance(m, tp.TriloraExpertsLora) for m in back.modules())
    got = peft.get_peft_model_state_dict(back)
    exp = peft.get_peft_model_state_dict(vanilla2)
    assert got.keys() == exp.keys()
    assert all(torch.equal(got[k], exp[k]) for k in got)


def test_loss_against_bitsandbytes_peft(tmp_path, seed):
    """bitsandbytes + PEFT (target_parameters, experts 16-bit) against trilora (experts
    4-bit): the gap is what quantizing the experts explains."""
    from helpers_models import load_bnb_4bit

    model, src = _saved(tmp_path, "qwen3_moe", seed)
    cfg = _lora_config()
    base = load_bnb_4bit(src)
    baseline = peft.get_peft_model(base, copy.deepcopy(cfg))
    q = trilora.from_pretrained(src, quant_type="nf4", compute_dtype=torch.float32, device="cpu")
    pm = tp.get_peft_model(q, copy.deepcopy(cfg), compute_dtype=torch.float32)
    peft.set_peft_model_state_dict(pm, peft.get_peft_model_state_dict(baseline))
    # The same model with 16-bit experts (and trilora's exact linears) isolates the experts'
    # quantization error.
    ref16 = _float64_reference(model, q)
    for name, p in model.named_parameters():
        if p.dim() == 3:
            parent, leaf = name.rsplit(".", 1)
            ref16.get_submodule(parent).register_parameter(
                leaf, torch.nn.Parameter(p.detach().double())
            )
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        ours = pm(ids, labels=ids).loss.item()
        theirs = baseline(ids, labels=ids).loss.item()
        exact4 = _float64_reference(model, q)(ids, labels=ids).loss.item()
        exact16 = ref16(ids, labels=ids).loss.item()
    assert abs(ours - exact4) < 1e-4 * abs(exact4)
    assert abs(ours - theirs) <= 3 * abs(exact4 - exact16) + 2e-3 * abs(theirs)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_loss_keeps_the_router_aux_loss(tmp_path, family, seed):
    model, src = _saved(tmp_path, family, seed)
    q = trilora.from_pretrained(src, compute_dtype=None, device="cpu", dtype=torch.float32)
    q.config.output_router_logits = True
    pm = tp.get_peft_model(q, _lora_config(), compute_dtype=None)
    pm.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    fused = pm(ids, labels=ids)
    disable_fused_cross_entropy(pm)
    plain = pm(ids, labels=ids)
    assert fused.aux_loss is not None and fused.aux_loss.item() > 0
    assert abs(fused.loss.item() - plain.loss.item()) < 1e-5 * abs(plain.loss.item())
    no_aux = pm(ids, labels=ids, output_router_logits=False).loss.item()
    assert abs(plain.loss.item() - no_aux) > 0.5 * model.config.router_aux_loss_coef


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_merge_folds_expert_lora_in_fp32(tmp_path, family, seed):
    model, src = _saved(tmp_path, family, seed)
    q = trilora.from_pretrained(src, compute_dtype=None, device="cpu", dtype=torch.float32)
    pm = tp.get_peft_model(q, _lora_config(init_lora_weights=False), compute_dtype=None)
    targets = sorted(pm.peft_config["default"].target_parameters)
    ref = peft.get_peft_model(
        _float64_reference(model, pm), _lora_config(target_parameters=targets)
    )
    peft.set_peft_model_state_dict(
        ref, {k: v.double() for k, v in peft.get_peft_model_state_dict(pm).items()}
    )
    merged = trilora.merge(pm, dtype="fp64")
    assert not [m for m in merged.modules() if isinstance(m, QuantizedExperts)]
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    ref.eval()
    merged.set_experts_implementation("eager")
    with torch.no_grad():
        want = ref(ids).logits
        got = merged(ids).logits
    # The merge adds the deltas in fp32 (as for linears): fp32-level agreement.
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    again.set_experts_implementation("eager")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, got)


def test_experts_summary_names_the_experts_memory(tmp_path, seed):
    from trilora.moe import experts_summary

    model, src = _saved(tmp_path, "mixtral", seed)
    assert experts_summary(model).endswith("(torch.float32)".replace("torch.", ""))
    q = trilora.from_pretrained(src, quant_type="fp4", device="cpu")
    experts = [m for m in q.modules() if isinstance(m, QuantizedExperts)]
    line = experts_summary(q)
    mib = sum(m.nbytes for m in experts) / 2**20
    assert line == (
        f"experts: {len(experts)} tensors of {experts[0].num_experts} experts, {mib:.1f} MiB (fp4)"
    )
    assert sum(m.nbytes for m in experts) < sum(
        p.numel() * 2 for n, p in model.named_parameters() if p.dim() == 3
    )


def test_patch_a_bitsandbytes_peft_moe(tmp_path, seed):
    """trilora.patch on bitsandbytes + PEFT (16-bit experts under PEFT's ParamWrapper): the
    experts are quantized as trilora.from_pretrained quantizes them, the adapter modules
    and names stay, and the model computes what trilora's own computes."""
    from helpers_models import load_bnb_4bit

    model, src = _saved(tmp_path, "qwen3_moe", seed)
    cfg = _lora_config(init_lora_weights=False)
    baseline = peft.get_peft_model(load_bnb_4bit(src), copy.deepcopy(cfg))
    names = [n for n, _ in baseline.named_parameters() if "lora_" in n]
    patched = tp.patch(baseline, compute_dtype=torch.float32)
    assert [n for n, _ in patched.named_parameters() if "lora_" in n] == names
    assert any(isinstance(m, QuantizedExperts) for m in patched.modules())
    q = trilora.from_pretrained(src, compute_dtype=torch.float32, device="cpu", dtype=torch.float32)
    ours = tp.get_peft_model(q, copy.deepcopy(cfg), compute_dtype=torch.float32)
    peft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(patched))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    patched.eval()
    ours.eval()
    with torch.no_grad():
        a, b = patched(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=1e-5 * b.abs().max().item())
