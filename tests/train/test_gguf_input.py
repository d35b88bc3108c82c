"""A .gguf ``--model`` that is not a complete GGUF file gets one line that says so and what
was expected (trilora.train.model.check_gguf), not an error from deep inside the reader."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from trilora.cli import main
from trilora.io import UserError
from trilora.train.model import check_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture
def gguf_file(tmp_path, seed):
    """A small, complete GGUF file (real writer): metadata and three tensors of awkward
    shapes."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_name("tiny")
    for i, shape in enumerate([(37, 19), (5,), (64, 33)]):
        writer.add_tensor(f"t{i}.weight", rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_complete_file_passes(gguf_file):
    check_gguf(gguf_file)


@pytest.mark.parametrize("where", ["header", "index", "data", "last_bytes"])
def test_truncated_file_is_one_clear_error(gguf_file, where, seed):
    data = gguf_file.read_bytes()
    reader = gguf.GGUFReader(gguf_file)
    first_data = min(int(t.data_offset) for t in reader.tensors)
    del reader
    rnd = random.Random(seed)
    cut = {
        "header": rnd.randrange(5, 24),
        "index": rnd.randrange(40, first_data - 8),
        "data": rnd.randrange(first_data + 4, len(data) - 64),
        "last_bytes": len(data) - rnd.randrange(1, 8),
    }[where]
    gguf_file.write_bytes(data[:cut])
    with pytest.raises(
        UserError,
        match=r"(truncated|not a readable GGUF file).*expected a "
        r"complete GGUF model file",
    ) as exc:
        check_gguf(gguf_file)
    assert "\n" not in str(exc.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(UserError, match="not a GGUF file"):
        check_gguf(path)


def test_train_cli_reports_a_truncated_gguf_in_one_line(gguf_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRILORA_CACHE", str(tmp_path / "cache"))  # converted models go there
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: len(data) // 2])
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    rc = main(
        ["train", "--model", str(gguf_file), "--data", str(jsonl), "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "internal error" not in err and "GGUF" in err and str(gguf_file) in err
