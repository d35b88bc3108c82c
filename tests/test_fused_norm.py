"""trilora.patches.fused_norm: which norms are swapped, and a whole model's parity with eager."""

import pytest
import torch
from helpers_models import tiny_config
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from trilora.patches.fused_norm import (
    disable_fused_rms_norm,
    enable_fused_rms_norm,
    is_llama_rms_norm,
)


def test_structural_match():
    assert is_llama_rms_norm(LlamaRMSNorm(8))
    assert is_llama_rms_norm(Qwen2RMSNorm(8))
    assert not is_llama_rms_norm(GemmaRMSNorm(8))  # (1 + weight): a different function
    assert not is_llama_rms_norm(torch.nn.RMSNorm(8))

    class Edited(LlamaRMSNorm):
        def forward(self, hidden_states):
            return self.weight * hidden_states

    assert not is_llama_rms_norm(Edited(8))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_model_parity(seed, arch):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden=48, layers=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1, 0.2)
    ids = torch.randint(0, 256, (2, 11))
    out = model(input_ids=ids, labels=ids)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    n = enable_fused_rms_norm(model)
    assert n == 2 * 2 + 1  # two per layer and the final norm
    assert enable_fused_rms_norm(model) == n  # idempotent
    fused = model(input_ids=ids, labels=ids)
    fused_grads = torch.autograd.grad(fused.loss, list(model.parameters()))
    torch.testing.assert_close(fused.logits, out.logits, rtol=0, atol=0)
    for g, f in zip(grads, fused_grads):
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-6)
    disable_fused_rms_norm(model)
    assert all("forward" not in m.__dict__ for m in model.modules() if is_llama_rms_norm(m))
