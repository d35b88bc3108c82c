"""The train and data commands: cheap --help, YAML + flags, print-config, data check, sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.cli import main


def test_help_imports_no_torch_and_documents_defaults():
    code = (
        "import sys, time; t = time.perf_counter(); from trilora.cli import build_parser;"
        "p = build_parser(['train']); h = p._subparsers._group_actions[0].choices['train']"
        ".format_help(); build_parser(['data']); print(time.perf_counter() - t);"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(h)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, help_text = out.stdout.split("\n", 1)
    assert float(seconds) < 0.5
    from dataclasses import fields

    from trilora.train.config import TrainConfig

    flat = " ".join(help_text.split())
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flat, flag
    assert flat.count("(default:") >= len(fields(TrainConfig))


def test_flags_override_yaml_and_print_config(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\ndata: d.jsonl\nlora-r: 8\nlr: 0.001\npacking: true\n")
    assert (
        main(["train", "--config", str(cfg), "--lr", "3e-4", "--no-packing", "--print-config"]) == 0
    )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["lora_r"] == 8 and resolved["lr"] == 3e-4 and resolved["packing"] is False
    assert resolved["lora_alpha"] == 32.0 and resolved["lora_dropout"] == 0.05


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_rank: 8\n", "unknown setting 'lora_rank'"),
        ("lora_r: eight\n", "lora_r: expected int"),
        ("- a\n", "expected a mapping"),
    ],
)
def test_bad_config_file(tmp_path, capsys, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_bad_combinations_are_usage_errors(tmp_path, capsys):
    assert main(["train", "--model", "m", "--data", "d", "--finetune", "full"]) == 2
    assert "add --quant none" in capsys.readouterr().err
    assert main(["train", "--model", "m", "--data", "d", "--method", "dpo", "--packing"]) == 2
    assert "packing applies to SFT" in capsys.readouterr().err


def test_data_check(tmp_path, capsys):
    save_tiny_lm(tmp_path / "m")
    recs = sft_records(12)
    near = "the quick brown fox jumps over the lazy dog near the river bank on a sunny day"
    recs += [recs[0], {"text": near}, {"text": near.replace("sunny", "rainy")}, "{broken"]
    recs.append({"prompt": "p" * 300, "completion": "c"})
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    status = main(
        [
            "data",
            "check",
            str(path),
            "--model",
            str(tmp_path / "m"),
            "--max-seq-len",
            "64",
            "--near-dup",
            "0.6",
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "d.jsonl:16: not valid JSON" in out
    assert "exact duplicates: 2 records in 1 group (1 could go)" in out
    assert "  " + f"{path}:1 = {path}:13" in out.splitlines()
    assert "near-duplicates" in out and "d.jsonl:14 ~ " in out and "d.jsonl:15 (0.78)" in out
    assert "length histogram" in out and "1 have a longer prompt" in out


@pytest.mark.slow  # one training process per value (~12 s of CPU each); our own tabulation
def test_sweep_tabulates_each_value(tmp_path, capsys):
    save_tiny_lm(tmp_path / "m", layers=1, hidden=32)
    write_jsonl(tmp_path / "d.jsonl", sft_records(16))
    out = tmp_path / "sweep"
    status = main(
        [
            "train",
            "--model",
            str(tmp_path / "m"),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--max-steps",
            "1",
            "--compare",
            "0",
            "--val-fraction",
            "0.25",
            "--out",
            str(out),
            "--sweep",
            "lora_r=2,4",
        ]
    )
    assert status == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["lora_r"] for r in rows] == [2, 4]
    assert rows[0]["trainable_params"] * 2 == rows[1]["trainable_params"]
    assert all(r["eval_loss"] > 0 and r["peak_memory"] > 0 for r in rows)
    assert "| lora_r | held-out loss | trainable params" in capsys.readouterr().out


def test_data_check_counts_and_lists_every_copy(tmp_path, capsys):
    recs = sft_records(9, seed=4)
    copies = [2, 5, 6, 8, 11, 12]  # six identical records (line numbers), among others
    others = iter(recs[1:])
    lines = [recs[0] if n in copies else next(others) for n in range(1, 13)]
    lines[9] = lines[3]  # and one pair
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "exact duplicates: 8 records in 2 groups (6 could go)" in out
    listed = [x.strip() for x in out.splitlines() if " = " in x]
    assert " = ".join(f"{path}:{n}" for n in copies) in listed
    assert f"{path}:4 = {path}:10" in listed


def test_help_shows_one_example_per_line():
    """`trilora train --help` as a user sees it (an 80-column terminal): every example of
    the description on its own line, as written."""
    from trilora.commands.train import DESCRIPTION

    examples = [x for x in DESCRIPTION.splitlines() if x.startswith("  ")]
    assert len(examples) >= 5
    env = {**os.environ, "COLUMNS": "80"}
    shown = subprocess.run(
        [sys.executable, "-m", "trilora.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    lines = shown.splitlines()
    for example in examples:
        assert example in lines, example
    assert "examples:" in lines
