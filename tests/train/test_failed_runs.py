"""A failed run does not block its own retry: bad data fails before the model loads, and a
run that fails before its first step ends leaves its output folder as it found it, so the
corrected command runs as typed (no --overwrite)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("failed_runs")
    good = save_tiny_lm(root / "good", layers=1, hidden=32)
    # config and tokenizer intact, weights unreadable: loading this model fails
    broken = root / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return {"good": good, "broken": broken}


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--compare",
            "0",
            "--val-fraction",
            "0.25",
            "--no-progress",
            *extra,
        ]
    )


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("problem", ["malformed", "empty", "missing", "prompt-too-long"])
def test_bad_data_fails_before_the_model_loads_and_leaves_nothing(
    models, tmp_path, capsys, problem
):
    data = tmp_path / "d.jsonl"
    extra: list[str] = []
    if problem == "malformed":
        write_jsonl(data, [*sft_records(6), '{"text": "cut short'])
        expected = f"{data}:7: not valid JSON"
    elif problem == "empty":
        data.write_text("\n \n")
        expected = f"{data}: no usable examples"
    elif problem == "missing":
        expected = f"{data}: no such file"
    else:
        write_jsonl(data, [*sft_records(3), {"prompt": "why " * 40, "completion": "because"}])
        extra = ["--max-seq-len", "64"]
        expected = f"{data}:4: the prompt is"
    out = tmp_path / "run"
    # The model's weights cannot be read: the data error can only show if the data are
    # checked before the model loads.
    assert _train(models["broken"], data, out, *extra) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not out.exists()
    assert _train(models["good"], data, out, *extra) == 1
    assert expected in capsys.readouterr().err
    assert not out.exists()
    # the data fixed, the same command runs: nothing of the failed runs is in the way
    write_jsonl(data, sft_records(12))
    assert _train(models["good"], data, out, *extra) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("existing", ["none", "empty-folder", "replaced-run"])
def test_a_run_failing_before_its_first_step_leaves_the_folder_as_it_was(
    models, tmp_path, capsys, existing
):
    data = write_jsonl(tmp_path / "d.jsonl", sft_records(12))
    out = tmp_path / "nested" / "run"
    extra: list[str] = []
    if existing == "empty-folder":
        out.mkdir(parents=True)
    if existing == "replaced-run":  # an earlier run, to be replaced with --overwrite
        assert _train(models["good"], data, out) == 0
        extra = ["--overwrite"]
    before = _snapshot(out)
    # the model fails to load, after the run folder was written
    assert _train(models["broken"], data, out, *extra) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert _snapshot(out) == before
    if existing == "none":
        assert not (tmp_path / "nested").exists()  # the parent it created went too
    else:  # nor a folder set aside by --overwrite, nor a temporary file
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    assert _train(models["good"], data, out, *extra) == 0


def test_a_first_step_with_an_infinite_loss_leaves_nothing(models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    overflowing = tmp_path / "overflowing"
    shutil.copytree(models["good"], overflowing)
    weights = load_file(str(overflowing / "model.safetensors"))
    name = next(k for k in weights if k.endswith("norm.weight"))
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, str(overflowing / "model.safetensors"), metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "d.jsonl", sft_records(12))
    out = tmp_path / "run"
    assert _train(overflowing, data, out) == 1
    assert "the loss became" in capsys.readouterr().err
    assert not out.exists()
    assert _train(models["good"], data, out) == 0
