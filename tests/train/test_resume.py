"""Crash safety: real processes, real SIGKILL, bitwise-identical resumed trajectories.

The runs that are killed (and the one under a file-size limit) are real processes; the
uninterrupted reference, the resumes after a kill and the refusals run in this process
(``trilora.cli.main``), where the ~10 s a process spends importing torch, transformers and
PEFT is paid once. A run continues bit for bit whichever process resumes it: the same code,
the same thread count (the processes inherit this one's ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.cli import main

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
    return [
        sys.executable,
        "-m",
        "trilora.cli",
        "train",
        "--config",
        str(root / "run.yaml"),
        "--out",
        str(out),
        *extra,
    ]


def _run(root, out, *extra, env=None, preexec=None, check=True):
    """``trilora train`` in a process of its own."""
    p = subprocess.run(
        _cmd(root, out, *extra),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec,
        timeout=600,
    )
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _train(capsys, root: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``trilora train`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    status = main(_cmd(root, out, *extra)[3:])
    return status, capsys.readouterr().err


def _trajectory(out: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        (
            r["kind"],
            r["step"],
            r.get("loss"),
            r.get("grad_norm"),
            r.get("lr"),
            r.get("eval_loss"),
            r.get("tokens"),
        )
        for r in recs
    ]


def _adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    assert main(_cmd(setup, out)[3:]) == 0
    return out


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "exited"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_resume_from_a_checkpoint_is_bitwise(setup, reference, capsys):
    """The reference run's last checkpoint (step 6, written through
    torch.distributed.checkpoint in one process), resumed as if the run had stopped there:
    steps 7 and 8 and the adapter are the uninterrupted run's, bit for bit."""
    out = setup / "resumed_at_6"
    shutil.copytree(reference, out, symlinks=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000006",
    ]
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    assert _train(capsys, setup, out, "--resume")[0] == 0
    assert _trajectory(out) == _trajectory(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)


# The SIGKILL tests start real processes (~15 s of CPU each, most of it importing torch,
# transformers and PEFT). What they check is our own file logic (atomic checkpoint folders,
# the run folder's rules); the resume through torch.distributed.checkpoint that the lanes
# without slow tests must see is test_resume_from_a_checkpoint_is_bitwise above.
#
# One killed run serves both: SIGKILLed half-way through writing its step-4 checkpoint, it
# leaves everything a kill at any other moment can leave (steps logged past the last
# complete checkpoint, no adapter) plus a half-written checkpoint folder. (A second run
# killed between two checkpoints was a test of its own until the suite was cut down.)
@pytest.fixture(scope="module")
def killed_in_save(setup):
    """A run SIGKILLed half-way through writing its step-4 checkpoint (left as it is: the
    tests below resume copies of it)."""
    out = setup / "killed_in_save"
    env = {**os.environ, "TRILORA_TRAIN_TEST_HOOK": "pause_in_save:4"}
    proc = subprocess.Popen(
        _cmd(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    _wait_for(lambda: (out / ".test-paused").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (out / ".test-paused").unlink()
    return out


@pytest.mark.slow  # our own checkpoint files (see above)
def test_sigkill_inside_a_checkpoint_write(setup, reference, killed_in_save, capsys):
    out = setup / "resumed_after_kill_in_save"
    shutil.copytree(killed_in_save, out, symlinks=True)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the half-written step 4 is only a temporary folder; step 2 is the latest complete one
    assert "step-00000002" in ckpts and "step-00000004" not in ckpts
    assert any(n.startswith(".step-00000004.tmp-") for n in ckpts)
    # steps 3 and 4 were logged after it: the resumed run must log them again, once
    assert max(step for _, step, *_ in _trajectory(out)) == 4
    assert not (out / "adapter").exists()
    # without --resume the folder is refused
    status, err = _train(capsys, setup, out)
    assert status == 2 and "holds another run; pass --resume" in err
    assert _train(capsys, setup, out, "--resume")[0] == 0
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    assert _trajectory(out) == _trajectory(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000006",
    ]


@pytest.mark.slow  # our own checkpoint files (see above)
def test_failed_save_keeps_the_previous_checkpoint(setup, killed_in_save):
    out = setup / "full_disk"
    shutil.copytree(killed_in_save, out, symlinks=True)
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


def test_resume_with_another_config_or_model_is_refused(setup, reference, capsys):
    status, err = _train(capsys, setup, reference, "--resume", "--lora-r", "8")
    assert status == 2 and "lora_r: 4 -> 8" in err
    other = setup / "m2"
    save_tiny_lm(other, layers=2, hidden=64, seed=1)
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes() + b"")
    status, err = _train(capsys, setup, reference, "--resume", "--model", str(other))
    assert status == 2 and "another model or config" in err
    status, err = _train(capsys, setup, setup / "nothing-here", "--resume")
    assert status == 2 and "holds no trilora run" in err


def test_unwritable_output_fails_before_training(setup, capsys):
    blocker = setup / "a-file"
    blocker.write_text("x")
    status, err = _train(capsys, setup, blocker / "run")
    assert status != 0
    assert "cannot write there" in err or "not a folder" in err
    assert "Traceback" not in err
