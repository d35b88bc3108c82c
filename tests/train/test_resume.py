"""Crash safety: real processes, real SIGKILL, bitwise-identical resumed trajectories."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import save_tiny_lm, sft_records, write_jsonl

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_tiny_lm(root / "m", layers=2, hidden=64)
    write_jsonl(root / "d.jsonl", sft_records(48, seed=5))
    # dropout on, so the restored RNG state matters
    (root / "run.yaml").write_text(
        f"model: {root / 'm'}\ndata: {root / 'd.jsonl'}\nmax_steps: {STEPS}\nbatch_size: 3\n"
        "grad_accum: 2\nsave_every: 2\nkeep_last: 2\nlora_r: 4\nlora_dropout: 0.1\nlr: 0.01\n"
        "compare: 0\nval_fraction: 0.1\neval_every: 3\nprogress: false\n"
    )
    return root


def _cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trilora.cli", "train", "--config", str(root / "run.yaml"),
            "--out", str(out), *extra]  # fmt: skip


def _run(root, out, *extra, env=None, preexec=None, check=True):
    p = subprocess.run(_cmd(root, out, *extra), capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, preexec_fn=preexec, timeout=600)  # fmt: skip
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _trajectory(out: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr"),
             r.get("eval_loss"), r.get("tokens")) for r in recs]  # fmt: skip


def _adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    _run(setup, out)
    return out


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "exited"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_sigkill_mid_run_then_resume_is_bitwise(setup, reference):
    out = setup / "killed"
    proc = subprocess.Popen(_cmd(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip

    def past_step_five():
        m = out / "metrics.jsonl"
        return m.is_file() and any(json.loads(x).get("step", 0) >= 5 for x in
                                   m.read_text().splitlines() if x.endswith("}"))  # fmt: skip

    _wait_for(past_step_five, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists()
    # without --resume the folder is refused
    p = _run(setup, out, check=False)
    assert p.returncode == 2 and "holds another run; pass --resume" in p.stderr
    _run(setup, out, "--resume")
    assert _trajectory(out) == _trajectory(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)


def test_sigkill_inside_a_checkpoint_write(setup, reference):
    out = setup / "killed_in_save"
    env = {**os.environ, "TRILORA_TRAIN_TEST_HOOK": "pause_in_save:4"}
    proc = subprocess.Popen(_cmd(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    _wait_for(lambda: (out / ".test-paused").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the half-written step 4 is only a temporary folder; step 2 is the latest complete one
    assert "step-00000002" in ckpts and "step-00000004" not in ckpts
    assert any(n.startswith(".step-00000004.tmp-") for n in ckpts)
    _run(setup, out, "--resume")
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    assert _trajectory(out) == _trajectory(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004",
                                                                       "step-00000006"]  # fmt: skip


def test_failed_save_keeps_the_previous_checkpoint(setup):
    out = setup / "full_disk"
    env = {"TRILORA_TRAIN_TEST_HOOK": "kill_in_save:4"}
    p = _run(setup, out, env=env, check=False)
    assert p.returncode == -signal.SIGKILL
    step2 = out / "checkpoints" / "step-00000002"
    before = {f.relative_to(step2): f.read_bytes() for f in step2.rglob("*") if f.is_file()}

    def small_files():  # the next checkpoint's files cannot be written: a real write error
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    p = _run(setup, out, "--resume", preexec=small_files, check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "could not write checkpoint step 4" in last and "step-00000002) is intact" in last
    after = {f.relative_to(step2): f.read_bytes() for f in step2.rglob("*") if f.is_file()}
    assert after == before
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step-00000002"]


def test_resume_with_another_config_or_model_is_refused(setup, reference):
    p = _run(setup, reference, "--resume", "--lora-r", "8", check=False)
    assert p.returncode == 2 and "lora_r: 4 -> 8" in p.stderr
    other = setup / "m2"
    save_tiny_lm(other, layers=2, hidden=64, seed=1)
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes() + b"")
    p = _run(setup, reference, "--resume", "--model", str(other), check=False)
    assert p.returncode == 2 and "another model or config" in p.stderr
    p = _run(setup, setup / "nothing-here", "--resume", check=False)
    assert p.returncode == 2 and "holds no trilora run" in p.stderr


def test_unwritable_output_fails_before_training(setup):
    blocker = setup / "a-file"
    blocker.write_text("x")
    p = _run(setup, blocker / "run", check=False)
    assert p.returncode != 0
    assert "cannot write there" in p.stderr or "not a folder" in p.stderr
    assert "Traceback" not in p.stderr
