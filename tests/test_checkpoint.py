"""Checkpointing (with MLP chunks and offload) gives the gradients of the plain model."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from trilora.checkpoint import disable_checkpointing, enable_checkpointing, find_decoder_layers


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager",
    )  # fmt: skip
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
