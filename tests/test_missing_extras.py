"""A command that needs an optional package which is not installed says in one line which
extra to install (trilora.io.require), before it does any work, never an internal error.

A package is made missing for real: ``sys.modules[name] = None`` makes every ``import name``
in this process raise ``ModuleNotFoundError``, as it does where the package is absent.
"""

from __future__ import annotations

import json
import sys

import pytest

from trilora.cli import main
from trilora.io import MissingExtra, UserError, require
from trilora.io.extras import OPTIONAL


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "hidden, argv, extra",
    [
        ("bitsandbytes", ["mem", "qwen2.5-0.5b", "--seq-len", "256", "--baseline"], "bench"),
        ("matplotlib", ["mem", "qwen2.5-0.5b", "--sweep", "256,512"], "train"),
    ],
)
def test_mem_names_the_extra(hidden, argv, extra, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, hidden, None)
    err = _one_line_error(capsys, argv)
    assert f'pip install "trilora[{extra}]"' in err and hidden in err
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_train_config_without_yaml(monkeypatch, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora_r: 8\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    err = _one_line_error(capsys, ["train", "--config", str(config)])
    assert 'pip install "trilora[train]" (or pip install pyyaml)' in err


@pytest.mark.parametrize(
    "hidden, flags",
    [("tensorboard", ["--tensorboard"]), ("gguf", [])],
)
def test_train_checks_extras_before_loading(hidden, flags, monkeypatch, capsys, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    monkeypatch.setitem(sys.modules, hidden, None)
    argv = [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        *flags,
    ]
    err = _one_line_error(capsys, argv)
    assert hidden in err and "pip install" in err
    assert not (tmp_path / "run").exists()


def test_require_names_extra_or_package(monkeypatch):
    for module, (dist, extra) in OPTIONAL.items():
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(MissingExtra) as exc:
            require(module, "some feature")
        text = str(exc.value)
        assert isinstance(exc.value, UserError) and text.startswith("some feature needs")
        assert f"pip install {dist}" in text
        assert (f'"trilora[{extra}]"' in text) == (extra is not None)
    assert require("json", "x") is json


def test_extras_named_exist_in_pyproject():
    from pathlib import Path

    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for module, (dist, extra) in OPTIONAL.items():
        if extra is not None:
            assert any(req.lower().startswith(dist) for req in extras[extra]), (module, extra)
