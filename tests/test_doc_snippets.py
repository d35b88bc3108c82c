"""Every ```python block of README.md runs as written, and so does every block of docs/*.md
marked ``<!-- doc-test: run -->`` on the line before it (the docs' other blocks are
fragments that continue the text around them: a signature, a call on the reader's model).

Each block runs on its own (a fresh namespace: a block must bring its own imports and
inputs) in an empty working folder that holds what the placeholders name: ``path/to/llama``
is a tiny Llama with its tokenizer (``trilora.train.tiny_model``), built from a transformers
config. A README block marked ``<!-- doc-test: skip REASON -->`` is skipped with that
reason; today none is.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(
    r"(?:<!--\s*doc-test:\s*(?P<mark>run|skip)\s*(?P<why>.*?)\s*-->\s*\n)?"
    r"```python\n(?P<code>.*?)```",
    re.DOTALL,
)


def python_blocks(path: Path) -> list[tuple[str, str, str | None, str]]:
    """``(file:line, code, mark, reason)`` of every ```python block of ``path``: ``mark`` is
    its ``doc-test`` mark (``run``, ``skip`` or None), ``reason`` what follows a ``skip``."""
    text = path.read_text(encoding="utf-8")
    return [
        (
            f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start('code')) + 1}",
            m.group("code"),
            m.group("mark"),
            m.group("why"),
        )
        for m in _BLOCK.finditer(text)
    ]


README_BLOCKS = python_blocks(README)
DOC_BLOCKS = [
    b for doc in sorted((ROOT / "docs").glob("*.md")) for b in python_blocks(doc) if b[2] == "run"
]
BLOCKS = [
    (where, code, why if mark == "skip" else None)
    for where, code, mark, why in [*README_BLOCKS, *DOC_BLOCKS]
]


def test_every_readme_block_is_found():
    assert len(README_BLOCKS) >= 3
    assert README.read_text().count("```python") == len(README_BLOCKS)
    assert DOC_BLOCKS  # the marked docs blocks are found too


@pytest.fixture(scope="module")
def placeholder_model(tmp_path_factory) -> Path:
    from trilora.train.tiny_model import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("models") / "llama", hidden=64, layers=2)


@pytest.mark.parametrize("where, code, skip", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs(where, code, skip, placeholder_model, tmp_path, monkeypatch):
    if skip is not None:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)
    # A block may set process-wide settings (docs/cpu.md sets OMP_WAIT_POLICY); undone after.
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if "path/to/llama" in code:
        shutil.copytree(placeholder_model, tmp_path / "path" / "to" / "llama")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, where, "exec"), namespace)
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
