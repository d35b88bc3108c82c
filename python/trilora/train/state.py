"""Run checkpoints: everything a resumed run needs to continue bit for bit.

``OUT/checkpoints/step-00000050/`` holds ``trainable.safetensors`` (every trainable tensor
by parameter name), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (Python, NumPy, torch
CPU and CUDA generator states) and ``trainer_state.json`` (step, data position, tokens).
It is written into a temporary sibling (``.step-00000050.tmp-*``), flushed, and renamed:
a folder named ``step-*`` is always complete, so a crash at any point leaves the previous
checkpoint as the latest. Only the last ``keep_last`` are kept.

Test hook (used by tests/train/test_resume.py, never set in normal use):
``TRILORA_TRAIN_TEST_HOOK=pause_in_save:STEP`` makes the save of step STEP stop half-way
(after the weights, before the rest), write ``OUT/.test-paused`` and wait to be killed;
``kill_in_save:STEP`` makes it SIGKILL itself at that point.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trilora.io import UserError, atomic_write_json, default_dir_mode

__all__ = ["latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")
HOOK_ENV = "TRILORA_TRAIN_TEST_HOOK"


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from, in a form ``torch.load`` reads safely."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys).copy()),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _test_hook(point: str, step: int, run_dir: Path) -> None:
    spec = os.environ.get(HOOK_ENV, "")
    if not spec:
        return
    action, _, at = spec.partition(":")
    if not at.isdigit() or int(at) != step or not action.endswith(point):
        return
    if action == f"kill_{point}":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == f"pause_{point}":
        (run_dir / ".test-paused").write_text(str(os.getpid()))
        while True:  # the test SIGKILLs us here
            time.sleep(0.05)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, folder)``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Delete temporary folders a killed save left behind (only ours: ``.step-*.tmp-*``)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor],
                    optimizer, scheduler, trainer_state: dict[str, Any],
                    keep_last: int) -> Path:  # fmt: skip
    """Write checkpoint ``step`` atomically and prune to the last ``keep_last``.

    Raises:
        UserError: the write failed (full disk, unwritable folder); the temporary folder is
            removed and earlier checkpoints are untouched.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        os.chmod(tmp, default_dir_mode())
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        _test_hook("in_save", step, run_dir)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # a re-run of this step after a resume: the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as exc:
        # safetensors and torch.save report a failed write (full disk, file size limit)
        # as their own exception types, with the OS error in the message.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint ({previous.name}) is intact" if previous else (
            "no earlier checkpoint exists")  # fmt: skip
        raise UserError(f"could not write checkpoint step {step} in {root}: "
                        f"{getattr(exc, 'strerror', None) or exc}; {kept}") from exc  # fmt: skip
    for _, old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """The parts of checkpoint ``folder`` (tensors on the CPU)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        return {
            "trainable": load_file(str(folder / "trainable.safetensors")),
            "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
            "scheduler": torch.load(folder / "scheduler.pt", weights_only=True),
            "rng": torch.load(folder / "rng.pt", weights_only=True),
            "trainer_state": json.loads((folder / "trainer_state.json").read_text()),
        }
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint {folder} cannot be read ({exc}); delete it to resume "
                        "from the one before") from None  # fmt: skip


def write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data)
