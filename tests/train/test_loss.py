"""Packing equals no packing; accumulation is normalised by the real token count."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.train import data as D
from trilora.train.config import TrainConfig
from trilora.train.losses import sft_loss, token_losses
from trilora.train.model import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_lm(root / "m", layers=2, hidden=64)
    write_jsonl(root / "d.jsonl", sft_records(32, seed=3))
    return root


def _model(tiny, quant="nf4", seed=0):
    cfg = TrainConfig(
        model=str(tiny / "m"), data=str(tiny / "d.jsonl"), quant=quant, lora_dropout=0.0, lora_r=4
    )
    torch.manual_seed(seed)
    lm = load_model(cfg, "cpu", log=lambda *_: None)
    with torch.no_grad():  # non-zero B so that both LoRA factors get gradients
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lm.model.train()
    return lm


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _examples(lm, tiny, n=9):
    examples, _, _ = D.load_dataset(tiny / "d.jsonl", lm.tokenizer, 128)
    return examples[:n]


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_packed_loss_and_gradients_equal_unpacked(tiny, quant):
    lm = _model(tiny, quant)
    exs = _examples(lm, tiny)
    pad = lm.tokenizer.pad_token_id
    unpacked = D.collate([[e] for e in exs], pad)
    rows = D.pack(exs, 128)
    assert len(rows) < len(exs)
    packed = D.collate(rows, pad)
    assert "position_ids" in packed
    n = int((unpacked["labels"] != D.IGNORE).sum())
    assert n == int((packed["labels"] != D.IGNORE).sum())
    lu, gu = _grads(lm.model, lambda: sft_loss(lm.model, unpacked, n))
    lp, gp = _grads(lm.model, lambda: sft_loss(lm.model, packed, n))
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-6)
    assert gu.keys() == gp.keys() and len(gu) > 0
    for name in gu:
        torch.testing.assert_close(gp[name], gu[name], rtol=1e-4, atol=1e-6, msg=name)
    # per-token losses too (evaluation path), matched position by position
    with torch.no_grad():
        tu = token_losses(lm.model, unpacked)
        tp = token_losses(lm.model, packed)
    per_u = [tu[b][unpacked["labels"][b].roll(-1) != D.IGNORE] for b in range(len(exs))]
    mask_p = packed["labels"].roll(-1, dims=1) != D.IGNORE
    mask_p[:, -1] = False
    torch.testing.assert_close(
        torch.cat([tp[b][mask_p[b]] for b in range(len(rows))]).sort()[0],
        torch.cat(per_u).sort()[0],
        rtol=1e-5,
        atol=1e-6,
    )
    # the test can fail: positions that do not restart per example change the loss
    wrong = dict(
        packed,
        position_ids=torch.arange(packed["input_ids"].shape[1])
        .expand_as(packed["input_ids"])
        .contiguous(),
    )
    with torch.no_grad():
        assert not torch.allclose(sft_loss(lm.model, wrong, n), lu, rtol=1e-4)


def test_accumulation_is_normalised_by_tokens_across_micro_batches(tiny):
    lm = _model(tiny)
    exs = _examples(lm, tiny, 8)
    pad = lm.tokenizer.pad_token_id
    short = sorted(exs, key=len)[:4]
    long = sorted(exs, key=len)[4:]
    a, b = D.collate([[e] for e in short], pad), D.collate([[e] for e in long], pad)
    whole = D.collate([[e] for e in short + long], pad)
    na, nb = (int((x["labels"] != D.IGNORE).sum()) for x in (a, b))
    assert na != nb
    _, g_whole = _grads(lm.model, lambda: sft_loss(lm.model, whole, na + nb))
    _, g_acc = _grads(
        lm.model, lambda: sft_loss(lm.model, a, na + nb) + sft_loss(lm.model, b, na + nb)
    )
    _, g_naive = _grads(
        lm.model, lambda: (sft_loss(lm.model, a, na) + sft_loss(lm.model, b, nb)) / 2
    )
    for name in g_whole:
        torch.testing.assert_close(g_acc[name], g_whole[name], rtol=1e-4, atol=1e-6)
    # averaging per micro-batch would weight the short examples' tokens more
    assert any(not torch.allclose(g_naive[n], g_whole[n], rtol=1e-3) for n in g_whole)


def test_loop_accumulation_matches_one_big_batch(tiny, tmp_path):
    from trilora.train.loop import train

    def run(batch, accum, out):
        cfg = TrainConfig(
            model=str(tiny / "m"),
            data=str(tiny / "d.jsonl"),
            quant="nf4",
            lora_dropout=0.0,
            lora_r=4,
            batch_size=batch,
            grad_accum=accum,
            max_steps=3,
            group_by_length=False,
            val_fraction=0.0,
            save_every=0,
            compare=0,
            out=str(tmp_path / out),
            progress=False,
            lr=1e-2,
        )
        train(cfg, quiet=True)
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    small = run(4, 2, "a")
    big = run(8, 1, "b")
    assert [r["tokens"] for r in small] != [] and len(small) == len(big) == 3
    for x, y in zip(small, big):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
