"""Grouped causal attention against float64 softmax attention, and its transformers wiring."""

import pytest
import torch
import torch.nn.functional as F
from helpers_models import tiny_config
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM

from trilora.ops import attention as ops_attention
from trilora.ops.attention import (
    flash_attention_ops,
    flash_backward_workspace,
    grouped_causal_attention,
    is_fake_tensor,
)
from trilora.patches import grouped_attention as integration
from trilora.patches.grouped_attention import (
    NAME,
    current_attn_implementation,
    disable_grouped_attention,
    enable_grouped_attention,
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (6, 6), (5, 1)])
def test_matches_reference(seed, dtype, heads):
    hq, hkv = heads
    b, t, d = 2, int(torch.randint(2, 70, ())), 16
    # q in the projections' layout: [B, T, Hq, D] viewed as [B, Hq, T, D]
    q = torch.randn(b, t, hq, d, dtype=dtype).transpose(1, 2).detach().requires_grad_()
    k = torch.randn(b, hkv, t, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, t, d, dtype=dtype, requires_grad=True)
    scale = float(torch.empty(()).uniform_(0.1, 0.5))
    out = grouped_causal_attention(q, k, v, scale)
    assert out.shape == (b, t, hq, d) and out.dtype == dtype
    ref = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, scale=scale, enable_gqa=True
    ).transpose(1, 2)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    refs = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert _rel(out, ref) <= TOL[dtype]
    for g, r, x in zip(grads, refs, (q, k, v)):
        assert g.shape == x.shape
        assert _rel(g, r) <= 2 * TOL[dtype]


def test_backward_workspace_is_one_group_under_fake_tensors():
    b, hq, hkv, t, d = 1, 8, 2, 256, 64
    full = sum(
        torch.Size(s).numel() * dt.itemsize
        for s, dt in flash_backward_workspace(
            torch.empty(b, hq, t, d, dtype=torch.bfloat16), torch.empty(b, hkv, t, d)
        )
    )
    seen = []
    with FakeTensorMode():
        q = torch.empty(b, hq, t, d, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(b, hkv, t, d, dtype=torch.bfloat16, requires_grad=True)
        v = torch.empty(b, hkv, t, d, dtype=torch.bfloat16, requires_grad=True)
        out = grouped_causal_attention(q, k, v)
        from trilora.ops import attention as mod

        orig = mod.flash_backward_workspace

        def spy(qi, ki):
            shapes = orig(qi, ki)
            seen.append(sum(torch.Size(s).numel() * dt.itemsize for s, dt in shapes))
            return shapes

        mod.flash_backward_workspace = spy
        try:
            out.sum().backward()
        finally:
            mod.flash_backward_workspace = orig
    assert len(seen) == hkv
    # one group's workspace at a time: 1/Hkv of the single call's
    assert max(seen) * hkv <= full


def test_bad_input():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="Hkv"):
        grouped_causal_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(TypeError, match="share a dtype"):
        grouped_causal_attention(
            q, torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16).half()
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_parity_and_fallback(seed, arch):
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, hidden=64, layers=2), attn_implementation="sdpa"
    )
    ids = torch.randint(0, 256, (2, 19))
    ref = model(input_ids=ids, labels=ids)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    enable_grouped_attention(model)
    assert current_attn_implementation(model) == NAME
    out = model(input_ids=ids, labels=ids)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # a padding mask is served by transformers' SDPA path: still the same numbers
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    model.set_attn_implementation("sdpa")
    masked_ref = model(input_ids=ids, attention_mask=mask).logits
    enable_grouped_attention(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, masked_ref)
    disable_grouped_attention(model)
    assert current_attn_implementation(model) == "sdpa"


def test_flash_ops_compat_point(seed, monkeypatch):
    """The private aten flash ops are found on this torch; where a release renamed them,
    the op raises a clear error and the transformers integration serves calls with SDPA."""
    assert flash_attention_ops("cpu") is not None and flash_attention_ops("meta") is not None
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", hidden=64, layers=2), attn_implementation="sdpa"
    )
    ids = torch.randint(0, 256, (2, 11))
    ref = model(input_ids=ids, labels=ids)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    monkeypatch.setitem(ops_attention._FLASH_OPS, "cpu", ("_renamed_fwd", "_renamed_bwd"))
    assert flash_attention_ops("cpu") is None
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match=r"torch .* has no aten\._renamed_fwd"):
        grouped_causal_attention(q, k, k.clone())
    enable_grouped_attention(model)  # would raise above if it reached the grouped kernel
    out = model(input_ids=ids, labels=ids)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_attn_implementation_compat_point(monkeypatch):
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", hidden=64, layers=1), attn_implementation="eager"
    )
    assert current_attn_implementation(model) == "eager"
    enable_grouped_attention(model)
    assert current_attn_implementation(model) == NAME
    disable_grouped_attention(model)
    assert current_attn_implementation(model) == "eager"
    disable_grouped_attention(model)  # nothing remembered: a no-op
    assert current_attn_implementation(model) == "eager"

    # A config without the private attribute reads as unknown ...
    class StandIn:
        config = object()

        def set_attn_implementation(self, name):
            raise AssertionError("not called")

    assert current_attn_implementation(StandIn()) is None
    # ... and an unknown previous implementation is restored as transformers' default.
    monkeypatch.setattr(integration, "current_attn_implementation", lambda m: None)
    enable_grouped_attention(model)
    monkeypatch.undo()
    disable_grouped_attention(model)
    assert current_attn_implementation(model) == model.get_correct_attn_implementation(None)


def test_is_fake_tensor(monkeypatch):
    import sys

    real = torch.empty(2)
    with FakeTensorMode():
        fake = torch.empty(2)
    assert is_fake_tensor(fake) and not is_fake_tensor(real)
    # a torch without the private module: nothing can be fake, and nothing raises
    monkeypatch.setitem(sys.modules, "torch._subclasses.fake_tensor", None)
    assert not is_fake_tensor(fake)
