"""``trilora selfcheck`` as a user runs it: the CPU check passes, and --out is protected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trilora.selfcheck import GPU_ONLY, SECTION_NAMES


def _trilora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "trilora.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )


# slow: ~40 s of CPU; every kernel and op it runs is tested in tests/ops and tests/kernels
# (the lanes without slow tests run those), and the runner's own logic in
# test_selfcheck_runner.py
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One ``trilora selfcheck --quick`` on the CPU, shared by the tests below. Every case
    family runs (one shape each); the values of every shape are the op and kernel tests'
    job (tests/ops, tests/kernels), and test_quick_runs_every_kernel_and_dtype pins that the
    quick plan leaves no kernel out."""
    out = tmp_path_factory.mktemp("selfcheck") / "out"
    proc = _trilora("selfcheck", "--quick", "--out", str(out), "--seed", "1234")
    return out, proc


@pytest.mark.slow  # see cpu_run
def test_cpu_selfcheck_passes(cpu_run):
    out, proc = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["exit_status"] == 0 and data["meta"]["seed"] == 1234
    assert data["meta"]["quick"] is True
    sections = {s["name"]: s for s in data["sections"]}
    assert list(sections) == list(SECTION_NAMES)
    assert sections["environment"]["status"] == "pass"
    assert sections["environment"]["units"][0]["info"]["triton_interpreter"] is True
    corr = sections["correctness"]
    assert corr["status"] == "pass", corr["verdict"]
    units = corr["units"]
    passed = [u for u in units if u["status"] == "pass"]
    kernels = {u["kernel"] for u in passed}
    for k in (
        "quantize_4bit",
        "dequantize_4bit",
        "qlora_linear.splitk",
        "qlora_linear.tiled",
        "qlora_linear.scratch",
        "cross_entropy",
        "linear_cross_entropy",
        "rms_norm",
        "grouped_attention",
        "CPUOffloadAdamW",
        "adamw_fused",
    ):
        assert k in kernels, k
    assert {u["config"] for u in passed if u["kernel"] == "adamw_fused"} == {
        "32bit",
        "8bit,blocksize256",
    }
    # Only the bf16 cases of the tl.dot kernels are left to the GPU, and they say why.
    skipped = [u for u in units if u["status"] == "skipped"]
    assert skipped and all(
        u["dtype"] == "bf16" and u["kernel"].startswith(("qlora_linear", "grouped_qlora"))
        for u in skipped
    )
    assert all("triton#11584" in u["message"] for u in skipped)
    for u in passed:
        assert u["checks"] and all(c["ok"] for c in u["checks"])
    for name in GPU_ONLY:
        assert sections[name]["status"] == "skipped" and "--gpu" in sections[name]["verdict"]
    report = (out / "report.md").read_text()
    assert "| correctness | pass |" in report and "### By kernel" in report
    assert (out / "logs" / "correctness.log").exists()
    assert not (out / ".state").exists()
    for name in ("environment", "correctness"):
        assert f"{name}: PASS" in proc.stdout


def test_quick_runs_every_kernel_and_dtype(tmp_path):
    from trilora.selfcheck import cases
    from trilora.selfcheck.units import Context

    for device in ("cpu", "cuda"):  # listing the units needs no device
        every = cases.units(Context(device, 0, tmp_path))
        quick = [u for u in every if u.tier == 0]
        assert 0 < len(quick) < len(every)
        assert {(u.kernel, u.dtype) for u in quick} == {(u.kernel, u.dtype) for u in every}


def test_a_non_empty_out_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"from": "an earlier run"}')
    before = (out / "results.json").read_text()
    proc = _trilora("selfcheck", "--out", str(out), "--sections", "environment")
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "results.json").read_text() == before


@pytest.mark.slow  # our own output-folder rules; a worker process runs the environment section
def test_overwrite_replaces_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    proc = _trilora("selfcheck", "--out", str(out), "--overwrite", "--sections", "environment")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "old.txt").exists()
    data = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in data["sections"]] == ["environment"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sections", "speed,bogus"], "unknown section"),
        (["--budget-s", "0"], "--budget-s"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(tmp_path, args, message):
    proc = _trilora("selfcheck", "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message for a machine without CUDA"
)
def test_gpu_flag_without_cuda_says_so(tmp_path, capsys):
    from trilora.cli import main

    assert main(["selfcheck", "--gpu", "--out", str(tmp_path / "o")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_the_command_modules_import_no_torch():
    code = (
        "import sys, trilora.cli, trilora.commands.selfcheck, trilora.selfcheck.runner, "
        "trilora.selfcheck.report, trilora.selfcheck.worker, trilora.selfcheck.units\n"
        "trilora.cli.build_parser(['selfcheck', '--help'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
