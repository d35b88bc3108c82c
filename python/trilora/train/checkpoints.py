"""Run checkpoints: everything a resumed run needs to continue, on any number of processes.

``OUT/checkpoints/step-00000050/`` holds ``state/`` (the trainable tensors and the optimizer
state, written by :func:`trilora.distributed.save_state` through
``torch.distributed.checkpoint``: each tensor with its global shape, so a run saved on N
processes, DDP or FSDP2, resumes on M, or in one), ``scheduler.pt``, ``rng.pt`` (Python,
NumPy, torch CPU and CUDA generator states, one set per process) and
``trainer_state.json`` (step, data position, tokens, the process count it was saved
from). It is written into a temporary sibling (``.step-00000050.tmp-*``), flushed, and
renamed by rank 0: a folder named ``step-*`` is always complete, so a crash at any point
leaves the previous checkpoint as the latest. Only the last ``keep_last`` are kept.

On the same process count a resumed run continues bit for bit (CPU; tested on one process
and on two); on another count it continues the same trajectory to fp32 rounding.

Test hook (used by tests/train/test_resume.py, never set in normal use):
``TRILORA_TRAIN_TEST_HOOK=pause_in_save:STEP`` makes the save of step STEP stop half-way
(after the weights, before the rest), write ``OUT/.test-paused`` and wait to be killed;
``kill_in_save:STEP`` makes it SIGKILL itself at that point.
"""

from __future__ import annotations

import contextlib
import io
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

import trilora.distributed as td
from trilora.distributed import DistEnv
from trilora.io import UserError, default_dir_mode
from trilora.train.collectives import gather_objects, on_main

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


def _serialized_rng() -> bytes:

    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return buf.getvalue()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep_last: int,
    env=None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the last ``keep_last``.

    Every rank must call it (the trainable tensors and optimizer state are written by all
    ranks, each its shards); rank 0 writes the rest and renames the folder into place.

    Raises:
        UserError: the write failed (full disk, unwritable folder), on every rank; the
            temporary folder is removed and earlier checkpoints are untouched.
    """

    env = env or DistEnv()
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"

    def failed(exc: BaseException) -> UserError:
        previous = latest_checkpoint(run_dir)
        kept = (
            f"the previous checkpoint ({previous.name}) is intact"
            if previous
            else ("no earlier checkpoint exists")
        )
        reason = getattr(exc, "strerror", None) or exc
        return UserError(f"could not write checkpoint step {step} in {root}: {reason}; {kept}")

    def make_tmp() -> Path:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            os.chmod(tmp, default_dir_mode())
        except OSError as exc:
            raise failed(exc) from None
        return tmp

    tmp = on_main(env, make_tmp)
    rngs = gather_objects(env, _serialized_rng())

    def clean() -> None:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)

    try:
        td.save_state(tmp / "state", model, optimizer)
    except (OSError, RuntimeError, UserError) as exc:
        # DCP reports a failed write (full disk, file size limit) as its own exception
        # types, with the OS error in the message; every rank raised it.
        clean()
        raise failed(exc) from exc

    def finish() -> None:
        try:
            _test_hook("in_save", step, run_dir)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "rng.pt").write_bytes(_pack_rngs(rngs))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    _fsync_file(f)
            for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                _fsync_dir(d)
            _fsync_dir(tmp)
            if final.exists():  # a re-run of this step after a resume: the new one is complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise failed(exc) from exc
        for _, old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    on_main(env, finish)
    return final


def _pack_rngs(rngs: list[bytes]) -> bytes:

    buf = io.BytesIO()
    torch.save([torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in rngs], buf)
    return buf.getvalue()


def _rng_of_rank(folder: Path, rank: int) -> dict[str, Any] | None:

    states = torch.load(folder / "rng.pt", weights_only=True)
    if rank >= len(states):
        return None
    return torch.load(io.BytesIO(states[rank].numpy().tobytes()), weights_only=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler, env=None) -> dict[str, Any]:
    """Load checkpoint ``folder`` into ``model``, ``optimizer`` and ``scheduler`` (every rank
    calls it; any process count and FSDP/DDP layout); return the trainer state, with
    ``"rng"``: this rank's saved RNG states (None when the checkpoint was saved on fewer
    processes than this rank's number).

    Raises:
        UserError: the checkpoint is unreadable, from an older trilora, or from another
            model (:func:`trilora.distributed.load_state` names the difference).
    """

    env = env or DistEnv()
    folder = Path(folder)
    if not (folder / "state").is_dir():
        raise UserError(
            f"checkpoint {folder} has no state/ folder: it was written by an older "
            "trilora; resume with the version that wrote it, or start the run "
            "again"
        )
    try:
        trainer_state = json.loads((folder / "trainer_state.json").read_text())
        td.load_state(folder / "state", model, optimizer)
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        trainer_state["rng"] = _rng_of_rank(folder, env.rank)
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise UserError(
            f"checkpoint {folder} cannot be read ({exc}); delete it to resume from the one before"
        ) from None
    return trainer_state
