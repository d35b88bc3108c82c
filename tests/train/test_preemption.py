"""Preemption: SIGTERM (what a scheduler sends before it kills a job) and SIGINT (Ctrl-C)
stop a run at the next step boundary with a checkpoint, one line says which step was saved
and the command that resumes it, and that command continues bit for bit (every logged loss,
gradient norm, learning rate and held-out loss, and the final adapter's bytes, equal to an
uninterrupted run's, as in tests/train/test_resume.py).

Real signals throughout. Where the exit status of a process or its end without Python
cleanup (the grace watchdog) is the point, the run is a real `trilora train` process killed
with `kill`; elsewhere it runs in this process and a thread sends the signal to it, which
saves the seconds a new Python process spends importing torch. A test hook
(``TRILORA_TRAIN_TEST_HOOK``, :mod:`trilora.train.stop`) holds the run inside a chosen step
so the signal lands mid-step, however fast the machine is.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.cli import main
from trilora.train.checkpoints import HOOK_ENV

STEPS = 8
SAVE_EVERY = 3
STOP_IN = 5  # the step the signal arrives in: not a --save-every multiple

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed in the main thread",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    save_tiny_lm(root / "m", layers=2, hidden=64)
    write_jsonl(root / "d.jsonl", sft_records(48, seed=11))
    # dropout on, so the restored RNG state matters; an evaluation every 3 steps
    (root / "run.yaml").write_text(
        f"model: {root / 'm'}\ndata: {root / 'd.jsonl'}\nmax_steps: {STEPS}\nbatch_size: 3\n"
        f"grad_accum: 2\nsave_every: {SAVE_EVERY}\nkeep_last: 3\nlora_r: 4\nlora_dropout: 0.1\n"
        "lr: 0.01\ncompare: 0\nval_fraction: 0.1\neval_every: 3\nprogress: false\n"
    )
    return root


@pytest.fixture
def one_thread():
    # tiny tensors; and the subprocesses below run with OMP_NUM_THREADS=1: same numerics
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(root / "run.yaml"), "--out", str(out), *extra]


def _in_process(argv: list[str], hook: str = "", send=None) -> int:
    """``trilora train`` in this process; ``send(marker_dir)`` runs in a thread meanwhile."""
    previous = os.environ.get(HOOK_ENV)
    os.environ[HOOK_ENV] = hook
    sender = threading.Thread(target=send, daemon=True) if send else None
    try:
        if sender is not None:
            sender.start()
        return main(argv)
    finally:
        if sender is not None:
            sender.join(timeout=60)
        if previous is None:
            os.environ.pop(HOOK_ENV, None)
        else:
            os.environ[HOOK_ENV] = previous


def _wait_for(path: Path, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"exited ({proc.returncode}) before {path.name} appeared: "
                + proc.communicate()[1][-3000:]
            )
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def _signal_self_when(marker: Path, *signums: int, gap: float = 0.0):
    def send() -> None:
        _wait_for(marker)
        for i, s in enumerate(signums):
            if i:
                time.sleep(gap)
            os.kill(os.getpid(), s)

    return send


def _spawn(root: Path, out: Path, hook: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, HOOK_ENV: hook, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "trilora.cli", *_argv(root, out, *extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


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


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _stop_line(stderr: str) -> str:
    """The one line a stop prints: the last one, and the only one that says it stopped."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert sum("stopped" in x for x in lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def _resume_words(line: str) -> list[str]:
    words = shlex.split(line.split("resume with: ", 1)[1])
    assert words[:2] == ["trilora", "train"] and "--resume" in words, line
    return words[1:]


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_argv(setup, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow  # a real process (Python startup, imports): ~15 s on 2 busy cores
def test_sigterm_saves_the_step_in_progress_and_the_printed_command_resumes_bitwise(
    setup, reference, one_thread
):
    out = setup / "sigterm"
    proc = _spawn(setup, out, f"pause_in_step:{STOP_IN}")
    marker = out / ".test-paused-rank0"
    try:
        _wait_for(marker, proc=proc)
    except AssertionError:
        proc.kill()
        raise
    os.kill(int(marker.read_text()), signal.SIGTERM)  # what `kill PID` sends
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    line = _stop_line(stderr)
    ckpt = out / "checkpoints" / f"step-{STOP_IN:08d}"
    assert line.startswith(
        f"trilora train: stopped by SIGTERM after step {STOP_IN} of {STEPS}: "
        f"checkpoint saved in {ckpt}; resume with: "
    )
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == STOP_IN
    assert _checkpoints(out) == ["step-00000003", "step-00000005"]  # nothing half-written
    assert not (out / "adapter").exists()
    assert max(r[1] for r in _trajectory(out)) == STOP_IN
    # the printed command, as printed
    assert main(_resume_words(line)) == 0
    assert _trajectory(out) == _trajectory(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_the_step_boundary_in_process(
    setup, reference, one_thread, capsys, signum
):
    out = setup / f"in-process-{signum.name}"
    marker = out / ".test-paused-rank0"
    handler = signal.getsignal(signum)
    status = _in_process(
        _argv(setup, out), f"pause_in_step:{STOP_IN}", _signal_self_when(marker, signum)
    )
    stderr = capsys.readouterr().err
    assert status == 128 + signum, stderr[-3000:]
    line = _stop_line(stderr)
    assert f"stopped by {signum.name} after step {STOP_IN} of {STEPS}" in line
    assert signal.getsignal(signum) is handler  # the caller's handler is back
    assert _checkpoints(out) == ["step-00000003", "step-00000005"]
    assert main(_resume_words(line)) == 0
    assert _trajectory(out) == _trajectory(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)


@pytest.mark.slow  # a real process: the watchdog ends it without Python's cleanup
def test_a_step_that_outlasts_the_grace_exits_without_a_checkpoint(setup, reference, one_thread):
    out = setup / "stalled"
    proc = _spawn(setup, out, f"stall_in_step:{STOP_IN}", "--stop-grace", "1")
    marker = out / ".test-paused-rank0"
    try:
        _wait_for(marker, proc=proc)
    except AssertionError:
        proc.kill()
        raise
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    waited = time.monotonic() - t0
    assert proc.returncode == 143, stderr[-3000:]
    assert 1.0 <= waited < 30, waited
    line = _stop_line(stderr)
    assert (
        f"stopped by SIGTERM: step {STOP_IN} of {STEPS} did not end within --stop-grace 1 s, "
        "so no checkpoint was written; the latest checkpoint is "
        f"{out / 'checkpoints' / 'step-00000003'}; resume with: "
    ) in line
    assert _checkpoints(out) == ["step-00000003"]  # no temporary folder either
    assert main(_resume_words(line)) == 0
    assert _trajectory(out) == _trajectory(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)


def test_a_second_sigint_stops_at_once(setup, one_thread, capsys):
    out = setup / "twice"
    marker = out / ".test-paused-rank0"
    t0 = time.monotonic()
    # the step never ends, and the grace would wait a minute: only the second Ctrl-C ends it
    status = _in_process(
        _argv(setup, out, "--stop-grace", "60"),
        f"stall_in_step:{STOP_IN}",
        _signal_self_when(marker, signal.SIGINT, signal.SIGINT, gap=1.5),
    )
    elapsed = time.monotonic() - t0
    stderr = capsys.readouterr().err
    assert status == 130, stderr[-3000:]
    assert elapsed < 50, elapsed
    line = _stop_line(stderr)
    assert f"stopped at once by a second SIGINT: no checkpoint written for step {STOP_IN}" in line
    assert _checkpoints(out) == ["step-00000003"]


@pytest.mark.parametrize("existing", ["none", "empty", "replaced"])
def test_a_signal_before_the_first_step_leaves_nothing_behind(setup, one_thread, capsys, existing):
    out = setup / f"early-{existing}"
    extra: list[str] = []
    if existing == "empty":
        out.mkdir()
    if existing == "replaced":  # an earlier run, replaced with --overwrite
        out.mkdir()
        (out / "run.json").write_text('{"old": true}')
        (out / "notes.txt").write_text("mine")
        extra = ["--overwrite"]
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    marker = out / ".test-paused-rank0"
    status = _in_process(
        _argv(setup, out, *extra), "pause_in_setup:0", _signal_self_when(marker, signal.SIGTERM)
    )
    stderr = capsys.readouterr().err
    assert status == 143, stderr[-3000:]
    assert "stopped by SIGTERM before the first step ended" in _stop_line(stderr)
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    assert after == before
    assert not any(p.name.startswith(f".{out.name}.") for p in setup.iterdir())
    # the same command starts again
    assert main(_argv(setup, out, *extra, "--max-steps", "1")) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()


def _launch_two(root: Path, out: Path, hook: str = "", *extra: str) -> subprocess.Popen:
    return _spawn(root, out, hook, "--nproc", "2", *extra)


def _paused_ranks(out: Path, proc: subprocess.Popen) -> dict[int, int]:
    markers = [out / f".test-paused-rank{r}" for r in (0, 1)]
    t0 = time.monotonic()
    while not all(m.exists() for m in markers):
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-3000:])
        time.sleep(0.05)
    time.sleep(0.2)  # the pid is written right after the file is created
    return {r: int(m.read_text()) for r, m in enumerate(markers)}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_stop_together_when_one_is_signalled(setup):
    """Only rank 1 gets SIGTERM: rank 0 learns of it at the step boundary (an all-reduce),
    both save the same step and exit, and the printed command names both processes. (That
    the printed command resumes bit for bit: the one-process test above; that a checkpoint
    saved by two processes resumes: test_distributed_train.py.)"""
    out = setup / "two-one-signalled"
    proc = _launch_two(setup, out, f"pause_in_step:{STOP_IN}")
    pids = _paused_ranks(out, proc)
    os.kill(pids[1], signal.SIGTERM)
    (out / ".test-paused-rank0").unlink()  # rank 0 goes on, unsignalled
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    line = _stop_line(stderr)
    assert f"stopped by SIGTERM after step {STOP_IN} of {STEPS}: checkpoint saved" in line
    step = out / "checkpoints" / f"step-{STOP_IN:08d}"
    state = json.loads((step / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (STOP_IN, 2)
    words = _resume_words(line)
    assert words[words.index("--nproc") + 1] == "2"


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank(setup):
    out = setup / "two-launcher"
    proc = _launch_two(setup, out, f"pause_in_step:{STOP_IN}")
    _paused_ranks(out, proc)
    proc.send_signal(signal.SIGTERM)  # torch's launcher passes it on to both workers
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    line = _stop_line(stderr)
    assert f"stopped by SIGTERM after step {STOP_IN} of {STEPS}: checkpoint saved" in line
    assert "--nproc 2" in line
    assert _checkpoints(out) == ["step-00000003", "step-00000005"]
