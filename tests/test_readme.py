"""Every ```python block of README.md runs as written.

Each block runs on its own (a fresh namespace: a block must bring its own imports and
inputs) in an empty working folder that holds what the README's placeholders name:
``path/to/llama`` is a tiny Llama with its tokenizer (``trilora.train.tiny_model``), built
from a transformers config. A block the README marks with ``<!-- readme-test: skip REASON
-->`` on the line before it is skipped with that reason; today none is.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*skip\s*(?P<why>.*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```",
                    re.DOTALL)  # fmt: skip


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` of every ```python block."""
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("why"))
            for m in _BLOCK.finditer(text)]  # fmt: skip


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3
    assert README.read_text().count("```python") == len(BLOCKS)


@pytest.fixture(scope="module")
def placeholder_model(tmp_path_factory) -> Path:
    from trilora.train.tiny_model import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("models") / "llama", hidden=64, layers=2)


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, skip, placeholder_model, tmp_path, monkeypatch):
    if skip is not None:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)
    if "path/to/llama" in code:
        shutil.copytree(placeholder_model, tmp_path / "path" / "to" / "llama")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    _check_what_the_comments_say(namespace, tmp_path)


def _check_what_the_comments_say(ns: dict, folder: Path) -> None:
    """What the README's comments promise about the blocks' results."""
    import trilora

    if "w_hat" in ns:  # bf16 [N, N], and a state dict with the bitsandbytes keys
        assert ns["w_hat"].dtype == torch.bfloat16 and ns["w_hat"].shape == ns["w"].shape
        assert {"weight", "weight.absmax", "weight.quant_map"} <= set(ns["sd"])
        assert torch.equal(ns["qw2"].dequantize(), ns["w_hat"])
    if "layer" in ns:  # only the LoRA factors train
        layer = ns["layer"]
        assert ns["y"].shape == (*ns["x"].shape[:-1], layer.out_features)
        trained = {n for n, p in layer.named_parameters() if p.grad is not None}
        assert trained == {"lora_A", "lora_B"}
    if "merged" in ns:  # a standard adapter on disk, and a plain model
        assert (folder / "my-adapter" / "adapter_config.json").is_file()
        assert not any(isinstance(m, trilora.Linear4bit) for m in ns["merged"].modules())
        assert torch.isfinite(ns["loss"]).all()
