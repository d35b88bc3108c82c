"""Mixture-of-experts models in trilora.distributed, in one process: the other ranks' meta
shell of a model with quantized experts, the experts' storage re-view that FSDP2 needs, and
the resident-bytes accounting. (The 2-rank FSDP2 run is ``test_training.py``.)"""

from __future__ import annotations

import pytest
import torch
from dist_workers import MOE_MODEL, lora_config
from helpers_models import save_tiny_model

import trilora
from trilora.distributed import match_storage, resident_bytes
from trilora.distributed.loading import build_shell, describe_model
from trilora.formats import QuantConfig
from trilora.memory.distributed import sharding_groups
from trilora.moe import QuantizedExperts
from trilora.nn import QuantizedLinear

pytest.importorskip("transformers.integrations.moe")

_QUANT = {
    "nf4_bf16_storage": {
        "quantization_config": {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_storage": "bfloat16",
        }
    },
    "int8": {"quant_type": "int8"},
}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("moe") / "model", seed=11, **MOE_MODEL)


def _load(path, **kwargs):
    return trilora.from_pretrained(path, compute_dtype=torch.float32, dtype=torch.float32, **kwargs)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("quant", sorted(_QUANT))
def test_shell_is_the_loaded_model_on_meta(moe_dir, quant):
    model = _load(moe_dir, **_QUANT[quant])
    shell = build_shell(describe_model(model))

    def tree(m):
        return [(name, type(sub).__name__, repr(sub)) for name, sub in m.named_modules()]

    def tensors(m):
        return [
            (name, tuple(t.shape), t.dtype)
            for name, t in [*m.named_parameters(), *m.named_buffers(remove_duplicate=False)]
        ]

    assert tree(shell) == tree(model)
    assert sum(isinstance(m, QuantizedExperts) for m in shell.modules()) == 2 * MOE_MODEL["layers"]
    assert tensors(shell) == tensors(model)
    assert all(p.is_meta for p in shell.parameters())
    assert shell.trilora_quantized_experts == model.trilora_quantized_experts
    # materialized and given rank 0's tensors by name (as wrap_fsdp / wrap_ddp do), the
    # shell is the same model: same state_dict and the same logits through trilora's
    # experts forward (transformers' own would fail on quantized experts)
    shell.to_empty(device="cpu")
    source = dict([*model.named_parameters(), *model.named_buffers(remove_duplicate=False)])
    with torch.no_grad():
        for name, t in [*shell.named_parameters(), *shell.named_buffers(remove_duplicate=False)]:
            t.copy_(source[name])
    want, got = model.state_dict(), shell.state_dict()
    assert list(got) == list(want)
    # bit for bit (4-bit codes viewed as bf16 may read as NaN)
    assert all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)
    ids = torch.randint(0, MOE_MODEL["vocab"], (2, 7))
    with torch.no_grad():
        assert torch.equal(shell(ids).logits, model(ids).logits)


def test_shell_builds_in_a_fresh_process(moe_dir, monkeypatch):
    """A rank that never loaded an MoE has not registered trilora's experts forward, which
    rank 0's config names."""
    from transformers.integrations.moe import ExpertsInterface

    from trilora.moe import IMPLEMENTATION

    description = describe_model(_load(moe_dir))
    # this process as a fresh rank sees it (transformers' class-wide registry, restored after)
    fresh = {k: v for k, v in ExpertsInterface._global_mapping.items() if k != IMPLEMENTATION}
    monkeypatch.setattr(ExpertsInterface, "_global_mapping", fresh)
    assert IMPLEMENTATION not in ExpertsInterface()
    shell = build_shell(description)
    assert IMPLEMENTATION in ExpertsInterface()
    assert sum(isinstance(m, QuantizedExperts) for m in shell.modules()) == 2 * MOE_MODEL["layers"]


def test_set_storage_re_views_each_expert(seed):
    gen = torch.Generator().manual_seed(seed)
    # 27 * 31 = 837 codes per expert: 419 bytes, which no wider storage divides
    weight = torch.randn((3, 27, 31), generator=gen)
    experts = QuantizedExperts.quantize(weight, QuantConfig("nf4", 64, True, None))
    want = experts.dequantize(torch.float32)
    code_bytes = experts.weight.reshape(3, -1).clone()
    for storage in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8):
        experts.set_storage(storage)
        size = torch.empty((), dtype=storage).element_size()
        assert experts.weight.dtype == storage and not experts.weight.requires_grad
        assert tuple(experts.weight.shape) == (3, -(-419 // size), 1)
        assert torch.equal(experts.weight.reshape(3, -1).view(torch.uint8)[:, :419], code_bytes)
        assert torch.equal(experts.dequantize(torch.float32), want)
    int8 = QuantizedExperts.quantize(weight, QuantConfig("int8", compute_dtype=None))
    with pytest.raises(ValueError, match="int8"):
        int8.set_storage(torch.bfloat16)


def test_fsdp_storage_and_resident_bytes_count_the_experts(moe_dir):
    loaded = _load(moe_dir, **_QUANT["nf4_bf16_storage"])
    model = trilora.get_peft_model(loaded, lora_config(), compute_dtype=torch.float32)
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert experts and linears
    # bf16-stored codes under an fp32 mixed-precision policy: every quantized weight's codes,
    # experts included, are re-viewed as fp32 so that FSDP2 never casts them
    assert match_storage(model, torch.float32) == len(experts) + len(linears)
    assert {m.weight.dtype for m in experts + linears} == {torch.float32}
    held = resident_bytes(model)

    def nbytes(t):
        return t.numel() * t.element_size()

    assert held["base_weights"] == sum(nbytes(m.weight) for m in experts + linears)
    state = {id(b): b for m in experts + linears for b in m.buffers(recurse=False)}
    assert held["quant_state"] == sum(nbytes(b) for b in state.values())
    lora = sum(nbytes(p) for p in model.parameters() if p.requires_grad)
    assert held["trainable"] == lora
    # trilora mem's per-rank model groups the same bytes: codes sharded, state replicated
    # (one copy per module, as a sharded rank holds it)
    groups, replicated = sharding_groups(model, 2, torch.float32)
    assert sum(g.full.get("base_weights", 0) for g in groups) == held["base_weights"]
    per_module = sum(nbytes(b) for m in experts + linears for b in m.buffers(recurse=False))
    assert replicated["quant_state"] == per_module
