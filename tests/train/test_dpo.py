"""DPO: loss and gradients against a float64 definition, and against TRL's DPOTrainer."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import save_tiny_lm, write_jsonl

from trilora.train import data as D
from trilora.train.config import TrainConfig
from trilora.train.losses import sequence_logps
from trilora.train.methods.dpo import dpo_losses
from trilora.train.model import base_model_mode, load_model


def _pairs(n=6, seed=0):
    import random

    rng = random.Random(seed)
    w = ["red", "green", "blue", "cyan", "magenta", "yellow", "black"]
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(w) for _ in range(rng.randint(1, 5)))
        chosen = " ".join(rng.choice(w) for _ in range(rng.randint(1, 6)))
        rejected = " ".join(rng.choice(w) for _ in range(rng.randint(1, 6)))
        if i % 2:
            prompt = [{"role": "user", "content": prompt}]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    save_tiny_lm(root / "m", layers=2, hidden=64)
    write_jsonl(root / "p.jsonl", _pairs(8))
    return root


def _lm(tiny, quant):
    cfg = TrainConfig(
        model=str(tiny / "m"),
        data=str(tiny / "p.jsonl"),
        method="dpo",
        quant=quant,
        lora_dropout=0.0,
        lora_r=4,
    )
    torch.manual_seed(0)
    lm = load_model(cfg, "cpu", log=lambda *_: None)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a policy that differs from the reference
    lm.model.train()
    return lm


def _reference_logps(model, batch):
    """Definition in float64: full logits, log_softmax, completion tokens summed."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = torch.log_softmax(out.logits.double(), -1)[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != D.IGNORE
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def test_dpo_matches_float64_definition(tiny):
    lm = _lm(tiny, "none")
    pairs, _, _ = D.load_dataset(tiny / "p.jsonl", lm.tokenizer, 128, D.PAIR_RECORDS)
    batch = D.collate_pairs(pairs, lm.tokenizer.pad_token_id)
    beta = 0.3
    model = lm.model
    model.zero_grad()
    with torch.no_grad(), base_model_mode(model, True):
        ref = sequence_logps(model, batch)
    pol = sequence_logps(model, batch)
    losses, _, _ = dpo_losses(pol, ref, beta)
    losses.mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    m64 = copy.deepcopy(model).double()
    from trilora.patches.fused_loss import disable_fused_cross_entropy

    disable_fused_cross_entropy(m64)
    m64.zero_grad()
    with torch.no_grad(), m64.disable_adapter():
        ref64 = _reference_logps(m64, batch)
    pol64 = _reference_logps(m64, batch)
    b = len(pairs)
    z = beta * ((pol64[:b] - ref64[:b]) - (pol64[b:] - ref64[b:]))
    loss64 = (-F.logsigmoid(z)).mean()
    loss64.backward()
    torch.testing.assert_close(pol.double(), pol64.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref.double(), ref64, rtol=1e-5, atol=1e-4)
    assert float(losses.mean()) == pytest.approx(float(loss64), rel=1e-5)
    assert abs(float(loss64) - 0.6931) > 1e-3  # the policy really differs from the reference
    for n, p in m64.named_parameters():
        if p.requires_grad:
            err = (ours[n].double() - p.grad).abs().max() / p.grad.abs().max()
            assert err < 1e-4, n


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed")
def test_dpo_matches_trl_dpo_trainer(tiny, tmp_path):
    import warnings

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    lm = _lm(tiny, "nf4")
    model = lm.model
    records = [json.loads(x) for x in (tiny / "p.jsonl").read_text().splitlines()]
    records = [r for r in records if isinstance(r["prompt"], str)][:3]
    beta = 0.2
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        report_to=[],
        per_device_train_batch_size=len(records),
        use_cpu=True,
        max_length=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=lm.tokenizer,
        )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_A" in n:
                p.add_(0.1 * torch.randn_like(p))
    rows = [trainer.train_dataset[i] for i in range(len(records))]
    inputs = trainer.data_collator(rows)
    model.train()
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, dict(inputs))
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    batch = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "labels": inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, D.IGNORE),
    }
    model.zero_grad()
    # TRL treats an adapter that is not freshly initialised (ours has a random lora_B, so
    # that the loss is not log 2) as one being re-trained and loads a frozen copy of it as
    # the reference ("ref"); score the reference the same way here.
    from trl.trainer.utils import use_adapter

    assert "ref" in model.peft_config
    with torch.no_grad(), use_adapter(model, "ref"):
        ref = sequence_logps(model, batch)
    policy = sequence_logps(model, batch)
    with torch.no_grad(), base_model_mode(model, True):
        assert not torch.allclose(sequence_logps(model, batch), policy)
    losses, _, _ = dpo_losses(policy, ref, beta)
    losses.mean().backward()
    assert float(losses.mean()) == pytest.approx(float(trl_loss), rel=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            err = (p.grad - trl_grads[n]).abs().max() / trl_grads[n].abs().max()
            assert err < 1e-4, (n, float(err))


def test_dpo_run_end_to_end(tiny, tmp_path):
    from trilora.train.loop import train

    common = dict(
        model=str(tiny / "m"),
        data=str(tiny / "p.jsonl"),
        method="dpo",
        lora_r=4,
        lora_dropout=0.0,
        max_steps=2,
        batch_size=2,
        val_fraction=0.25,
        compare=0,
        save_every=0,
        progress=False,
        lr=1e-2,
    )
    a = train(TrainConfig(**common, out=str(tmp_path / "a")), quiet=True)
    b = train(TrainConfig(**common, precompute_ref=True, out=str(tmp_path / "b")), quiet=True)
    assert (tmp_path / "b" / "ref_logps.pt").is_file()
    for s in (a, b):
        assert s["base"]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
        assert "eval_chosen_preferred" in s["tuned"]
    # the first step sees the same batch and the same reference either way
    first = lambda d: json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert first("a")["loss"] == pytest.approx(first("b")["loss"], rel=1e-5)
