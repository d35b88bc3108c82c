"""`trilora merge` and the library paths that save: nothing a user owns is ever deleted, and
every mistake is one line.

The model and adapter are real: a tiny Llama built from a transformers config, loaded by
trilora, with a LoRA adapter saved by PEFT (as tests/test_merge.py does).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers_files import mode, umask
from helpers_models import random_batch, save_tiny_model

import trilora
from trilora.cli import main
from trilora.io import UsageError

pytest.importorskip("peft")
from peft import LoraConfig

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base folder, a second base of another width, and an adapter made for the first."""
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_model(root / "base", "llama", seed=1)
    other = save_tiny_model(root / "other-base", "llama", hidden=32, seed=2)
    model = trilora.from_pretrained(base, compute_dtype=torch.float32, dtype=torch.float32)
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = trilora.get_peft_model(model, cfg, compute_dtype=torch.float32)
    pm.save_pretrained(root / "adapter")
    with torch.no_grad():
        ids = random_batch(256, seed=4)
        logits = pm(ids).logits
    return {"base": base, "other": other, "adapter": root / "adapter", "ids": ids, "logits": logits}


@pytest.fixture
def work(tmp_path, models, monkeypatch):
    """A user's working folder holding a copy of the adapter and a file of their own; cwd."""
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copytree(models["adapter"], folder / "ad")
    (folder / "notes.txt").write_text("mine")
    monkeypatch.chdir(folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trilora merge: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "size mismatch" not in err
    return lines[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def merged_logits(folder: Path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


# --- section 2: nothing a user owns is deleted ---------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_merge_out_dot_keeps_the_working_folder(work, models, capsys, overwrite):
    """The reported case: `trilora merge ADAPTER --base BASE --out .` deleted the cwd."""
    before = snapshot(work)
    status = main(["merge", "ad", "--base", str(models["base"]), "--out", ".", *overwrite])
    assert status == 2
    assert "current directory" in error_line(capsys)
    assert snapshot(work) == before
    assert Path.cwd() == work and work.is_dir()


@pytest.mark.parametrize("target", ["adapter", "base", "parent", "home"])
def test_merge_never_replaces_an_input_or_a_parent(work, models, capsys, target):
    out = {
        "adapter": work / "ad",
        "base": models["base"],
        "parent": work.parent,
        "home": Path.home(),
    }[target]
    watched = work if target in ("adapter", "parent") else models["base"]
    before = snapshot(watched) if target != "home" else None
    argv = ["merge", "ad", "--base", str(models["base"]), "--out", str(out), "--overwrite"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "holds an input" in line or "current directory" in line
    if before is not None:
        assert snapshot(watched) == before


def test_merge_refuses_a_non_empty_out_unless_overwrite(work, models, capsys):
    out = work / "merged"
    out.mkdir()
    (out / "old.bin").write_bytes(b"old")
    argv = ["merge", "ad", "--base", str(models["base"]), "--out", str(out), "--dtype", "fp32"]
    assert main(argv) == 2
    assert "--overwrite" in error_line(capsys)
    assert snapshot(out) == {"old.bin": b"old"}
    assert main([*argv, "--overwrite"]) == 0
    assert "old.bin" not in snapshot(out)
    assert rel(merged_logits(out, models["ids"]), models["logits"]) < 1e-5
    # no temporary or backup folder left next to it
    assert sorted(p.name for p in work.iterdir()) == ["ad", "merged", "notes.txt"]


def test_merge_refuses_a_file_as_out(work, models, capsys):
    (work / "merged").write_text("a file of mine")
    argv = ["merge", "ad", "--base", str(models["base"]), "--out", "merged", "--overwrite"]
    assert main(argv) == 2
    assert "not a folder" in error_line(capsys)
    assert (work / "merged").read_text() == "a file of mine"
    assert sorted(p.name for p in work.iterdir()) == ["ad", "merged", "notes.txt"]


@pytest.mark.parametrize("mask", [0o002, 0o077])
def test_merged_folder_follows_the_umask(work, models, mask):
    out = work / "merged"
    with umask(mask):
        assert main(["merge", "ad", "--base", str(models["base"]), "--out", str(out)]) == 0
    assert mode(out) == 0o777 & ~mask
    files = list(out.iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert mode(p) == 0o666 & ~mask, p.name


def test_requantized_merge_obeys_the_same_rules(work, models, capsys):
    out = work / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["merge", "ad", "--base", str(models["base"]), "--out", str(out), "--requantize"]
    assert main(argv) == 2
    assert snapshot(out) == {"keep.txt": b"mine"}
    with umask(0o002):
        assert main([*argv, "--overwrite"]) == 0
    assert "keep.txt" not in snapshot(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert mode(out) == 0o775 and all(mode(p) == 0o664 for p in out.iterdir())
    assert sorted(p.name for p in work.iterdir()) == ["ad", "notes.txt", "q"]


def test_save_quantized_refuses_to_clobber(tmp_path, models):
    model = trilora.from_pretrained(models["base"], compute_dtype=torch.float32)
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="overwrite=True"):
        trilora.save_quantized(model, out)
    assert snapshot(out) == {"keep.txt": b"mine"}
    # never over the folder the model came from, even when asked
    before = snapshot(models["base"])
    with pytest.raises(UsageError, match="holds an input"):
        trilora.save_quantized(model, models["base"], overwrite=True)
    assert snapshot(models["base"]) == before
    with umask(0o002):
        trilora.save_quantized(model, out, overwrite=True)
    assert "keep.txt" not in snapshot(out) and (out / "model.safetensors").is_file()
    assert mode(out / "model.safetensors") == 0o664
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# --- section 3: one line per mistake ---------------------------------------------------


def test_adapter_for_another_base_names_the_base_it_was_made_for(work, models, capsys):
    argv = ["merge", "ad", "--base", str(models["other"]), "--out", "merged"]
    assert main(argv) == 1
    line = error_line(capsys)
    made_for = json.loads((work / "ad" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert made_for and repr(made_for) in line and str(models["other"]) in line
    assert re.search(r"has (64|128) (inputs|outputs) where this base's has (32|64)\b", line)
    assert not (work / "merged").exists()


def test_config_without_hidden_size_names_the_field(work, models, capsys, tmp_path):
    broken = tmp_path / "broken-base"
    shutil.copytree(models["base"], broken)
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["merge", "ad", "--base", str(broken), "--out", "merged"]) == 1
    line = error_line(capsys)
    assert "does not set hidden_size" in line and "config.json" in line
    # the library says the same
    with pytest.raises(trilora.loading.CheckpointError, match="does not set hidden_size"):
        trilora.from_pretrained(broken)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-adapter", "does not exist"),
        ("no-config", "has no adapter_config.json"),
        ("bad-json", "is not valid JSON"),
        ("not-lora", "LoRA adapters (LoraConfig) only"),
        ("dora", "use_dora"),
        ("pissa", "init_lora_weights='pissa'"),
        ("no-base", "does not exist"),
        ("base-is-a-file", "is a file"),
        ("base-without-config", "has no config.json"),
    ],
)
def test_merge_mistakes_are_one_line(work, models, capsys, case, expected):
    adapter, base = work / "ad", models["base"]
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if case == "no-adapter":
        adapter = work / "nothing"
    elif case == "no-config":
        config_file.unlink()
    elif case == "bad-json":
        config_file.write_text("{not json")
    elif case == "not-lora":
        config_file.write_text(
            json.dumps(
                {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}
            )
        )
    elif case in ("dora", "pissa"):
        config.update({"use_dora": True} if case == "dora" else {"init_lora_weights": "pissa"})
        config_file.write_text(json.dumps(config))
    elif case == "no-base":
        base = work / "no-such-base"
    elif case == "base-is-a-file":
        base = work / "notes.txt"
    elif case == "base-without-config":
        base = work / "empty-base"
        base.mkdir()
    argv = ["merge", str(adapter), "--base", str(base), "--out", str(work / "merged")]
    assert main(argv) == 1
    assert expected in error_line(capsys)
    assert not (work / "merged").exists()


def test_merge_library_takes_dtype_names(models):
    model = trilora.from_pretrained(
        models["base"], compute_dtype=torch.float32, dtype=torch.float32
    )
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, str(models["adapter"]))
    merged = trilora.merge(pm, dtype="fp32")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert rel(merged(models["ids"]).logits, models["logits"]) < 1e-5
    with pytest.raises(ValueError, match="dtype must be one of"):
        trilora.merge(pm, dtype="bf17")
    with pytest.raises(ValueError, match="dtype must be bf16, fp16, fp32 or fp64"):
        trilora.merge(pm, dtype="int8")
