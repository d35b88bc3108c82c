"""trilora.merge and `trilora merge`: fp32 merge of dequantized base + LoRA delta."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers_models import load_bnb_4bit, random_batch, save_tiny_model
from torch import nn

import trilora

merge = trilora.merge

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

warnings.filterwarnings("ignore")


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_merge_accuracy_and_requantize_error(tmp_path, seed):
    path = save_tiny_model(tmp_path / "m", "llama", seed=seed)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    pm = trilora.patch(peft.get_peft_model(load_bnb_4bit(path), cfg), compute_dtype=torch.float32)
    ids = random_batch(256, seed=seed)
    with torch.no_grad():
        unmerged = pm(ids).logits
    # fp64 reference: the same merge carried out in float64 end to end.
    ref = merge(copy.deepcopy(pm), dtype=torch.float64)
    bf16 = merge(copy.deepcopy(pm), dtype=torch.bfloat16)
    requant = merge(copy.deepcopy(pm), dtype=torch.float32, requantize=True)
    assert all(type(m) is not trilora.Linear4bit for m in bf16.modules())
    assert sum(type(m) is nn.Linear for m in bf16.modules()) == 15
    assert sum(isinstance(m, trilora.Linear4bit) for m in requant.modules()) == 14
    with torch.no_grad():
        exact = ref(ids).logits
        e_unmerged = _rel(unmerged, exact)
        e_bf16 = _rel(bf16(ids).logits, exact)
        e_requant = _rel(requant(ids).logits, exact)
    print(
        f"logits rel. error vs fp64 merge: unmerged fp32 {e_unmerged:.2e}, bf16 merge {e_bf16:.2e}, "
        f"requantized 4-bit {e_requant:.2e}"
    )
    assert e_unmerged < 1e-5  # the fp32 QLoRA model computes the same function
    assert e_bf16 < 2e-2  # bf16 weights and activations: a few 2^-8 roundings per layer
    assert e_requant > 2 * e_bf16  # re-quantizing adds the NF4 error of the whole weight


def test_cli_merge_writes_plain_checkpoint(tmp_path, seed):
    from transformers import AutoModelForCausalLM

    from trilora.cli import main

    path = save_tiny_model(tmp_path / "m", "qwen2", seed=seed)
    base = trilora.from_pretrained(path, compute_dtype=torch.float32, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = trilora.get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        compute_dtype=torch.float32,
    )
    pm.save_pretrained(tmp_path / "ad")
    ids = random_batch(256, seed=seed)
    with torch.no_grad():
        expect = pm(ids).logits
    assert (
        main(
            [
                "merge",
                str(tmp_path / "ad"),
                "--base",
                str(path),
                "--out",
                str(tmp_path / "out"),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert _rel(merged(ids).logits, expect) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "m", "out"]


def test_cli_merge_missing_adapter(tmp_path, capsys):
    from trilora.cli import main

    path = save_tiny_model(tmp_path / "m", "llama")
    (tmp_path / "nope").mkdir()
    argv = ["merge", str(tmp_path / "nope"), "--base", str(path), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 1  # one line, no traceback (tests/test_cli_merge.py has the rest)
    err = capsys.readouterr().err.strip()
    assert "adapter_config.json" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
