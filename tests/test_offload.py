"""Frozen input-embedding offload: same outputs and gradients as the model it wraps."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trilora.patches.embedding_offload import (
    OffloadedEmbedding,
    offload_input_embeddings,
    restore_input_embeddings,
)


def _model(tied: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double()  # float64 reference numerics
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


def _step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def test_outputs_and_gradients_match(seed):
    ref = _model()
    off = _model()
    off.load_state_dict(ref.state_dict())
    keys = set(off.state_dict())
    wrapped = offload_input_embeddings(off)
    assert isinstance(wrapped, OffloadedEmbedding)
    assert off.get_input_embeddings() is wrapped
    assert set(off.state_dict()) == keys  # same checkpoint keys
    ids = torch.randint(0, 97, (2, 17))
    logits_r, loss_r, grads_r = _step(ref, ids)
    logits_o, loss_o, grads_o = _step(off, ids)
    torch.testing.assert_close(logits_o, logits_r, rtol=0, atol=0)
    torch.testing.assert_close(loss_o, loss_r, rtol=0, atol=0)
    assert grads_o.keys() == grads_r.keys() and len(grads_r) > 0
    for n in grads_r:
        torch.testing.assert_close(grads_o[n], grads_r[n], rtol=0, atol=0)
    assert "embed_tokens.weight" not in "".join(grads_o)


def test_table_stays_on_host_across_moves():
    model = _model()
    wrapped = offload_input_embeddings(model)
    table = wrapped.weight
    model.to(torch.float32)  # the table follows dtype changes but stays on the host
    assert wrapped.weight is table and table.dtype == torch.float32 and table.device.type == "cpu"
    assert wrapped.inner.weight is table and model.lm_head.weight.dtype == torch.float32
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 97)
    assert offload_input_embeddings(model) is wrapped  # idempotent
    restore_input_embeddings(model)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)


def test_tied_or_trainable_embeddings_are_refused():
    tied = _model(tied=True)
    assert tied.get_input_embeddings().weight is tied.lm_head.weight
    with pytest.warns(RuntimeWarning, match="tied"):
        assert offload_input_embeddings(tied) is None
    assert isinstance(tied.get_input_embeddings(), torch.nn.Embedding)
    trainable = _model()
    trainable.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        offload_input_embeddings(trainable)
    with pytest.raises(TypeError, match="integer token ids"):
        offload_input_embeddings(_model())(torch.zeros(2))
    with pytest.raises(ValueError, match="get_input_embeddings"):
        offload_input_embeddings(torch.nn.Linear(2, 2))
