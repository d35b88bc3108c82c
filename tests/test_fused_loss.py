"""The fused loss patch gives the model's own loss and gradients, with no logits."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from trilora.patches.fused_loss import disable_fused_cross_entropy, enable_fused_cross_entropy


def _tiny_llama(seed: int, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=151,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
        **extra,
    )
    return LlamaForCausalLM(cfg).train()


def _run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_matches_model_loss(seed):
    model = _tiny_llama(seed)
    ids = torch.randint(0, 151, (2, 19))
    labels = ids.clone()
    labels[1, :7] = -100
    ref, ref_grads = _run(model, ids, labels)
    assert enable_fused_cross_entropy(model, chunk_size=8)
    out, grads = _run(model, ids, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # num_items_in_batch: sum over tokens divided by the given count
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(
        out.loss, ref.loss * (labels[:, 1:] != -100).sum() / 50, rtol=1e-5, atol=1e-6
    )
    # without labels: the original forward, logits included
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 19, 151)
    disable_fused_cross_entropy(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_peft_model(seed):
    model = _tiny_llama(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    ids = torch.randint(0, 151, (1, 23))
    ref, ref_grads = _run(peft_model, ids, ids)
    assert ref_grads and all("lora_" in n for n in ref_grads)
    assert enable_fused_cross_entropy(peft_model)
    out, grads = _run(peft_model, ids, ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_unsupported_head_falls_back(seed):
    model = _tiny_llama(seed, tie_word_embeddings=False)
    model.config.logits_scaling = 4.0
    with pytest.warns(RuntimeWarning, match="logits_scaling"):
        assert not enable_fused_cross_entropy(model)
    with pytest.raises(TypeError, match="get_output_embeddings"):
        enable_fused_cross_entropy(torch.nn.Linear(2, 2))


def test_patched_peft_model_trains_without_logits(seed):
    """trilora.get_peft_model wires the fused loss in: no logits in training, same loss."""
    import trilora

    model = _tiny_llama(seed)
    ids = torch.randint(0, 151, (2, 13))
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    pm = trilora.get_peft_model(model, cfg, compute_dtype=torch.float32)
    pm.train()
    train_out = pm(input_ids=ids, labels=ids)
    assert train_out.logits is None
    pm.eval()  # no dropout here, so eval computes the same function through the full logits
    eval_out = pm(input_ids=ids, labels=ids)
    assert eval_out.logits is not None and eval_out.logits.shape == (2, 13, 151)
    torch.testing.assert_close(train_out.loss, eval_out.loss, rtol=1e-5, atol=1e-6)
    off = trilora.get_peft_model(_tiny_llama(seed), cfg, fused_cross_entropy=False).train()
    assert off(input_ids=ids, labels=ids).logits is not None


def test_one_fusability_rule_for_training_evaluation_and_logps(seed):
    """A head whose forward is not ``h @ W.T`` (an nn.Linear subclass) is refused by the
    training loss and scored through its logits by evaluation alike: both follow
    fused_head_unsupported (training used to accept any nn.Linear subclass)."""
    import torch.nn.functional as F

    from trilora.train.losses import token_losses

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3.0

    model = _tiny_llama(seed, tie_word_embeddings=False)
    plain = model.lm_head
    model.lm_head = Scaled(plain.in_features, plain.out_features, bias=False)
    model.lm_head.weight = plain.weight
    with pytest.warns(RuntimeWarning, match="Scaled"):
        assert not enable_fused_cross_entropy(model)
    ids = torch.randint(0, 151, (2, 11))
    labels = ids.clone()
    ref = F.cross_entropy(
        model(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    got = token_losses(model, batch)[:, :-1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    model.train()
    assert model(input_ids=ids, labels=labels).logits is not None  # not fused in training
