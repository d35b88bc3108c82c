"""Other PEFT methods over the 4-bit base, full fine-tuning, --merge, bad output folders."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.io import UsageError
from trilora.train.config import TrainConfig
from trilora.train.loop import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    save_tiny_lm(root / "m", layers=2, hidden=64)
    write_jsonl(root / "d.jsonl", sft_records(16))
    return root


def _cfg(tiny, out, **kw):
    base = dict(
        model=str(tiny / "m"),
        data=str(tiny / "d.jsonl"),
        max_steps=2,
        batch_size=4,
        compare=1,
        max_new_tokens=4,
        save_every=0,
        progress=False,
        val_fraction=0.25,
        out=str(out),
        lr=1e-2,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "peft_config",
    [
        {
            "peft_type": "IA3",
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        },
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4},
    ],
    ids=["ia3", "prefix"],
)
def test_other_peft_methods_save_a_normal_adapter(tiny, tmp_path, peft_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pc = tmp_path / "peft.json"
    pc.write_text(json.dumps(peft_config))
    s = train(_cfg(tiny, tmp_path / "run", finetune="peft", peft_config=str(pc)), quiet=True)
    assert s["tuned"]["eval_loss"] > 0 and s["trainable_params"] > 0
    adapter = tmp_path / "run" / "adapter"
    assert (
        json.loads((adapter / "adapter_config.json").read_text())["peft_type"]
        == peft_config["peft_type"]
    )
    base = AutoModelForCausalLM.from_pretrained(tiny / "m")
    pm = PeftModel.from_pretrained(base, adapter)  # vanilla PEFT loads it
    with torch.no_grad():
        assert torch.isfinite(pm(torch.tensor([[1, 2, 3]])).logits).all()


def test_full_finetune_and_lora_merge(tiny, tmp_path):
    s = train(_cfg(tiny, tmp_path / "full", finetune="full", quant="none"), quiet=True)
    assert s["trainable_params"] == s["total_params"]
    assert (tmp_path / "full" / "model" / "config.json").is_file()
    s = train(_cfg(tiny, tmp_path / "lora", merge=True, rslora=True), quiet=True)
    assert (tmp_path / "lora" / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())[
        "use_rslora"
    ]


def test_output_folder_holding_another_run(tiny, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, out, compare=0), quiet=True)
    with pytest.raises(
        UsageError, match="holds another run; pass --resume to continue it or --overwrite"
    ):
        train(_cfg(tiny, out, compare=0), quiet=True)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(UsageError):
        train(_cfg(tiny, out, compare=0), quiet=True)
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing touched
    other = tmp_path / "user-folder"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        train(_cfg(tiny, other, compare=0), quiet=True)


def _standalone_generate(folder, prompt: str) -> str:
    """Plain transformers, nothing of trilora: load, tokenize, generate, decode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5 or out[0, -1] == tok.eos_token_id
    return tok.decode(out[0], skip_special_tokens=True)


def test_merged_folders_load_and_generate_alone(tiny, tmp_path, capsys):
    """`trilora merge` and `trilora train --merge` write the base's tokenizer beside the
    merged weights, so the folder is a complete model for plain transformers."""
    from transformers import AutoTokenizer

    from trilora.cli import main

    s = train(_cfg(tiny, tmp_path / "run", merge=True), quiet=True)
    base_tok = AutoTokenizer.from_pretrained(tiny / "m")
    cli_out = tmp_path / "merged-cli"
    assert (
        main(
            [
                "merge",
                s["output"],
                "--base",
                str(tiny / "m"),
                "--out",
                str(cli_out),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert "note:" not in capsys.readouterr().err
    text = "repeat gamma delta"
    for folder in (cli_out, tmp_path / "run" / "merged"):
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok(text)["input_ids"] == base_tok(text)["input_ids"]
        assert tok.chat_template == base_tok.chat_template
        assert _standalone_generate(folder, text).startswith(text)
    # --requantize writes the tokenizer too
    requant = tmp_path / "merged-4bit"
    assert (
        main(
            ["merge", s["output"], "--base", str(tiny / "m"), "--out", str(requant), "--requantize"]
        )
        == 0
    )
    assert AutoTokenizer.from_pretrained(requant)(text)["input_ids"] == base_tok(text)["input_ids"]


def test_merge_takes_the_adapters_tokenizer_when_the_base_has_none(tiny, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    from trilora.cli import main

    s = train(_cfg(tiny, tmp_path / "run"), quiet=True)  # adapter/ holds the tokenizer
    bare = tmp_path / "bare-base"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / "m" / name, bare / name)
    out = tmp_path / "merged"
    assert main(["merge", s["output"], "--base", str(bare), "--out", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err
    assert AutoTokenizer.from_pretrained(out).chat_template
    # neither has one: a note says so, the merge itself succeeds
    for f in (tmp_path / "run" / "adapter").iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            f.unlink()
    assert main(["merge", s["output"], "--base", str(bare), "--out", str(tmp_path / "m2")]) == 0
    assert "holds a tokenizer" in capsys.readouterr().err
