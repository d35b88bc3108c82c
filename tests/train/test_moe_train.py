"""trilora train on a tiny mixture of experts: LoRA on the 4-bit experts, the router's
auxiliary loss in the loss and the log, packing, and an adapter vanilla PEFT loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.train.config import TrainConfig
from trilora.train.loop import train

peft = pytest.importorskip("peft")
pytest.importorskip("transformers.integrations.moe")


def test_sft_on_moe(tmp_path, seed):
    save_tiny_lm(tmp_path / "m", arch="qwen3_moe", layers=2, hidden=64, seed=seed % 1000)
    write_jsonl(tmp_path / "d.jsonl", sft_records(12, seed=seed % 1000))
    cfg = TrainConfig(
        model=str(tmp_path / "m"),
        data=str(tmp_path / "d.jsonl"),
        max_steps=2,
        batch_size=2,
        grad_accum=2,
        compare=0,
        save_every=0,
        progress=False,
        val_fraction=0.25,
        packing=True,
        out=str(tmp_path / "out"),
        lr=1e-2,
    )
    train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    steps = [r for r in records if r.get("kind") == "train"]
    assert len(steps) == 2
    assert all(r["aux_loss"] > 0 and torch.isfinite(torch.tensor(r["aux_loss"])) for r in steps)

    adapter = tmp_path / "out" / "adapter"
    keys = set(json.loads((adapter / "adapter_config.json").read_text())["target_parameters"])
    assert {"experts.gate_up_proj", "experts.down_proj"} <= keys
    # Vanilla PEFT on the 16-bit model loads the adapter; its expert factors are trained.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    untouched = copy.deepcopy(base)
    vanilla = peft.PeftModel.from_pretrained(base, adapter)
    lora = peft.get_peft_model_state_dict(vanilla)
    experts_b = [v for k, v in lora.items() if "experts" in k and "lora_B" in k]
    assert experts_b and all(v.abs().max() > 0 for v in experts_b)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(vanilla(ids).logits, untouched(ids).logits)
