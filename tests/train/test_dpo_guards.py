"""DPO's failure mode on screen and its guards: log-probabilities and margin per step, the
collapse warning, --rpo-alpha, --loss-type ipo / robust against float64 and TRL."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_dpo import _lm, _pairs
from train_helpers import save_tiny_lm, write_jsonl

from trilora.train import data as D
from trilora.train.config import TrainConfig
from trilora.train.losses import sequence_logps
from trilora.train.methods.base import MicroBatch, RunContext
from trilora.train.methods.dpo import Dpo, dpo_losses


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_guards")
    save_tiny_lm(root / "m", layers=2, hidden=64)
    write_jsonl(root / "p.jsonl", _pairs(8, seed=3))
    return root


def _float64_loss(pc, pr, rc, rr, nc, nr, beta, kind, eps):
    """The formulas of TRL 1.16's DPOTrainer, written out per pair in float64."""
    out = []
    for i in range(len(pc)):
        d = (pc[i] - rc[i]) - (pr[i] - rr[i])
        ls = lambda x: -math.log1p(math.exp(-x)) if x > -30 else x  # noqa: E731 (log sigmoid)
        if kind == "sigmoid":
            out.append(-ls(beta * d))
        elif kind == "ipo":
            out.append(((pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i] - 1 / (2 * beta)) ** 2)
        else:
            out.append((-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps))
    return out


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "robust"])
def test_loss_types_match_float64_formulas(kind):
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    b = 5
    policy = (torch.randn(2 * b, generator=g) * 4 - 20).requires_grad_()
    reference = torch.randn(2 * b, generator=g) * 4 - 20
    lengths = torch.randint(1, 30, (2 * b,), generator=g)
    beta, eps = 0.1 + torch.rand(1, generator=g).item(), 0.3 * torch.rand(1, generator=g).item()
    losses, _, _ = dpo_losses(policy, reference, beta, kind, eps, lengths)
    p64 = policy.detach().double().requires_grad_()
    pc, pr, rc, rr = p64[:b], p64[b:], reference[:b].double(), reference[b:].double()
    nc, nr = lengths[:b].double(), lengths[b:].double()
    d = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        ref64 = -F.logsigmoid(beta * d)
    elif kind == "ipo":
        ref64 = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    else:
        ref64 = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (
            1 - 2 * eps
        )
    scalar = _float64_loss(
        pc.tolist(),
        pr.tolist(),
        rc.tolist(),
        rr.tolist(),
        nc.tolist(),
        nr.tolist(),
        beta,
        kind,
        eps,
    )
    torch.testing.assert_close(ref64.detach(), torch.tensor(scalar, dtype=torch.float64))
    torch.testing.assert_close(losses.double(), ref64.detach(), rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    ref64.sum().backward()
    torch.testing.assert_close(policy.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)
    if kind != "sigmoid":  # each really differs from the sigmoid loss
        sig, _, _ = dpo_losses(policy.detach(), reference, beta, "sigmoid")
        assert not torch.allclose(sig, losses.detach())


def _method_loss(lm, batch, pairs, cfg, base_mode):
    method = Dpo(cfg)
    run = RunContext(lm.model, cfg, lm.tokenizer, None, base_mode, None, 0, None)
    mb = MicroBatch(batch, list(range(pairs)))
    counts = method.loss_items(mb)
    return method.micro_loss(run, mb, counts)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed")
@pytest.mark.parametrize(
    "ours,theirs",
    [
        ({"loss_type": "ipo"}, {"loss_type": ["ipo"]}),
        (
            {"loss_type": "robust", "label_smoothing": 0.2},
            {"loss_type": ["robust"], "label_smoothing": 0.2},
        ),
        ({"rpo_alpha": 0.7}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),
    ],
    ids=["ipo", "robust", "rpo"],
)
def test_guards_match_trl_dpo_trainer(tiny, tmp_path, ours, theirs):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import use_adapter

    lm = _lm(tiny, "nf4")
    model = lm.model
    records = [json.loads(x) for x in (tiny / "p.jsonl").read_text().splitlines()]
    records = [r for r in records if isinstance(r["prompt"], str)][:3]
    beta = 0.3
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        report_to=[],
        per_device_train_batch_size=len(records),
        use_cpu=True,
        max_length=None,
        **theirs,
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
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
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
    cfg = TrainConfig(model="m", data="d", method="dpo", beta=beta, **ours).validate()
    loss, stats = _method_loss(lm, batch, len(records), cfg, lambda: use_adapter(model, "ref"))
    loss.backward()
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            err = (p.grad - trl_grads[n]).abs().max() / trl_grads[n].abs().max()
            assert err < 1e-4, (n, float(err))
    with torch.no_grad():
        pol = sequence_logps(model, batch)
    assert stats["logp_chosen"] == pytest.approx(float(pol[:3].mean()), rel=1e-5)
    assert stats["logp_margin"] == pytest.approx(float((pol[:3] - pol[3:]).mean()), rel=1e-5)


def test_run_shows_logps_and_warns_on_collapse(tiny, tmp_path, capsys):
    from trilora.train.loop import train

    cfg = TrainConfig(
        model=str(tiny / "m"),
        data=str(tiny / "p.jsonl"),
        method="dpo",
        lora_r=4,
        lora_dropout=0.0,
        max_steps=3,
        batch_size=2,
        val_fraction=0.25,
        compare=0,
        save_every=0,
        progress=False,
        lr=5e-2,
        out=str(tmp_path / "run"),
    )
    train(cfg, quiet=True)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    for r in steps:
        assert r["logp_margin"] == pytest.approx(r["logp_chosen"] - r["logp_rejected"], abs=1e-4)
        assert r["logp_chosen"] < 0 and r["ref_logp_chosen"] < 0
    # step 1 runs the initial policy (lora_B = 0): it is the reference
    assert steps[0]["logp_chosen"] == pytest.approx(steps[0]["ref_logp_chosen"], rel=1e-6)

    method = Dpo(cfg)
    said = []
    method.after_step(
        None, {"step": 4, "logp_chosen": -30.0, "ref_logp_chosen": -29.0}, said.append
    )
    method.after_step(
        None, {"step": 5, "logp_chosen": -31.0, "ref_logp_chosen": -29.0}, said.append
    )
    assert len(said) == 1 and "fell below the reference" in said[0] and "--rpo-alpha" in said[0]
    fine = Dpo(cfg)
    fine.after_step(None, {"step": 1, "logp_chosen": -20.0, "ref_logp_chosen": -29.0}, said.append)
    assert len(said) == 1


def test_dpo_settings_are_checked():
    from trilora.io import UsageError

    def cfg(**kw):
        return TrainConfig(model="m", data="d", **kw).validate()

    with pytest.raises(UsageError, match="--loss-type: --method dpo takes one of sigmoid, ipo"):
        cfg(method="dpo", loss_type="dapo")
    with pytest.raises(UsageError, match="--label-smoothing: applies to --loss-type robust"):
        cfg(method="dpo", label_smoothing=0.1)
    with pytest.raises(UsageError, match="--rpo-alpha: is a DPO setting"):
        cfg(method="sft", rpo_alpha=1.0)
    assert cfg(method="dpo", loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1
