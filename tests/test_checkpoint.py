"""Checkpointing (with MLP chunks and offload) gives the gradients of the plain model."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from trilora.patches.activation_checkpointing import (
    disable_checkpointing,
    enable_checkpointing,
    find_decoder_layers,
)


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).double().train()


def _grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mlp_chunks": 3},
        {"offload": True},
        {"offload": True, "mlp_chunks": 2, "pin_memory_budget": 1 << 20},
    ],
)
def test_gradients_match_plain_model(seed, kwargs):
    model = _tiny_llama(seed)
    ids = torch.randint(0, 97, (2, 23))
    labels = ids.clone()
    labels[0, :5] = -100
    loss_ref, ref = _grads(model, ids, labels)
    state = enable_checkpointing(model, **kwargs)
    assert len(state.layers) == 3
    loss, got = _grads(model, ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_simulated_offload_moves_layer_inputs(seed):
    # The offload bookkeeping (pack in forward, prefetch of the previous layer in backward)
    # on CPU tensors, in the mode trilora mem uses; values travel through host copies.
    model = _tiny_llama(seed)
    ids = torch.randint(0, 97, (1, 16))
    _, ref = _grads(model, ids, ids)
    state = enable_checkpointing(model, offload=True)
    state.simulate = True
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    per_layer = 16 * 64 * 8  # [1, 16, 64] float64
    assert state.offloaded_bytes == 2 * per_layer  # all layers but the last
    loss.backward()
    assert state.offloaded_bytes == 0 and state.peak_offloaded_bytes == 2 * per_layer
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_budget_exhaustion_warns_and_keeps_on_device(seed):
    model = _tiny_llama(seed)
    state = enable_checkpointing(model, offload=True, pin_memory_budget=100)
    state.simulate = True
    ids = torch.randint(0, 97, (1, 16))
    with pytest.warns(RuntimeWarning, match="budget"):
        loss = model(input_ids=ids, labels=ids).loss
    assert state.offloaded_bytes == 0 and state.fallbacks == 2
    loss.backward()


def test_disable_and_discovery(seed):
    model = _tiny_llama(seed)
    assert find_decoder_layers(model) is model.model.layers
    # fallback: a plain container with the blocks in a ModuleList
    holder = nn.Module()
    holder.blocks = nn.ModuleList([copy.deepcopy(model.model.layers[0]) for _ in range(4)])
    holder.other = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
    assert find_decoder_layers(holder) is holder.blocks
    enable_checkpointing(model, mlp_chunks=2)
    assert "forward" in model.model.layers[0].__dict__
    disable_checkpointing(model)
    assert "forward" not in model.model.layers[0].__dict__
    assert "forward" not in model.model.layers[0].mlp.__dict__
    with pytest.raises(ValueError, match="decoder layers"):
        enable_checkpointing(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mlp_chunks"):
        enable_checkpointing(model, mlp_chunks=0)


def _caches(output):
    """The KV cache objects a model output carries, whatever the release names the field."""
    from transformers import Cache

    return [v for v in output.values() if isinstance(v, Cache)]


@pytest.mark.parametrize("pass_use_cache", [False, True], ids=["config-default", "use_cache"])
def test_training_loop_with_grouped_attention_keeps_no_kv_cache(seed, pass_use_cache):
    # A plain training loop: transformers models default to use_cache=True (or it is passed),
    # so every decoder layer is handed a KV cache, under whatever keyword the release uses
    # (transformers 5.24 renamed it to `cache=`). A cache in a checkpointed layer gets the
    # keys/values twice (the recompute appends again: with grouped-query attention the
    # recompute then sees twice the keys and checkpointing raises) and keeps every layer's
    # keys/values alive until the step ends.
    from trilora import enable_grouped_attention

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    ref = LlamaForCausalLM(cfg).train()
    model = copy.deepcopy(ref)
    for m in (ref, model):
        enable_grouped_attention(m)
    enable_checkpointing(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, model)]
    extra = {"use_cache": True} if pass_use_cache else {}
    for _ in range(3):
        ids = torch.randint(0, 97, (2, 64))
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad(set_to_none=True)
            out = m(input_ids=ids, labels=ids, **extra)
            if m is model:
                # no layer kept its keys and values
                assert all(c.get_seq_length() == 0 for c in _caches(out))
            out.loss.backward()
            opt.step()
            losses.append(out.loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_inference_keeps_the_kv_cache(seed):
    # Without gradients nothing is checkpointed, so generation keeps its cache.
    model = _tiny_llama(seed)
    enable_checkpointing(model)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert [c.get_seq_length() for c in _caches(out)] == [9]


class _CachedBlock(nn.Module):
    """A decoder block that appends to a transformers cache passed under any name."""

    def __init__(self, index: int, width: int):
        super().__init__()
        self.index = index
        self.proj = nn.Linear(width, width, dtype=torch.float64)

    def forward(self, x, memory=None, **kwargs):
        memory = memory if memory is not None else kwargs.get("kv_store_of_the_future")
        k = self.proj(x)
        if memory is not None:
            k, _ = memory.update(k[:, None], k[:, None], self.index)
            k = k[:, 0]
        return x + torch.tanh(k).mean(dim=1, keepdim=True) * x


class _CachedStack(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList([_CachedBlock(i, width) for i in range(depth)])

    def forward(self, x, cache, positional):
        for layer in self.layers:
            x = layer(x, cache) if positional else layer(x, kv_store_of_the_future=cache)
        return x


@pytest.mark.parametrize("positional", [True, False], ids=["positional", "unknown-keyword"])
def test_cache_is_dropped_by_type_not_by_keyword(seed, positional):
    from transformers import DynamicCache

    model = _CachedStack()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    # reference: the same computation with no cache at all
    model(x, None, positional).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    enable_checkpointing(model)
    cache = DynamicCache()
    model(x, cache, positional).square().sum().backward()
    assert cache.get_seq_length() == 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-12, atol=1e-12, msg=n)
