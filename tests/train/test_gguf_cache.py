"""A .gguf model is converted to a Hugging Face folder once per file content: every copy of
the same file (one per virtual environment, each at its own path) reuses that folder.

The GGUF files are real (written with the gguf package, read by transformers' GGUF loader),
only tiny."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from train_helpers import write_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TRILORA_CACHE", str(folder))
    return folder


def test_copies_of_one_gguf_share_one_conversion(tmp_path, cache):
    from trilora.train.model import gguf_digest, gguf_to_folder

    first = write_tiny_gguf(tmp_path / "venv-a" / "site-packages" / "tiny.gguf", seed=1)
    second = tmp_path / "venv-b" / "lib" / "tiny.gguf"
    second.parent.mkdir(parents=True)
    shutil.copy(first, second)  # same bytes, another path and modification time
    os.utime(second, (time.time() + 100, time.time() + 100))
    said: list[str] = []
    folder = gguf_to_folder(first, log=said.append)
    assert len(said) == 1 and "reading tiny.gguf" in said[0]  # converted once
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert gguf_to_folder(second, log=said.append) == folder
    assert len(said) == 1  # the second copy found the first one's folder
    # another file: its own folder
    other = write_tiny_gguf(tmp_path / "venv-c" / "tiny.gguf", seed=2)
    assert gguf_to_folder(other, log=said.append) != folder and len(said) == 2
    # the digest is remembered per path, size and modification time: no second read...
    digests = (cache / "gguf" / "digests.json").read_text()
    assert str(first.resolve()) in digests and str(second.resolve()) in digests
    assert gguf_digest(second) == gguf_digest(first)
    # ...and a changed file is read again
    shutil.copy(other, second)
    assert gguf_digest(second) == gguf_digest(other) != gguf_digest(first)
